"""What long jobs need from the operating system: one writer per file or folder, atomic
writes, full disks reported as such, and progress that reads well in a terminal or a log.

Files shared by runs: one writer per folder or results file, atomic writes,
their leftovers, and full disks.

``exclusive_lock(path, what)`` takes an advisory ``flock`` on a small lock file
for as long as the ``with`` block runs. The kernel releases it when the process
dies (``kill -9`` included), so a stale lock never blocks a restart; a second
process asking for the same lock is refused at once with the holder's PID.

Progress that reads well on a terminal and in a log file.

On a terminal: a tqdm bar. Anywhere else (a log file, a batch job's output) a
bar's carriage-return redraws pile up into megabytes of unreadable text, so
:func:`progress` writes one plain line every ``every_s`` seconds instead, and
a last one when it closes:

    train: 120/400 steps (30%) | 1.95 steps/s | elapsed 1:01 | ETA 2:23 | loss=1.234

Usage::

    with progress(len(loader), "train", "steps") as bar:
        for batch in loader:
            ...
            bar.update(1, loss=loss.item())
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, TextIO, Union

# ---- Files: locks, atomic writes, full disks -------------------------------------

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


# ---------------------------------------------------------------------------------------
# atomic writes, their leftovers, and full disks

_TMP_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789_"
_TMP_RANDOM_LEN = 8  # tempfile.mkstemp's length, so leftovers of older medcap versions match too


def _tmp_name(path: Path) -> Path:
    import secrets

    rand = "".join(secrets.choice(_TMP_ALPHABET) for _ in range(_TMP_RANDOM_LEN))
    return path.with_name(f".{path.name}.{rand}.tmp")


def _is_tmp_name(name: str) -> bool:
    """``.NAME.XXXXXXXX.tmp`` as made by ``atomic_write`` (and by mkstemp in older versions)."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return False
    stem = name[1 : -len(".tmp")]
    target, dot, rand = stem.rpartition(".")
    return bool(
        dot and target and len(rand) == _TMP_RANDOM_LEN and all(c in _TMP_ALPHABET for c in rand)
    )


def _umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: the only portable read sets it, briefly
    os.umask(mask)
    return mask


def _create_tmp(path: Path) -> Path:
    for _ in range(100):
        tmp = _tmp_name(path)
        try:
            fd = os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"could not create a temporary file beside {path}")


def atomic_write(path: Union[str, Path], write: Callable[[str], None]) -> Path:
    """Write through a temporary file in the same folder, fsync it, then ``os.replace`` it in.

    ``write`` gets the temporary file's name (``.NAME.XXXXXXXX.tmp``, permissions from
    the umask); if it (or anything after it) fails, the temporary file is removed and
    ``path`` keeps its previous content. A full disk is reported by :func:`disk_errors`.
    Only a killed process leaves the temporary file behind: :func:`remove_stale_tmp`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with disk_errors(path.parent, what=path.name):
        tmp = _create_tmp(path)
        try:
            write(str(tmp))
            # Writers such as safetensors replace the file with their own 0600 one; give the
            # result the permissions any new file of the user gets, so a shared group can read it.
            os.chmod(tmp, 0o666 & ~_umask())
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    return path


def atomic_write_bytes(path: Union[str, Path], data: bytes) -> Path:
    """``data`` into ``path`` through :func:`atomic_write`."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: Union[str, Path], text: str) -> Path:
    """``text`` (UTF-8) into ``path`` through :func:`atomic_write`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_tmp(folder: Union[str, Path], recursive: bool = False) -> List[Path]:
    """Delete the temporary files of interrupted ``atomic_write`` calls in ``folder``.

    Only names of atomic_write's own pattern (``.NAME.XXXXXXXX.tmp``) are touched.
    Call it when a run starts, holding the folder's lock: a live writer's temporary
    file in the same folder would be removed too. Returns the paths removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp")
    removed = []
    for p in sorted(found):
        if _is_tmp_name(p.name) and p.is_file() and not p.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed


_ENOSPC_TEXT = re.compile(
    r"no space left on device|os error 28|errno 28|storagefull|disk quota exceeded|not enough space", re.I
)
# torch.save's C++ writer drops the errno: "file write failed" / "unexpected pos N vs M"
_TORCH_WRITE_FAILED = re.compile(r"file write failed|unexpected pos \d+ vs \d+", re.I)
_NEARLY_FULL = 64 * 2**20


def _free_bytes(folder: Path) -> Optional[int]:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _human(n: Optional[int]) -> str:
    if n is None:
        return "unknown"
    if n < 1024:
        return f"{n} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"


def _chain(e: BaseException) -> Iterator[BaseException]:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def is_disk_full(e: BaseException, folder: Union[str, Path, None] = None) -> bool:
    """Whether ``e`` (or an exception it wraps) means the disk or the quota is full."""
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if _ENOSPC_TEXT.search(str(x)):
            return True
        if folder is not None and _TORCH_WRITE_FAILED.search(str(x)):
            free = _free_bytes(Path(folder))
            return free is not None and free < _NEARLY_FULL
    return False


@contextlib.contextmanager
def disk_errors(folder: Union[str, Path], what: str = "") -> Iterator[None]:
    """Turn a full disk raised by any library (OSError ENOSPC, safetensors' text,
    torch.save's RuntimeError) into one ``OSError(ENOSPC)`` naming the folder and its free space."""
    try:
        yield
    except Exception as e:
        if not is_disk_full(e, folder):
            raise
        folder = Path(folder)
        thing = f" writing {what}" if what else ""
        raise OSError(
            errno.ENOSPC,
            f"no space left on device{thing} in {folder} ({_human(_free_bytes(folder))} free): "
            f"free some space or write elsewhere (original error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
        ) from e


# ---- Progress and quiet logs -----------------------------------------------------

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


# ----------------------------------------------------------------------------- library noise

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
