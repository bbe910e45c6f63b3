"""Files shared by runs: one writer per folder or results file.

``exclusive_lock(path, what)`` takes an advisory ``flock`` on a small lock file
for as long as the ``with`` block runs. The kernel releases it when the process
dies (``kill -9`` included), so a stale lock never blocks a restart; a second
process asking for the same lock is refused at once with the holder's PID.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path
from typing import Iterator, Union


class LockedError(RuntimeError):
    """Another live process holds the lock (``.holder`` is its PID, or None if unknown)."""

    def __init__(self, message: str, holder: int | None = None):
        super().__init__(message)
        self.holder = holder


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii").split()
        return int(text[0]) if text else None
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def exclusive_lock(path: Union[str, Path], what: str, hint: str = "") -> Iterator[Path]:
    """Hold an exclusive lock on ``path`` (created if needed) for the ``with`` block.

    ``what`` names the thing protected in the refusal message ("the results file X"),
    ``hint`` says how to proceed. The lock file holds the holder's PID; it is left in
    place on exit (removing it would race with a process that has just opened it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(path), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = _read_pid(path)
            who = f"process {holder}" if holder else "another process"
            raise LockedError(
                f"{what} is in use by {who} (lock {path}). Wait for it to finish or stop it"
                + (f"; {hint}" if hint else "; two runs must not write the same files"),
                holder,
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the flock
