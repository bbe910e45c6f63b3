"""medcap.models._load: one way to build a model with its weights, for training and generation."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file

from medcap.models import medcap_tiny, save_vision_checkpoint
from medcap.models._load import DTYPES, load_model, resolve_dtype


def _cfg_model(tiny_llm, **extra):
    return {"_component_": "medcap.models.medcap_tiny", **tiny_llm["model_kwargs"], "num_image_tokens": 4, **extra}


def _cfg_ckpt(tiny_llm):
    return {"checkpoint_dir": tiny_llm["checkpoint_dir"], "checkpoint_files": tiny_llm["checkpoint_files"]}


class _Tok:
    def __init__(self, image_id):
        self.image_id = image_id


@pytest.fixture(scope="module")
def vision_ckpt(tiny_llm, tmp_path_factory):
    """A vision checkpoint from a model seeded differently from any load_model build."""
    torch.manual_seed(123)
    src = medcap_tiny(**tiny_llm["model_kwargs"], num_image_tokens=4)
    path = tmp_path_factory.mktemp("vision") / "v.safetensors"
    save_vision_checkpoint(src, path)
    return path, {k: v.clone() for k, v in src.vision.state_dict().items()}


def test_dtype_table():
    assert DTYPES == {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    assert resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match=r"dtype='fp8'.*bf16"):
        resolve_dtype("fp8")


def test_generation_load_has_both_weights_and_is_frozen(tiny_llm, vision_ckpt):
    path, vision_sd = vision_ckpt
    model = load_model(
        _cfg_model(tiny_llm), _cfg_ckpt(tiny_llm), device="cpu", dtype="fp32",
        tokenizer=_Tok(tiny_llm["image_token_id"]), vision_checkpoint=str(path),
    )
    hf = load_file(f"{tiny_llm['checkpoint_dir']}/{tiny_llm['checkpoint_files'][0]}")
    assert torch.equal(model.decoder.output.weight, hf["lm_head.weight"])
    for k, v in model.vision.state_dict().items():
        assert torch.equal(v, vision_sd[k]), k
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training


def test_training_load_leaves_only_vision_trainable(tiny_llm, vision_ckpt):
    model = load_model(
        _cfg_model(tiny_llm), _cfg_ckpt(tiny_llm), device="cpu", dtype="bf16",
        vision_checkpoint=str(vision_ckpt[0]), train_vision=True,
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("encoders.image.") for n in trainable)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_vision_checkpoint_means_pretrained_tower_is_not_read(tiny_llm, vision_ckpt, tmp_path):
    # A pretrained file that does not exist: reading it would fail.
    cfg = _cfg_model(tiny_llm, vision_pretrained=str(tmp_path / "missing_open_clip.bin"))
    load_model(cfg, _cfg_ckpt(tiny_llm), device="cpu", dtype="fp32", vision_checkpoint=str(vision_ckpt[0]))
    load_model(cfg, _cfg_ckpt(tiny_llm), device="cpu", dtype="fp32", vision_weights_follow=True, train_vision=True)


def test_foreign_tokenizer_refused_before_weights_are_read(tiny_llm, tmp_path):
    ckpt = {"checkpoint_dir": str(tmp_path / "no_such_llm")}  # would raise FileNotFoundError if reached
    with pytest.raises(ValueError, match="do not belong together"):
        load_model(_cfg_model(tiny_llm), ckpt, device="cpu", dtype="fp32", tokenizer=_Tok(7))


def test_not_a_medcap_model_is_named(tiny_llm):
    with pytest.raises(TypeError, match="torch.nn.Linear"):
        load_model({"_component_": "torch.nn.Linear", "in_features": 2, "out_features": 2},
                   _cfg_ckpt(tiny_llm), device="cpu", dtype="fp32")


def test_llm_loading_logs_each_shard_and_the_time(tiny_llm, caplog):
    caplog.set_level("INFO", logger="medcap")
    load_model(_cfg_model(tiny_llm), _cfg_ckpt(tiny_llm), device="cpu", dtype="fp32", train_vision=True)
    text = caplog.text
    shard = tiny_llm["checkpoint_files"][0]
    assert "1 shard(s)" in text
    assert re.search(rf"LLM shard 1/1 {re.escape(shard)} \(\d+\.\d [KMG]B\) read in \d+\.\d s", text)
    assert re.search(r"LLM loaded: \d+ tensors in \d+\.\d s", text)
