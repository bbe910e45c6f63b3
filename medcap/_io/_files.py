"""Files that long jobs share: one writer per file or folder, atomic writes, their
leftovers, and full disks reported as such.

In order:

* ``LockedError`` and ``exclusive_lock(path, what)``: an advisory ``flock`` on a small
  lock file for the ``with`` block; the kernel releases it when the process dies
  (``kill -9`` included), so a stale lock never blocks a restart, and a second process
  is refused at once with the holder's PID; the file is removed when the block ends;
* ``atomic_write`` (and its ``_bytes`` / ``_text`` forms): a temporary file in the same
  folder, fsynced, then ``os.replace``d in, with the umask's permissions;
  ``append_durably``: bytes appended and fsynced, or none of them;
  ``remove_stale_tmp``: what a killed writer left;
* ``DiskFullError``, ``is_disk_full`` and ``disk_errors``: a full disk, however a library
  words it, as one line naming the file, its folder and the free space.
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


def _open_locked(path: Path, what: str, hint: str) -> int:
    """A descriptor of ``path`` holding its flock. A holder removes the file when it is done
    (``exclusive_lock``), so a lock won on a file already removed is a lock on nothing:
    it is dropped and the path opened again (the file must still be the one locked)."""
    while True:
        with disk_errors(path.parent, what=path.name):
            fd = os.open(str(path), os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = _read_pid(path)
            who = f"process {holder}" if holder else "another process"
            raise LockedError(
                f"{what} is in use by {who} (lock {path}). Wait for it to finish or stop it"
                + (f"; {hint}" if hint else "; two runs must not write the same files"),
                holder,
            ) from None
        if _same_file(fd, path):
            return fd
        os.close(fd)  # removed (and maybe made again) by the holder that just finished


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


@contextlib.contextmanager
def exclusive_lock(path: Union[str, Path], what: str, hint: str = "") -> Iterator[Path]:
    """Hold an exclusive lock on ``path`` (created if needed) for the ``with`` block.

    ``what`` names the thing protected in the refusal message ("the results file X"),
    ``hint`` says how to proceed. The lock file holds the holder's PID while it is held,
    and is removed at the end of the block, before the lock is released: a process that
    opened it meanwhile finds, once it has the lock, that the path is gone, and starts
    over on a new file (``_open_locked``). Only a killed process leaves it behind, and
    the next run takes it over.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _open_locked(path, what, hint)
    try:
        with disk_errors(path.parent, what=path.name):
            os.ftruncate(fd, 0)
            write_all(fd, f"{os.getpid()}\n".encode("ascii"))
        yield path
    finally:
        try:
            if _same_file(fd, path):
                os.unlink(path)  # still locked: nobody can hold a lock on it any more
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

    def write(tmp: str) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
        try:
            write_all(fd, data)
        finally:
            os.close(fd)

    return atomic_write(path, write)


def atomic_write_text(path: Union[str, Path], text: str) -> Path:
    """``text`` (UTF-8) into ``path`` through :func:`atomic_write`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until all of ``data`` is written (it may write less: a signal, a nearly full disk)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def append_durably(path: Union[str, Path], data: bytes, *, create: bool = False) -> None:
    """Append ``data`` to ``path`` and fsync it. If that fails (a full disk: one
    ``DiskFullError``), the file is cut back to its length before (removed, if this call
    made it), so it never ends in part of ``data``. Without ``create``, a missing file
    is a ``FileNotFoundError``."""
    path = Path(path)
    made = create and not path.exists()
    with disk_errors(path.parent, what=path.name):
        fd = os.open(str(path), os.O_WRONLY | os.O_APPEND | (os.O_CREAT if create else 0), 0o666)
        try:
            before = os.fstat(fd).st_size
            try:
                write_all(fd, data)
                os.fsync(fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, before)
                    if made:
                        os.unlink(path)  # as it was: absent
                raise
        finally:
            os.close(fd)


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


class DiskFullError(OSError):
    """A full disk or quota, as one line (``str(e)``): the file, its folder, the free space,
    what to do (``advising`` replaces that), the library's own words if they add any."""

    HINT = "free some space and run the same command again"

    def __init__(self, where: str, said: str = "", hint: str = HINT):
        self.where, self.said, self.hint = where, said, hint
        super().__init__(errno.ENOSPC, f"{where}: {hint}{said}")

    def __str__(self) -> str:
        return self.strerror

    def advising(self, hint: str) -> "DiskFullError":
        return DiskFullError(self.where, self.said, hint)


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
    torch.save's RuntimeError) into one ``DiskFullError`` naming the file, the folder and
    its free space; the library's own words are added when they say more than ENOSPC."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        if not is_disk_full(e, folder):
            raise
        folder = Path(folder)
        thing = f" writing {what}" if what else ""
        plain = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
        said = "" if plain else f" ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        where = f"no space left on device{thing} in {folder} ({_human(_free_bytes(folder))} free)"
        raise DiskFullError(where, said) from e
