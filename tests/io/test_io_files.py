"""Files shared by runs: atomic_write (one everywhere, what a killed or failed writer leaves,
what a new run removes) and disk_errors (only a full disk is reworded)."""

from __future__ import annotations

import errno
import signal
import subprocess
import sys
import textwrap

import pytest

import medcap.models._vision_checkpoint
import medcap.training._state
from medcap._io import atomic_write, disk_errors, remove_stale_tmp


def test_one_atomic_write_everywhere():
    assert medcap.models._vision_checkpoint.atomic_write is atomic_write  # vision checkpoints
    assert medcap.training._state.atomic_write is atomic_write  # the recipe's state


def test_kill_9_mid_write_leaves_a_temp_file_that_the_next_run_removes(tmp_path):
    target = tmp_path / "meta_model_last.safetensors"
    target.write_bytes(b"previous checkpoint")
    script = textwrap.dedent(
        f"""
        import os, signal
        from medcap._io import atomic_write

        def write(tmp):
            with open(tmp, "wb") as f:
                f.write(b"half of a new checkpoint")
            os.kill(os.getpid(), signal.SIGKILL)

        atomic_write({str(target)!r}, write)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    left = [p for p in tmp_path.iterdir() if p != target]
    assert len(left) == 1 and left[0].name.startswith(".meta_model_last.safetensors.")
    assert target.read_bytes() == b"previous checkpoint"

    assert remove_stale_tmp(tmp_path) == left
    assert sorted(tmp_path.iterdir()) == [target]


KEEP = [
    "notes.tmp",  # not hidden
    ".hidden.tmp",  # no random part
    ".v.safetensors.tmp",
    ".v.safetensors.abcdefg.tmp",  # 7 characters
    ".v.safetensors.ABCDEFGH.tmp",  # mkstemp never uses capitals
    ".v.safetensors.abcd-fgh.tmp",
    "..abcdefgh.tmp",  # no target name
    ".v.safetensors.abcdefgh.tmp.bak",
    "v.safetensors",
    ".v.safetensors.abcdefgh.temp",
]
STALE = [".v.safetensors.abcdefgh.tmp", ".recipe_state.pt.k2_9xq0z.tmp", ".v.json.00000000.tmp"]


def test_only_atomic_writes_own_names_are_removed(tmp_path):
    for name in KEEP + STALE:
        (tmp_path / name).write_text("x")
    (tmp_path / ".dir.abcdefgh.tmp").mkdir()  # a folder of that name is not ours
    sub = tmp_path / "epoch_0"
    sub.mkdir()
    (sub / ".v.pt.abcdefgh.tmp").write_text("x")

    removed = remove_stale_tmp(tmp_path)
    assert sorted(p.name for p in removed) == sorted(STALE)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(KEEP + [".dir.abcdefgh.tmp", "epoch_0"])
    assert (sub / ".v.pt.abcdefgh.tmp").exists()  # not recursive unless asked
    assert remove_stale_tmp(tmp_path, recursive=True) == [sub / ".v.pt.abcdefgh.tmp"]
    assert remove_stale_tmp(tmp_path / "missing") == []


def test_a_failed_write_removes_its_temp_file_and_keeps_the_old_content(tmp_path):
    target = tmp_path / "results.csv"
    atomic_write(target, lambda tmp: open(tmp, "w").write("old"))

    def crash(tmp):
        open(tmp, "w").write("new, half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert target.read_text() == "old" and sorted(tmp_path.iterdir()) == [target]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "x.txt"
    atomic_write(path, lambda tmp: open(tmp, "w").write("old"))

    def crash(tmp):
        open(tmp, "w").write("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(path, crash)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]  # no temporary left behind


def test_other_errors_pass_through_unchanged(tmp_path):
    with pytest.raises(PermissionError):
        with disk_errors(tmp_path):
            raise PermissionError(errno.EACCES, "Permission denied")
    with pytest.raises(ValueError, match="^plain$"):
        with disk_errors(tmp_path):
            raise ValueError("plain")
