"""Llama weights from HF checkpoint folders, cross-checked against transformers."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from medcap.models import load_llama_weights
from medcap.models._model import hf_llama3_1_config


def _text_tokens(vocab_size: int, b: int = 2, s: int = 24) -> torch.Tensor:
    # ids below the vocabulary size: the image placeholder (== vocab size) is excluded
    return torch.randint(0, vocab_size, (b, s), generator=torch.Generator().manual_seed(0))


def _hf_logits(checkpoint_dir, tokens):
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(checkpoint_dir).eval()
    with torch.no_grad():
        return hf(tokens).logits.float()


def _vision_state(model):
    return {k: v.clone() for k, v in model.vision.state_dict().items()}


def test_logits_match_transformers(tiny_llm, tiny_model):
    model = tiny_model(load_weights=False).eval()
    tokens = _text_tokens(tiny_llm["model_kwargs"]["vocab_size"])
    expected = _hf_logits(tiny_llm["checkpoint_dir"], tokens)
    vision_before = _vision_state(model)
    with torch.no_grad():
        assert (model(tokens) - expected).abs().max() > 1e-2  # random decoder: far off

    info = load_llama_weights(model, tiny_llm["checkpoint_dir"])
    with torch.no_grad():
        got = model(tokens)
    assert (got - expected).abs().max() < 1e-4
    assert info["num_tensors"] == len([k for k in model.state_dict() if k.startswith("decoder.")])
    # the vision side is not touched
    for k, v in model.vision.state_dict().items():
        assert torch.equal(v, vision_before[k]), k


@pytest.fixture(scope="module")
def sharded_llm(tmp_path_factory, tiny_llm):
    """The same architecture saved by transformers in several safetensors shards."""
    from transformers import LlamaForCausalLM

    sizes = {k: v for k, v in tiny_llm["model_kwargs"].items() if k not in ("vocab_size", "image_token_id")}
    torch.manual_seed(7)
    hf = LlamaForCausalLM(hf_llama3_1_config(tiny_llm["model_kwargs"]["vocab_size"], **sizes))
    out = tmp_path_factory.mktemp("sharded")
    # two shards: torchtune's checkpointer runs a full gc.collect per shard (~0.7 s here)
    hf.save_pretrained(out, max_shard_size="300KB")
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 1
    tokens = _text_tokens(tiny_llm["model_kwargs"]["vocab_size"])
    return out, files, tokens, _hf_logits(out, tokens)


@pytest.mark.parametrize("how", ["default", "dict"])
def test_sharded_checkpoint_loads_in_any_file_form(tiny_model, tiny_llm, sharded_llm, how):
    out, files, tokens, expected = sharded_llm
    checkpoint_files = {
        "default": None,
        "dict": {"filename_format": "model-{}-of-{}.safetensors", "max_filename": f"{len(files):05d}"},
    }[how]
    model = tiny_model(load_weights=False).eval()
    load_llama_weights(model, out, checkpoint_files)
    with torch.no_grad():
        assert (model(tokens) - expected).abs().max() < 1e-4


@pytest.mark.parametrize(
    "sizes, message",
    [
        ({"num_layers": 3}, r"missing from the checkpoint \(9\): decoder\.layers\.2\."),
        ({"num_layers": 1}, r"not in the model \(9\): decoder\.layers\.1\."),
        ({"intermediate_dim": 96}, r"different sizes .*mlp\.w1\.weight: checkpoint \[128, 64\], model \[96, 64\]"),
    ],
)
def test_decoder_mismatch_is_reported_and_loads_nothing(tiny_llm, tiny_model, sizes, message):
    model = tiny_model(load_weights=False, **sizes)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        load_llama_weights(model, tiny_llm["checkpoint_dir"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bad_checkpoint_folders(tmp_path, tiny_llm, tiny_model):
    model = tiny_model(load_weights=False)
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        load_llama_weights(model, tmp_path / "nowhere")

    only_config = tmp_path / "only_config"
    only_config.mkdir()
    shutil.copy(f"{tiny_llm['checkpoint_dir']}/config.json", only_config)
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors files"):
        load_llama_weights(model, only_config)
    with pytest.raises(FileNotFoundError, match="model-00009"):
        load_llama_weights(model, only_config, ["model-00009-of-00009.safetensors"])

    no_config = tmp_path / "no_config"
    no_config.mkdir()
    shutil.copy(f"{tiny_llm['checkpoint_dir']}/{tiny_llm['checkpoint_files'][0]}", no_config)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_llama_weights(model, no_config)

    with pytest.raises(ValueError, match="unknown model_type 'LLAMA9'"):
        load_llama_weights(model, tiny_llm["checkpoint_dir"], model_type="LLAMA9")
    with pytest.raises(ValueError, match="filename_format"):
        load_llama_weights(model, tiny_llm["checkpoint_dir"], {"max_filename": "00001"})
    assert json.loads((only_config / "config.json").read_text())["num_hidden_layers"] == 2
