"""The start of a run: its checkpoint folder (lock, resume or refuse, overwrite, stale
temporary files) and where its vision tower starts."""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from medcap._io import LockedError
from medcap.training import check_vision_start, open_run_folder
from medcap.training._start import checkpoint_lock_path


def _open(folder, resume="no", overwrite=False, before_claim=None):
    stack = contextlib.ExitStack()
    try:
        return open_run_folder(
            folder, resume=resume, overwrite=overwrite, recipe_checkpoint=None, stack=stack, before_claim=before_claim
        )
    finally:
        stack.close()


def _used_folder(tmp_path, with_state=True):
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "meta_model_0.safetensors").write_bytes(b"w0")
    if with_state:
        (folder / "recipe_state.pt").write_bytes(b"s")
    (folder / "notes.txt").write_text("mine")
    return folder


def test_a_fresh_folder_starts_a_new_run_even_with_auto(tmp_path):
    assert _open(tmp_path / "new", resume="no").resuming is False
    assert _open(tmp_path / "new2", resume="auto").resuming is False


def test_auto_resumes_a_folder_with_state(tmp_path):
    folder = _used_folder(tmp_path)
    run = _open(folder, resume="auto")
    assert run.resuming is True and run.state_path == str(folder / "recipe_state.pt")


def test_a_new_run_refuses_a_used_folder_and_changes_nothing(tmp_path):
    folder = _used_folder(tmp_path)
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(FileExistsError) as e:
        _open(folder, resume="no")
    msg = str(e.value)
    for needle in ("already holds a run", "meta_model_0.safetensors", "recipe_state.pt",
                   "resume_from_checkpoint=True", "overwrite=True", "checkpointer.output_dir"):
        assert needle in msg
    assert sorted(p.name for p in folder.iterdir()) == before


def test_auto_without_state_refuses_checkpoints_of_another_run(tmp_path):
    folder = _used_folder(tmp_path, with_state=False)
    with pytest.raises(FileExistsError, match="no resumable state.*overwrite=True"):
        _open(folder, resume="auto")


def test_overwrite_deletes_only_the_old_runs_files(tmp_path, caplog):
    folder = _used_folder(tmp_path)
    with caplog.at_level(logging.WARNING, logger="medcap.training"):
        assert _open(folder, resume="no", overwrite=True).resuming is False
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    assert "meta_model_0.safetensors" in caplog.text


def test_overwrite_waits_for_the_other_checks(tmp_path):
    """A run refused for another reason (here: where its vision tower starts) deletes nothing."""
    folder = _used_folder(tmp_path)

    def refuse(resuming):
        raise ValueError("no vision source")

    with pytest.raises(ValueError, match="no vision source"):
        _open(folder, overwrite=True, before_claim=refuse)
    assert (folder / "meta_model_0.safetensors").is_file() and (folder / "recipe_state.pt").is_file()


@pytest.mark.parametrize("resume", ["yes", "auto"])
def test_overwrite_cannot_go_with_resume(tmp_path, resume):
    with pytest.raises(ValueError, match="overwrite=True.*resume_from_checkpoint"):
        _open(tmp_path / "c", resume=resume, overwrite=True)


def test_resume_true_without_state_says_how_to_start(tmp_path):
    with pytest.raises(FileNotFoundError, match="resume_from_checkpoint=True but there is no resumable state.*auto"):
        _open(tmp_path / "c", resume="yes")


def test_stale_temporary_files_are_removed_and_logged(tmp_path, caplog):
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    stale = [folder / ".recipe_state.pt.k2j4x9ab.tmp", folder / ".meta_model_last.safetensors.abc_1234.tmp"]
    for p in stale:
        p.write_bytes(b"half")
    kept = [folder / ".hidden.tmp", folder / "notes.tmp"]  # not atomic_write's names
    for p in kept:
        p.write_bytes(b"k")
    with caplog.at_level(logging.INFO, logger="medcap.training"):
        assert _open(folder).resuming is False
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    for p in stale:
        assert str(p) in caplog.text


def test_the_folder_is_locked_while_another_process_trains(tmp_path):
    folder = tmp_path / "checkpoint"
    lock = checkpoint_lock_path(folder)
    assert lock == (tmp_path / ".checkpoint.lock").resolve()  # beside the folder, not in it
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\nfrom medcap._io import exclusive_lock\n"
         "with exclusive_lock(sys.argv[1], 'test'):\n    print('held', flush=True)\n    time.sleep(60)\n",
         str(lock)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=rf"checkpoint folder .* in use by process {holder.pid}") as e:
            _open(folder)
        assert e.value.holder == holder.pid
    finally:
        holder.kill()
        holder.wait()
    assert _open(folder).resuming is False  # the kernel released the dead holder's lock


# ---- Where the vision tower starts

def _vision_cfg(**over):
    cfg = OmegaConf.create({"vision_checkpoint": None, "model": {"vision_pretrained": None}})
    for k, v in over.items():
        OmegaConf.update(cfg, k, v, force_add=True)
    return cfg


def test_no_vision_source_refuses_naming_both_keys():
    with pytest.raises(ValueError) as e:
        check_vision_start(_vision_cfg(), resuming=False)
    msg = str(e.value)
    assert "model.vision_pretrained" in msg and "vision_checkpoint" in msg and "vision_random_init=True" in msg


def test_vision_sources(tmp_path):
    assert "random" in check_vision_start(_vision_cfg(vision_random_init=True), resuming=False)
    assert check_vision_start(_vision_cfg(), resuming=True) == "the recipe state"
    ckpt = tmp_path / "meta_model_last.pt"
    ckpt.write_bytes(b"x")
    assert str(ckpt) in check_vision_start(_vision_cfg(vision_checkpoint=str(ckpt)), resuming=False)
    (tmp_path / "open_clip_pytorch_model.bin").write_bytes(b"x")
    assert str(tmp_path) in check_vision_start(_vision_cfg(**{"model.vision_pretrained": str(tmp_path)}), resuming=False)


@pytest.mark.parametrize("key", ["vision_checkpoint", "model.vision_pretrained"])
def test_a_missing_local_vision_file_is_named(tmp_path, key):
    missing = str(tmp_path / "nope.bin")
    with pytest.raises(FileNotFoundError, match=rf"{key}=.*nope\.bin"):
        check_vision_start(_vision_cfg(**{key: missing}), resuming=False)


def test_vision_random_init_must_be_a_bool():
    with pytest.raises(ValueError, match="vision_random_init must be True or False"):
        check_vision_start(_vision_cfg(vision_random_init="yes"), resuming=False)
