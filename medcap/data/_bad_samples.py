"""The bad-sample policy: one broken record out of half a million must not kill a run.

In order: ``BadSample`` (a record that cannot become a sample, with the reason why:
a short category, then details), ``reason_kind`` and ``check_policy``
(``bad_samples="skip"`` or ``"raise"``), and ``SkipLog``, which counts bad samples by
index and logs each one once.

Under ``skip`` the dataset moves on to the next good sample and reports what it passed
over *inside the item it returns* (``item["skipped"]``), because ``__getitem__`` runs in
DataLoader workers whose memory the training process never sees; the collate
concatenates those lists into ``batch["skipped"]`` and the training loop merges them
into one ``SkipLog``, which writes the end-of-run summary. More in docs/internals.md.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

log = logging.getLogger("medcap.data")

BAD_SAMPLE_POLICIES = ("skip", "raise")


class BadSample(Exception):
    """A record that cannot become a training sample, with the reason why.

    ``reason`` is one line that starts with a short category ("image not found",
    "corrupt image", "malformed record", "too long", ...) followed by details;
    ``index`` is the record's position in the dataset when known.
    """

    def __init__(self, reason: str, index: Optional[int] = None):
        self.reason = reason
        self.index = index
        super().__init__(f"sample {index}: {reason}" if index is not None else reason)


def reason_kind(reason: str) -> str:
    """The category of a reason: the text before its first ':' (the whole text if none)."""
    return reason.split(":", 1)[0].strip()


def check_policy(policy: str) -> str:
    if policy not in BAD_SAMPLE_POLICIES:
        raise ValueError(f"bad_samples must be one of {BAD_SAMPLE_POLICIES}, got {policy!r}")
    return policy


SkipEntries = Iterable[Union[Tuple[int, str], List[Any]]]


class SkipLog:
    """Counts skipped samples by index and logs each one the first time it is seen.

    Feed it with :meth:`update` (a collated batch, an item, or a list of
    ``(index, reason)`` pairs). The same index reported again (next epoch, or by
    another worker) is neither logged nor counted twice. Safe to share between
    threads; for processes, ship the pairs back (as the dataset does) and merge.
    """

    def __init__(self, total: Optional[int] = None, logger: Optional[logging.Logger] = None):
        self.total = total
        self._reasons: Dict[int, str] = {}
        self._events = 0
        self._lock = threading.Lock()
        self._log = logger or log

    def __getstate__(self):
        # Locks do not pickle; spawn-started DataLoader workers pickle the dataset holding us.
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def add(self, index: int, reason: str) -> bool:
        """Record one skipped sample; returns True when the index is new."""
        index = int(index)
        with self._lock:
            self._events += 1
            if index in self._reasons:
                return False
            self._reasons[index] = reason
        self._log.warning("skipping sample %d: %s", index, reason)
        return True

    def update(self, entries: Union[Mapping[str, Any], SkipEntries, None]) -> int:
        """Merge ``batch["skipped"]`` / ``item["skipped"]`` (or the dict itself); returns how many were new."""
        if entries is None:
            return 0
        if isinstance(entries, Mapping):
            entries = entries.get("skipped") or ()
        return sum(self.add(i, r) for i, r in entries)

    @property
    def count(self) -> int:
        """Distinct bad samples seen."""
        return len(self._reasons)

    @property
    def events(self) -> int:
        """Times a bad sample was met (counts repeats across epochs)."""
        return self._events

    @property
    def reasons(self) -> Dict[int, str]:
        with self._lock:
            return dict(sorted(self._reasons.items()))

    def by_kind(self) -> Dict[str, int]:
        with self._lock:
            return dict(Counter(reason_kind(r) for r in self._reasons.values()).most_common())

    def state_dict(self) -> Dict[str, Any]:
        """For resumable runs: what has been skipped so far."""
        return {"total": self.total, "reasons": {str(k): v for k, v in self.reasons.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        with self._lock:
            self.total = state.get("total", self.total)
            self._reasons.update({int(k): v for k, v in state.get("reasons", {}).items()})

    def summary(self, max_examples: int = 5) -> str:
        """A few lines for the end of a run: how many, why, and the first few."""
        n = self.count
        of = f" of {self.total}" if self.total else ""
        if n == 0:
            return f"bad samples: none skipped{of}."
        pct = f" ({100.0 * n / self.total:.2f}%)" if self.total else ""
        kinds = ", ".join(f"{c} {k}" for k, c in self.by_kind().items())
        lines = [f"bad samples: {n}{of} skipped{pct}: {kinds}."]
        for i, (idx, reason) in enumerate(self.reasons.items()):
            if i >= max_examples:
                lines.append(f"  ... and {n - max_examples} more")
                break
            lines.append(f"  #{idx}: {reason}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"SkipLog(count={self.count}, total={self.total})"
