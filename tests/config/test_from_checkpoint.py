"""A generation config's model sections, filled from what a checkpoint records: what the config
gives wins key by key, a checkpoint that records nothing is one line naming the config to pass,
and reading a checkpoint's description needs no torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medcap.config import ConfigError, GenerateConfig, from_config
from medcap.config._from_checkpoint import fill_sections, read_metadata

EMPTY = {"model": None, "tokenizer": None, "checkpointer": None, "dtype": None}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from medcap.models import save_vision_checkpoint
    from medcap.testing import make_described_checkpoint, make_tiny_llm

    root = tmp_path_factory.mktemp("described")
    llm = make_tiny_llm(root / "llm")
    made = make_described_checkpoint(root / "run" / "meta_model_last.safetensors", llm)
    save_vision_checkpoint(made["model"], root / "run" / "reference.pt")
    save_vision_checkpoint(made["model"], root / "run" / "older.safetensors", metadata={"llm_dir": str(root / "llm")})
    return {"path": made["path"], "root": root, "llm": llm, "sections": made["sections"]}


def test_every_section_comes_from_the_checkpoint(ckpt):
    filled = fill_sections(EMPTY, ckpt["path"])
    s, llm = ckpt["sections"], ckpt["llm"]
    assert filled["model"] == s["model"]
    assert filled["checkpointer"] == {"checkpoint_dir": str(Path(llm["checkpoint_dir"]).resolve()),
                                      "checkpoint_files": ["model.safetensors"], "model_type": "LLAMA3"}
    assert filled["tokenizer"] == {"_component_": "medcap.models.llama3_tokenizer", "path": llm["tokenizer_path"],
                                   "special_tokens_path": llm["special_tokens_path"], "max_seq_len": None}
    assert filled["dtype"] == "fp32"


def test_what_the_config_gives_wins_key_by_key(ckpt, tmp_path):
    given = dict(EMPTY, model={"max_seq_len": 128}, dtype="bf16")
    filled = fill_sections(given, ckpt["path"])
    assert filled["model"] == {**ckpt["sections"]["model"], "max_seq_len": 128} and filled["dtype"] == "bf16"
    # another LLM folder: its own tokenizer is used, found where the recorded one lay in the recorded folder
    moved = tmp_path / "llm_elsewhere"
    shutil.copytree(ckpt["llm"]["checkpoint_dir"], moved)
    filled = fill_sections(dict(EMPTY, checkpointer={"checkpoint_dir": str(moved)}), ckpt["path"])
    assert filled["checkpointer"] == {"checkpoint_dir": str(moved)}
    assert filled["tokenizer"]["path"] == str(moved / "original" / "tokenizer.model")
    whole = {"model": {"_component_": "x.y"}, "tokenizer": {"_component_": "t"}, "checkpointer": {"checkpoint_dir": "d"},
             "dtype": "fp16"}
    assert fill_sections(whole, ckpt["path"]) == whole  # a complete config is left as it is


def test_a_checkpoint_that_records_no_model_is_one_line_naming_the_config(ckpt):
    for name, why in (("reference.pt", "a reference .pt records nothing"),
                      ("older.safetensors", "written before checkpoints described their model")):
        with pytest.raises(ConfigError) as e:
            fill_sections(EMPTY, str(ckpt["root"] / "run" / name))
        assert why in str(e.value) and "pass --config custom_generation_config" in str(e.value)
        assert "\n" not in str(e.value)


def test_a_missing_llm_folder_and_a_damaged_header_are_named(ckpt, tmp_path):
    meta = read_metadata(ckpt["path"])
    moved = tmp_path / "alone.safetensors"
    shutil.copy(ckpt["path"], moved)  # the checkpoint alone, elsewhere: its LLM is not beside it
    meta_llm = meta["llm"]["checkpoint_dir"]
    hidden = Path(meta_llm).with_name("llm_hidden")
    Path(meta_llm).rename(hidden)
    try:
        with pytest.raises(ConfigError, match="checkpointer.checkpoint_dir=DIR"):
            fill_sections(EMPTY, str(moved))
    finally:
        hidden.rename(meta_llm)
    broken = tmp_path / "cut.safetensors"
    broken.write_bytes(Path(ckpt["path"]).read_bytes()[:100])
    with pytest.raises(ConfigError, match="truncated or corrupt"):
        fill_sections(EMPTY, str(broken))


def test_the_generate_config_without_a_model_takes_the_checkpoints(ckpt):
    conf = from_config(GenerateConfig, {"vision_checkpoint": ckpt["path"], "image": ckpt["path"]})
    assert conf.model == ckpt["sections"]["model"] and conf.dtype == "fp32"
    assert conf.checkpointer.checkpoint_files == ["model.safetensors"]
    conf.check()
    with pytest.raises(ConfigError, match="names no model"):
        from_config(GenerateConfig, {"image": ckpt["path"]})


def test_the_description_is_read_without_torch(ckpt):
    code = ("import json, sys; from medcap.config._from_checkpoint import read_metadata; "
            f"m = read_metadata({ckpt['path']!r}); print(json.dumps([m['model']['_component_'], 'torch' in sys.modules]))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert json.loads(res.stdout) == ["medcap.models.medcap_tiny", False], res.stderr
