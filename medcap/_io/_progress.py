"""What a user sees while a long job runs: progress that reads well on a terminal and in a
log file, and library noise held back.

In order:

* ``progress``: on a terminal a tqdm bar; anywhere else (a log file, a batch job's
  output), where a bar's carriage-return redraws pile up into megabytes of unreadable
  text, one plain line every ``every_s`` seconds and a last one at ``close()``:

      train: 120/400 steps (30%) | 1.95 steps/s | elapsed 1:01 | ETA 2:23 | loss=1.234

* ``quiet_library_noise``: torchtune's lines printed once, known-harmless warnings not at all;
* ``quiet_stderr_fd``: child processes' stderr (Java's PTB tokenizer, METEOR) held back
  unless the block fails.

Usage: ``with progress(len(loader), "train", "steps") as bar: ... bar.update(1, loss=x)``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import time
from typing import Any, Callable, Iterator, Optional, TextIO

# ---- Progress

def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _value(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class _Progress:
    """What both kinds offer: ``update(n, **postfix)``, ``close()``, a context manager."""

    def update(self, n: int = 1, **postfix: Any) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Silent(_Progress):
    def update(self, n: int = 1, **postfix: Any) -> None:
        pass

    def close(self) -> None:
        pass


class _Bar(_Progress):
    def __init__(self, total, desc, unit, file):
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc=desc, unit=unit, file=file, dynamic_ncols=True)

    def update(self, n: int = 1, **postfix: Any) -> None:
        if postfix:
            self._bar.set_postfix({k: _value(v) for k, v in postfix.items()}, refresh=False)
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()


class _Lines(_Progress):
    """One self-contained line per ``every_s`` seconds: count, rate, elapsed, ETA, postfix."""

    def __init__(self, total, desc, unit, file, every_s, clock):
        self.total, self.desc, self.unit, self.file = total, desc, unit, file
        self.every_s, self._now = every_s, clock
        self.n = 0
        self.postfix: dict = {}
        self._start = self._last = clock()
        self._closed = False

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.n += n
        self.postfix.update(postfix)
        if self._now() - self._last >= self.every_s:
            self._write()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._write(done=True)

    def line(self, done: bool = False) -> str:
        elapsed = max(self._now() - self._start, 1e-9)
        rate = self.n / elapsed
        count = f"{self.n}/{self.total}" if self.total else str(self.n)
        parts = [f"{self.desc}: {count} {self.unit}" if self.desc else f"{count} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(f"{rate:.3g} {self.unit}/s")
        parts.append(f"elapsed {_clock(elapsed)}")
        if not done and self.total and rate > 0:
            parts.append(f"ETA {_clock((self.total - self.n) / rate)}")
        if self.postfix:
            parts.append(" ".join(f"{k}={_value(v)}" for k, v in self.postfix.items()))
        return " | ".join(parts)

    def _write(self, done: bool = False) -> None:
        self._last = self._now()
        self.file.write(self.line(done) + "\n")
        self.file.flush()


def progress(
    total: Optional[int] = None,
    desc: str = "",
    unit: str = "it",
    *,
    enabled: bool = True,
    every_s: float = 30.0,
    file: Optional[TextIO] = None,
    clock: Callable[[], float] = time.monotonic,
) -> _Progress:
    """A progress reporter for ``total`` units (``None``: unknown).

    ``file`` (default ``sys.stderr``, looked up at call time): a tqdm bar when it is a
    terminal, otherwise a plain line every ``every_s`` seconds and one at ``close()``.
    ``enabled=False`` (the ``progress`` config key) reports nothing.
    """
    if not enabled:
        return _Silent()
    stream = sys.stderr if file is None else file
    if _is_tty(stream):
        return _Bar(total, desc, unit, stream)
    return _Lines(total, desc, unit, stream, every_s, clock)


# ---- Library noise

# Warnings known to be harmless in medcap's own code paths, by the logger that emits them.
_HARMLESS = {
    # The tiny and demo LLMs keep Llama 3.1's rope scaling (original context 8192) with a
    # context of a few hundred positions on purpose: the same rope code as the 8B model.
    "transformers.modeling_rope_utils": re.compile(r"original_max_position_embeddings field must be less than"),
}


class _DropMatching(logging.Filter):
    def __init__(self, pattern: "re.Pattern[str]"):
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet_library_noise() -> None:
    """Call once logging is configured (``logging.basicConfig``): every torchtune line
    is printed once, and the harmless library warnings above not at all."""
    # torchtune's get_logger gives its logger a handler of its own when torchtune is imported
    # before logging is configured; with the root's handler that prints each line (the
    # seed line) twice.
    tt = logging.getLogger("torchtune.utils._logging")
    if logging.getLogger().handlers:
        for handler in list(tt.handlers):
            if type(handler) is logging.StreamHandler:
                tt.removeHandler(handler)
    for name, pattern in _HARMLESS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMatching) for f in logger.filters):
            logger.addFilter(_DropMatching(pattern))


@contextlib.contextmanager
def quiet_stderr_fd() -> Iterator[None]:
    """Hold back what child processes (Java's PTB tokenizer, METEOR) write to the stderr
    file descriptor, which ``contextlib.redirect_stderr`` cannot reach; it is written
    out after all if the block fails, so an error message is never lost."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (AttributeError, OSError, ValueError):  # no real stderr (embedded, closed)
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            os.write(2, held.read())
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
