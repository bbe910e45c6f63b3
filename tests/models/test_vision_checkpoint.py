"""Vision checkpoints: medcap's safetensors + JSON, the reference's .pt, and their errors."""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from importlib.metadata import version

import pytest
import torch
from open_clip.timm_model import TimmModel
from safetensors import safe_open
from torch import nn
from torchtune.models.llama3_1 import llama3_1

import medcap.models._vision_checkpoint as vision_ckpt
from medcap.models import load_vision_checkpoint, load_vision_weights, save_vision_checkpoint
from medcap.models._model import ImageTower, medcap_fusion

T = 4


def _images(n: int = 2, size: int = 32, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _vision_out(model, images):
    with torch.no_grad():
        return model.eval().vision(images)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("target", ["model", "encoder"])
def test_safetensors_round_trip_with_metadata(tmp_path, tiny_model, target):
    a = tiny_model(num_image_tokens=T, load_weights=False, seed=0)
    b = tiny_model(num_image_tokens=T, load_weights=False, seed=1)
    images = _images()
    assert not torch.allclose(_vision_out(a, images), _vision_out(b, images))

    src = a if target == "model" else a.vision
    path = save_vision_checkpoint(src, tmp_path / "out" / "vision.safetensors", {"epoch": 3, "source": "unit test"})
    assert sorted(os.listdir(tmp_path / "out")) == ["vision.json", "vision.safetensors"]  # no temp files left
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        header = json.loads(f.metadata()["medcap"])
    assert keys == {f"visual.{k}" for k in a.vision.visual.state_dict()} | {
        f"projector.{k}" for k in a.vision.projector.state_dict()
    }
    assert header == json.loads((tmp_path / "out" / "vision.json").read_text())
    expected = dict(
        num_image_tokens=T, embed_dim=64, vision_output_dim=24, projector_hidden_dim=64, projector_in_dim=24,
        projector_out_dim=T * 64, image_size=32, patch_size=8, vision_width=32, vision_depth=2,
        epoch=3, source="unit test", medcap_version=version("medcap"), format="medcap-vision",
    )  # fmt: skip
    assert {k: header[k] for k in expected} == expected

    meta = load_vision_weights(b if target == "model" else b.vision, path)
    assert meta["epoch"] == 3 and meta["checkpoint_format"] == "safetensors"
    torch.testing.assert_close(_vision_out(b, images), _vision_out(a, images), rtol=0, atol=0)
    state, _ = load_vision_checkpoint(path)
    for k, v in a.vision.projector.state_dict().items():
        assert torch.equal(state["projector"][k], v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pt_round_trip_is_the_reference_layout(tmp_path, tiny_model, dtype):
    a = tiny_model(num_image_tokens=T, load_weights=False, seed=0)
    b = tiny_model(num_image_tokens=T, load_weights=False, seed=1)
    path = save_vision_checkpoint(a, tmp_path / "meta_model_0.pt")
    assert sorted(os.listdir(tmp_path)) == ["meta_model_0.pt"]
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"visual", "projector"}
    assert set(raw["projector"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert "head.proj.weight" in raw["visual"] and all(
        k.startswith(("trunk.", "head.proj.")) for k in raw["visual"]
    )
    # a checkpoint saved in bf16 (as a bf16 training run would) loads into the fp32 model
    torch.save({part: {k: v.to(dtype) for k, v in sd.items()} for part, sd in raw.items()}, path)
    meta = load_vision_weights(b, path)
    assert meta["checkpoint_format"] == "legacy-pt" and meta["projector_out_dim"] == T * 64
    for k, v in b.vision.projector.state_dict().items():
        assert torch.equal(v, raw["projector"][k].to(dtype).float()), k


def test_reference_structures_load_and_give_identical_outputs(tmp_path, tiny_llm):
    """The reference's own modules (open_clip TimmModel + Sequential projector), saved as it
    saved them, load into medcap's model and compute the same image tokens."""
    embed_dim, out_dim, hidden = 64, 32, 48
    # timm's small class-token ViT (BiomedCLIP's design, 0.3 M parameters, 160 px) keeps this fast
    name, size = "test_vit", 160
    torch.manual_seed(0)
    ref_tower = TimmModel(name, out_dim, image_size=size, pool="", proj="linear", proj_bias=False)
    ref_projector = nn.Sequential(nn.Linear(out_dim, hidden), nn.GELU(), nn.Linear(hidden, embed_dim * T))
    path = tmp_path / "meta_model_last.pt"
    torch.save({"visual": ref_tower.state_dict(), "projector": ref_projector.state_dict()}, path)

    torch.manual_seed(1)
    sizes = tiny_llm["model_kwargs"]
    decoder = llama3_1(
        vocab_size=sizes["vocab_size"], num_layers=1, num_heads=sizes["num_heads"], num_kv_heads=sizes["num_kv_heads"],
        embed_dim=embed_dim, max_seq_len=64, intermediate_dim=sizes["intermediate_dim"],
    )  # fmt: skip
    model = medcap_fusion(
        decoder=decoder, visual=ImageTower(name, output_dim=out_dim), embed_dim=embed_dim,
        num_image_tokens=T, projector_hidden_dim=hidden, image_token_id=sizes["image_token_id"],
    )  # fmt: skip
    load_vision_weights(model, path)

    assert model.vision.visual.image_size == size
    images = _images(2, size=size)
    model.eval(), ref_tower.eval(), ref_projector.eval()
    with torch.no_grad():
        expected = ref_projector(ref_tower(images)).view(2, T, embed_dim)  # [n, T, d]
        torch.testing.assert_close(model.vision(images), expected, rtol=0, atol=0)
        # and through the fused model, at the placeholders
        tokens = torch.tensor([[1, 2] + [model.image_token_id] * T + [3], [model.image_token_id] * T + [4, 5, 6]])
        fused = model.embed(tokens, images)
        torch.testing.assert_close(fused[0, 2 : 2 + T], expected[0], rtol=0, atol=0)
        torch.testing.assert_close(fused[1, :T], expected[1], rtol=0, atol=0)


def test_state_mapping_from_a_gathered_model(tmp_path, tiny_model):
    a = tiny_model(num_image_tokens=T, load_weights=False, seed=0)
    b = tiny_model(num_image_tokens=T, load_weights=False, seed=1)
    gathered = {"visual": a.vision.visual.state_dict(), "projector": a.vision.projector.state_dict()}
    path = save_vision_checkpoint(gathered, tmp_path / "v.safetensors", {"num_image_tokens": T, "embed_dim": 64})
    load_vision_weights(b, path)
    images = _images()
    torch.testing.assert_close(_vision_out(b, images), _vision_out(a, images), rtol=0, atol=0)
    with pytest.raises(ValueError, match="5 image tokens of 64 = 320 values, but the projector outputs 256"):
        save_vision_checkpoint(gathered, tmp_path / "w.safetensors", {"num_image_tokens": 5, "embed_dim": 64})


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_size_mismatch_is_explained_and_loads_nothing(tmp_path, tiny_model, suffix):
    a = tiny_model(num_image_tokens=T, load_weights=False, seed=0)
    path = save_vision_checkpoint(a, tmp_path / f"v{suffix}")
    fewer = tiny_model(num_image_tokens=2, load_weights=False, seed=1)
    before = _state(fewer)
    expected = (
        "checkpoint projector makes 4 tokens of 64, model expects 2 tokens of 64"
        if suffix == ".safetensors"
        else r"checkpoint projector outputs 256 values per image \(= 4 tokens of 64\?\), model expects 2 tokens of 64"
    )
    with pytest.raises(ValueError, match=expected):
        load_vision_weights(fewer, path)
    assert all(torch.equal(v, before[k]) for k, v in fewer.state_dict().items())

    wider = tiny_model(num_image_tokens=T, load_weights=False, vision_width=48)
    with pytest.raises(ValueError, match="ViT width: checkpoint 32, model 48"):
        load_vision_weights(wider, path)
    bigger_images = tiny_model(num_image_tokens=T, load_weights=False, image_size=64)
    with pytest.raises(ValueError, match="image size: checkpoint 32, model 64"):
        load_vision_weights(bigger_images, path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_failed_write_keeps_the_previous_checkpoint(tmp_path, tiny_model, monkeypatch, suffix):
    a = tiny_model(num_image_tokens=T, load_weights=False, seed=0)
    path = save_vision_checkpoint(a, tmp_path / f"v{suffix}")
    files_before = sorted(os.listdir(tmp_path))
    bytes_before = path.read_bytes()

    def half_write_then_fail(obj, target, *args, **kwargs):
        with open(target, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    if suffix == ".pt":
        monkeypatch.setattr(torch, "save", half_write_then_fail)
    else:
        monkeypatch.setattr(vision_ckpt, "save_file", half_write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_vision_checkpoint(tiny_model(num_image_tokens=T, load_weights=False, seed=1), path)
    assert path.read_bytes() == bytes_before
    assert sorted(os.listdir(tmp_path)) == files_before


class _RunsCode:
    """Unpickling this object would call os.mkdir(marker)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_loading_never_unpickles_code(tmp_path, tiny_model):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    torch.save({"visual": _RunsCode(marker), "projector": {}}, path)
    with pytest.raises(ValueError, match="never runs code"):
        load_vision_weights(tiny_model(load_weights=False), path)
    assert not marker.exists()


def test_bad_files_and_names(tmp_path, tiny_model):
    model = tiny_model(num_image_tokens=T, load_weights=False)
    with pytest.raises(ValueError, match="cannot tell the checkpoint format"):
        save_vision_checkpoint(model, tmp_path / "v.ckpt")
    (tmp_path / "v.ckpt").write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown vision checkpoint suffix"):
        load_vision_checkpoint(tmp_path / "v.ckpt")
    with pytest.raises(FileNotFoundError, match="vision checkpoint not found"):
        load_vision_weights(model, tmp_path / "missing.safetensors")
    with pytest.raises(TypeError, match="MedcapModel or a VisionEncoder"):
        save_vision_checkpoint(nn.Linear(2, 2), tmp_path / "v.pt")

    # BiomedCLIP's own open_clip file is a tower without a projector: say what to do with it
    open_clip_file = tmp_path / "open_clip_pytorch_model.bin"
    state = OrderedDict((f"visual.{k}", v) for k, v in model.vision.visual.state_dict().items())
    state["text.proj.weight"] = torch.zeros(2, 2)
    torch.save(state, open_clip_file)
    with pytest.raises(ValueError, match="give it as vision_pretrained"):
        load_vision_weights(model, open_clip_file)

    not_vision = tmp_path / "other.pt"
    torch.save({"layer.weight": torch.zeros(2)}, not_vision)
    with pytest.raises(ValueError, match="not a medcap vision checkpoint"):
        load_vision_checkpoint(not_vision)
