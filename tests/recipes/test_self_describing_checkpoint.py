"""A checkpoint the training recipe writes records its model, and every command uses it alone:
`medcap caption` without --config gives the text it gives with the config the model was trained
with, `medcap run generate vision_checkpoint=...` needs no --config, `medcap serve --checkpoint`
reads the same model, and a moved run folder is still found."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SINGLE = "tiny/full_finetune_single_device"
QUESTION = "What is shown?"


@pytest.fixture(scope="module")
def run(train_assets, train_config, train_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("described") / "run"
    cfg = train_config(SINGLE, train_assets, out, epochs=1, max_steps_per_epoch=2)
    train_run(cfg)
    return {"ckpt": out / "checkpoint" / "meta_model_last.safetensors", "assets": train_assets, "out": out,
            "image": str(Path(train_assets["train_json"]).parent / "images" / "img_0001.png")}


def _medcap(*args, stdin=None):
    env = {k: v for k, v in os.environ.items() if k != "MEDCAP_LLM"}
    return subprocess.run([sys.executable, "-m", "medcap.cli", *args], capture_output=True, text=True, env=env,
                          input=stdin, timeout=300)


def test_the_checkpoint_records_what_it_takes_to_use_it(run):
    meta = json.loads(run["ckpt"].with_suffix(".json").read_text())
    a = run["assets"]
    llm = str(Path(a["checkpoint_dir"]).resolve())
    # tiny/full_finetune_single_device.yaml on the tiny assets, by hand
    assert meta["model"] == {"_component_": "medcap.models.medcap_tiny", "vocab_size": 268, "image_token_id": 268,
                             "num_image_tokens": 4}
    assert meta["llm"]["checkpoint_dir"] == llm and meta["llm"]["checkpoint_files"] == ["model.safetensors"]
    assert meta["llm"]["hf_config"] == json.loads((Path(llm) / "config.json").read_text())
    assert meta["llm"]["relative_to_checkpoint"] == os.path.relpath(llm, run["ckpt"].parent)
    assert meta["tokenizer"]["path"] == a["tokenizer_path"] and meta["tokenizer"]["path_in_llm_dir"] == "original/tokenizer.model"
    assert meta["tokenizer"]["special_tokens_path"] == a["special_tokens_path"]
    assert (meta["image_token_id"], meta["num_image_tokens"], meta["dtype"]) == (268, 4, "fp32")
    assert meta["image_transform"]["size"] == 32 and meta["image_transform"]["mean"] == [0.48145466, 0.4578275, 0.40821073]
    assert meta["vision_tower"] == {"timm_model": "vit_base_patch16_224", "output_dim": 24, "timm_kwargs": {
        "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}}
    assert meta["prompt_format"]["chat_template"] == "llama3" and meta["prompt_format"]["placeholder_char"] == "\u2460"
    assert meta["training"]["recipe"] == "full_finetune_single_device"
    assert meta["training"]["dataset"]["source"] == a["train_json"] and meta["global_step"] == 2


@pytest.mark.slow
@pytest.mark.integration
def test_caption_without_a_config_equals_caption_with_the_training_config(run, tmp_path):
    ckpt, image = str(run["ckpt"]), run["image"]
    alone = _medcap("caption", image, "--checkpoint", ckpt, "--question", QUESTION)
    with_config = _medcap("caption", image, "--checkpoint", ckpt, "--question", QUESTION, "--config", "tiny/generate",
                          f"assets_dir={run['assets']['assets_dir']}", "--max-new-tokens", "300")
    assert alone.returncode == 0 and with_config.returncode == 0, alone.stderr + with_config.stderr
    assert "(from the checkpoint)" in alone.stderr
    assert alone.stdout == with_config.stdout and alone.stdout.startswith(f"{image}: ")
    res = _medcap("run", "generate", f"vision_checkpoint={ckpt}", f"image={image}", f"prompt={QUESTION}",
                  "temperature=0", "top_k=null", f"output_dir={tmp_path}")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == alone.stdout.strip()
    chat = _medcap("chat", image, "--checkpoint", ckpt, stdin=f"{QUESTION}\nq\n")  # the first turn: the same prompt
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.strip() == "ASSISTANT: " + alone.stdout.strip()[len(f"{image}: "):]


def test_serve_reads_the_model_from_the_checkpoint(run):
    from medcap.serve._main import _parser, read_model_config

    args = _parser().parse_args(["--checkpoint", str(run["ckpt"])])
    assert args.config is None and args.demo is None
    conf = read_model_config("checkpoint/generate", [f"vision_checkpoint={args.checkpoint}"])
    assert conf.model["_component_"] == "medcap.models.medcap_tiny" and conf.dtype == "fp32"
    assert conf.checkpointer.checkpoint_dir == str(Path(run["assets"]["checkpoint_dir"]).resolve())
    assert conf.tokenizer["special_tokens_path"] == run["assets"]["special_tokens_path"]


def test_a_run_folder_moved_with_its_llm_is_found_relative_to_the_checkpoint(run, tmp_path):
    from medcap.config import GenerateConfig, from_config

    # the run and the assets, moved together into another folder; the old places are gone
    a = run["assets"]
    common = Path(os.path.commonpath([run["out"], a["assets_dir"]]))
    moved = tmp_path / "moved"
    for src in (run["out"], Path(a["assets_dir"])):
        shutil.copytree(src, moved / src.relative_to(common))
    ckpt = moved / run["ckpt"].relative_to(common)
    meta = json.loads(ckpt.with_suffix(".json").read_text())
    meta["llm"]["checkpoint_dir"] = str(tmp_path / "gone")  # what a moved folder's absolute path amounts to
    meta["tokenizer"]["path"] = meta["tokenizer"]["special_tokens_path"] = str(tmp_path / "gone" / "x")
    from medcap.models import load_vision_checkpoint, save_vision_checkpoint

    state, _ = load_vision_checkpoint(ckpt)
    save_vision_checkpoint(state, ckpt, metadata={k: v for k, v in meta.items() if k not in ("path", "checkpoint_format")})
    conf = from_config(GenerateConfig, {"vision_checkpoint": str(ckpt), "image": run["image"]})
    llm = moved / Path(a["checkpoint_dir"]).relative_to(common)
    assert conf.checkpointer.checkpoint_dir == os.path.normpath(llm)
    assert conf.tokenizer["path"] == str(Path(conf.checkpointer.checkpoint_dir) / "original" / "tokenizer.model")
    conf.check()


def test_serve_without_a_model_says_how_to_give_one():
    res = _medcap("serve")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == (
        "medcap serve: error: give --checkpoint CKPT (a checkpoint medcap trained, or a folder `medcap export` "
        "wrote), --config CONFIG [key=value ...], or --demo DIR")
