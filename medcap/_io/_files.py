"""Files that long jobs share: one writer per file or folder, atomic writes, their
leftovers, and full disks reported as such.

In order:

* ``LockedError`` and ``exclusive_lock(path, what)``: an advisory ``flock`` on a small
  lock file for the ``with`` block; the kernel releases it when the process dies
  (``kill -9`` included), so a stale lock never blocks a restart, and a second process
  is refused at once with the holder's PID;
* ``atomic_write`` (and its ``_bytes`` / ``_text`` forms): a temporary file in the same
  folder, fsynced, then ``os.replace``d in, with the umask's permissions;
  ``remove_stale_tmp``: what a killed writer left;
* ``is_disk_full`` and ``disk_errors``: a full disk, however a library words it, as one
  ``OSError(ENOSPC)`` naming the folder and its free space.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Union

# ---- One writer at a time

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


# ---- Atomic writes and their leftovers

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


def remove_stale_tmp(folder: Union[str, Path], recursive: bool = False, prefixes: Sequence[str] = ()) -> List[Path]:
    """Delete the temporary files of interrupted ``atomic_write`` calls in ``folder``.

    Only names of atomic_write's own pattern (``.NAME.XXXXXXXX.tmp``) are touched, and
    with ``prefixes`` only those whose NAME starts with one of them. Call it holding the
    lock of what it removes: a live writer's temporary file would be removed too.
    Returns the paths removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp")
    removed = []
    for p in sorted(found):
        if prefixes and not p.name[1:].startswith(tuple(prefixes)):
            continue
        if _is_tmp_name(p.name) and p.is_file() and not p.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed


# ---- Full disks

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
