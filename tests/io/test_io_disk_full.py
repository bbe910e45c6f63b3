"""A full disk at each low-level write path is one line naming the file, its folder
and the free space, and leaves the file as it was: a lock file is removed, an append
is cut back to the bytes before it, an atomic write leaves the old file. The lock file
is removed when its holder is done, without letting two processes hold it."""

from __future__ import annotations

import errno
import fcntl
import json
import os

import pytest

from medcap._io import DiskFullError, append_durably, atomic_write_bytes, atomic_write_text, exclusive_lock

ONE_LINE = r"^no space left on device writing {name} in {folder} \([0-9.]+ (bytes|KiB|MiB|GiB|TiB) free\): free some " \
           r"space and run the same command again$"


def _says_disk_full(e: BaseException, name: str, folder) -> None:
    import re

    assert isinstance(e, DiskFullError) and e.errno == errno.ENOSPC
    text = str(e)
    assert "\n" not in text and re.match(ONE_LINE.format(name=re.escape(name), folder=re.escape(str(folder))), text), text


def test_the_lock_file_on_a_full_disk(tmp_path, full_disk):
    lock = tmp_path / ".r.csv.lock"
    full_disk.fill(r"\.lock$")
    with pytest.raises(DiskFullError) as e:
        with exclusive_lock(lock, "the results file r.csv"):
            pytest.fail("the block must not run without the lock's PID written")
    _says_disk_full(e.value, lock.name, tmp_path)
    assert not lock.exists()
    full_disk.free()
    with exclusive_lock(lock, "the results file r.csv"):
        assert lock.read_text() == f"{os.getpid()}\n"
    assert not lock.exists()  # removed when the holder is done


def test_an_append_on_a_full_disk_leaves_the_bytes_before_it(tmp_path, full_disk):
    path = tmp_path / "rows.partial.csv"
    append_durably(path, b"header\n", create=True)
    append_durably(path, b"row 1\n")
    full_disk.fill(r"^rows\.partial\.csv$")
    with pytest.raises(DiskFullError) as e:
        append_durably(path, b"row 2, long enough to be cut in the middle\n")
    _says_disk_full(e.value, path.name, tmp_path)
    assert full_disk.hits == 2  # a short write, then ENOSPC: half a row reached the file, and was cut off
    assert path.read_bytes() == b"header\nrow 1\n"
    full_disk.free()
    append_durably(path, b"row 2\n")
    assert path.read_bytes() == b"header\nrow 1\nrow 2\n"
    with pytest.raises(FileNotFoundError):
        append_durably(tmp_path / "absent.csv", b"x")  # never created unless asked
    assert not (tmp_path / "absent.csv").exists()


def test_an_atomic_write_on_a_full_disk_leaves_the_old_file(tmp_path, full_disk):
    path = tmp_path / "scores.csv"
    atomic_write_text(path, "old\n")
    full_disk.fill(r"^\.scores\.csv\.\w+\.tmp$")
    for write in (lambda: atomic_write_text(path, "new\n" * 1000), lambda: atomic_write_bytes(path, b"new")):
        with pytest.raises(DiskFullError) as e:
            write()
        _says_disk_full(e.value, path.name, tmp_path)
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["scores.csv"]


def test_a_library_worded_full_disk_keeps_its_words(tmp_path):
    from medcap._io import disk_errors

    with pytest.raises(DiskFullError, match=r"run the same command again \(SafetensorError: Error while "
                                            r"serializing: No space left on device \(os error 28\)\)$"):
        with disk_errors(tmp_path, what="w.safetensors"):
            from safetensors import SafetensorError

            raise SafetensorError("Error while serializing: No space left on device (os error 28)")


def test_the_results_cache_and_journal_on_a_full_disk_resume_byte_identical(tmp_path, full_disk):
    from medcap.eval._results import CsvJournal, JsonlCache

    columns = ["key", "output"]
    rows = [{"key": str(i), "output": f"answer {i}, with a comma"} for i in range(6)]
    expected_csv = tmp_path / "expected" / "r.csv"
    uninterrupted = CsvJournal(expected_csv, columns, bom=True)
    uninterrupted.append(rows[:3])
    uninterrupted.append(rows[3:])
    cache_expected = JsonlCache(tmp_path / "expected" / "d.jsonl", {"model": "m"})
    cache_expected.put_many({"a.png": "a caption"})
    cache_expected.put_many({"b.png": "b caption"})

    journal = CsvJournal(tmp_path / "r.csv", columns, bom=True)
    journal.append(rows[:3])
    cache = JsonlCache(tmp_path / "d.jsonl", {"model": "m"})
    cache.put_many({"a.png": "a caption"})
    full_disk.fill(r"^(r\.partial\.csv|d\.jsonl)$")
    for fail in (lambda: journal.append(rows[3:]), lambda: cache.put_many({"b.png": "b caption"})):
        with pytest.raises(DiskFullError) as e:
            fail()
        assert str(e.value).count("\n") == 0 and "free)" in str(e.value)
    full_disk.free()
    # the next run reopens both (nothing to repair: the failed appends left nothing) and goes on
    again = CsvJournal(tmp_path / "r.csv", columns, bom=True)
    assert again.rows() == journal.rows() and not again.damage_report()
    again.append(rows[3:])
    cache = JsonlCache(tmp_path / "d.jsonl", {"model": "m"})
    assert dict(cache.data) == {"a.png": "a caption"}
    cache.put_many({"b.png": "b caption"})
    assert again.path.read_bytes() == uninterrupted.path.read_bytes()
    assert (tmp_path / "d.jsonl").read_bytes() == (tmp_path / "expected" / "d.jsonl").read_bytes()
    assert [json.loads(x)["key"] for x in (tmp_path / "d.jsonl").read_text().splitlines()] == \
        ["__fingerprint__", "a.png", "b.png"]


def test_a_lock_won_on_a_removed_file_is_dropped_and_taken_again(tmp_path, monkeypatch):
    """The race the removal opens: a second process opens the lock file, the holder
    removes it and lets go, the second one's flock then succeeds on a file no longer
    there. It must notice, and lock the file that is there."""
    lock = tmp_path / ".x.lock"
    real_flock = fcntl.flock
    calls = []

    def holder_finishes_first(fd, op):
        calls.append(fd)
        if len(calls) == 1:
            os.unlink(lock)  # the holder was done: its file is gone (and a third run made a new one)
            lock.write_text("4242\n")
        return real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", holder_finishes_first)
    with exclusive_lock(lock, "the results file x"):
        assert lock.read_text() == f"{os.getpid()}\n"  # the file that is there now, rewritten as ours
        assert len(calls) == 2
        fd = os.open(lock, os.O_RDWR)  # and it is really held: another open file cannot lock it
        try:
            with pytest.raises(BlockingIOError):
                real_flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    assert not lock.exists()
