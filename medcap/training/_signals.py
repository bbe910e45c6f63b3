"""Stop on a signal, at a step boundary: a scheduler's preemption (SIGTERM) or a user's
Ctrl-C (SIGINT) would otherwise lose everything since the last periodic save.

In order:

* ``StopSignals``: while training runs, the first of either signal only raises a
  flag (``received``); the loop sees it at the next step boundary, saves and returns.
  A second one of the same signal acts as it did before training (Ctrl-C twice stops
  at once);
* ``ignore_sigint_in_worker``: a DataLoader worker keeps working through a Ctrl-C,
  so the batch the main process still needs to finish its step arrives.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Dict, Optional

log = logging.getLogger("medcap.training")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Context manager: catch SIGINT/SIGTERM as a stop request (``received``: the signal number)."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        # Python lets only the main thread install handlers; elsewhere signals keep their default.
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
        log.warning(
            "%s received: saving at the end of this step, then stopping (send it again to stop at once, "
            "losing the steps since the last save)",
            signal.Signals(signum).name,
        )


def ignore_sigint_in_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: Ctrl-C reaches the whole process group; a worker that
    died of it would break the batch the main process still needs to finish its step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
