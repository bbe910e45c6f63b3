"""Vision checkpoints that are damaged, diverged, mismatched, or written on a full disk."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat

import pytest
import torch

import medcap._io._files as fs
import medcap.models._vision_checkpoint as vision_ckpt
from medcap.models import load_vision_checkpoint, load_vision_weights, save_vision_checkpoint
from medcap.models._vision_checkpoint import sidecar_path

T = 4


@pytest.fixture
def saved(tmp_path, tiny_model):
    """``saved(suffix, seed=0, **meta)`` -> path of a freshly written checkpoint of a tiny model."""

    def write(suffix: str, seed: int = 0, name: str = "v", **meta):
        model = tiny_model(num_image_tokens=T, load_weights=False, seed=seed)
        return save_vision_checkpoint(model, tmp_path / f"{name}{suffix}", meta)

    return write


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("keep", [0, 3, 40, "half", -5])
def test_truncated_weights_name_the_file(saved, suffix, keep):
    path = saved(suffix)
    data = path.read_bytes()
    n = len(data) // 2 if keep == "half" else keep % len(data)
    path.write_bytes(data[:n])
    with pytest.raises(ValueError, match="truncated or corrupt") as err:
        load_vision_checkpoint(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_garbage_weights_name_the_file(saved, suffix):
    path = saved(suffix)
    path.write_bytes(b"\x80\x02" + b"not a checkpoint" * 20)
    with pytest.raises(ValueError, match="truncated or corrupt") as err:
        load_vision_checkpoint(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("damage", [lambda t: t[: len(t) // 2], lambda t: "", lambda t: "[1, 2]", lambda t: "\udcff"])
def test_damaged_sidecar_names_the_sidecar(saved, damage):
    path = saved(".safetensors")
    side = sidecar_path(path)
    side.write_bytes(damage(side.read_text()).encode("utf-8", "surrogateescape"))
    with pytest.raises(ValueError, match="truncated or corrupt") as err:
        load_vision_checkpoint(path)
    assert str(side) in str(err.value)


def test_sidecar_of_other_weights_is_ignored_and_reported(saved, caplog):
    """The header travels inside the weights file, so it wins; a sidecar copied from
    another save (or left by a crash between the two writes) only earns a warning."""
    a = saved(".safetensors", seed=0, name="a", epoch=1)
    b = saved(".safetensors", seed=1, name="b", epoch=7, note="other run")
    shutil.copyfile(sidecar_path(b), sidecar_path(a))
    with caplog.at_level(logging.WARNING, logger="medcap.models"):
        state, meta = load_vision_checkpoint(a)
    assert meta["epoch"] == 1 and "note" not in meta
    assert "does not describe the weights" in caplog.text and "epoch" in caplog.text and "note" in caplog.text
    state_b, _ = load_vision_checkpoint(b)
    assert not torch.equal(state["projector"]["0.weight"], state_b["projector"]["0.weight"])


def test_matching_sidecar_is_silent(saved, caplog):
    path = saved(".safetensors", epoch=2)
    with caplog.at_level(logging.WARNING, logger="medcap.models"):
        _, meta = load_vision_checkpoint(path)
    assert meta["epoch"] == 2 and caplog.text == ""


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_by_name(tmp_path, tiny_model, suffix, value):
    model = tiny_model(num_image_tokens=T, load_weights=False)
    with torch.no_grad():
        model.vision.projector[2].bias[5] = value
    path = save_vision_checkpoint(model, tmp_path / f"v{suffix}")
    target = tiny_model(num_image_tokens=T, load_weights=False, seed=3)
    before = target.vision.projector[2].bias.clone()
    with pytest.raises(ValueError, match=r"tensor projector\.2\.bias holds 1 non-finite value"):
        load_vision_weights(target, path)
    assert torch.equal(target.vision.projector[2].bias, before)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_get_the_users_umask(saved, umask, mode):
    old = os.umask(umask)
    try:
        st = saved(".safetensors")
        pt = saved(".pt")
    finally:
        os.umask(old)
    for p in (st, sidecar_path(st), pt):
        assert stat.S_IMODE(p.stat().st_mode) == mode, p


# ---- full disk

SAFETENSORS_ENOSPC = (
    'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
)
TORCH_ENOSPC = (
    "[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file data/3: file write failed"
)


def _raiser(exc):
    def write(obj, target, *args, **kwargs):
        with open(target, "wb") as f:
            f.write(b"partial")
        raise exc

    return write


@pytest.mark.parametrize(
    "suffix, exc",
    [
        (".safetensors", OSError(errno.ENOSPC, "No space left on device")),
        (".safetensors", RuntimeError(SAFETENSORS_ENOSPC)),
        (".pt", RuntimeError(TORCH_ENOSPC)),
        (".pt", OSError(errno.EDQUOT, "Disk quota exceeded")),
    ],
)
def test_full_disk_says_so_with_the_folder_and_its_free_space(tmp_path, saved, monkeypatch, suffix, exc):
    path = saved(suffix)
    before = path.read_bytes()
    listing = sorted(os.listdir(tmp_path))
    monkeypatch.setattr(fs, "_free_bytes", lambda folder: 3 * 2**20)  # what a full disk reports
    if suffix == ".pt":
        monkeypatch.setattr(torch, "save", _raiser(exc))
    else:
        monkeypatch.setattr(vision_ckpt, "save_file", _raiser(exc))
    with pytest.raises(OSError) as err:
        saved(suffix, seed=1)
    assert err.value.errno == errno.ENOSPC
    msg = str(err.value)
    assert "no space left on device" in msg and str(tmp_path) in msg and "3.0 MiB free" in msg, msg
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == listing


def test_torch_write_failure_with_room_left_is_not_called_a_full_disk(tmp_path, saved, monkeypatch):
    saved(".pt")
    monkeypatch.setattr(fs, "_free_bytes", lambda folder: 50 * 2**30)
    monkeypatch.setattr(torch, "save", _raiser(RuntimeError(TORCH_ENOSPC)))
    with pytest.raises(RuntimeError, match="file write failed"):
        saved(".pt", seed=1)


def test_sidecar_write_on_full_disk_is_reported_too(saved, tmp_path, monkeypatch):
    path = saved(".safetensors")
    real_write_text = type(path).write_text

    def full(self, *a, **k):
        real_write_text(self, "{")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(path), "write_text", full)
    with pytest.raises(OSError, match=r"no space left on device writing v\.json in"):
        saved(".safetensors", seed=1)
    monkeypatch.undo()
    assert json.loads(sidecar_path(path).read_text())["format"] == "medcap-vision"
