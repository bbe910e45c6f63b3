"""`medcap caption` and `medcap chat`, run as the real command on the tiny model; the
answers must be what GenerationEngine gives for the same prompts and images."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

MAX_NEW = 16  # tiny/generate's max_new_tokens
QUESTION = "[urgent] Modality: which one?"


@pytest.fixture(scope="module")
def world(tiny_llm, tiny_model, tmp_path_factory):
    """Two PNGs in a folder, a real DICOM, and two vision checkpoints of one model: a
    .pt (no metadata) and a .safetensors recording the LLM folder."""
    import pydicom.data

    from medcap.models import save_vision_checkpoint

    root = tmp_path_factory.mktemp("caption")
    folder = root / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / name)
    model = tiny_model(seed=5)
    pt = root / "ckpt" / "vision.pt"
    st = root / "ckpt" / "vision_with_llm.safetensors"
    pt.parent.mkdir()
    save_vision_checkpoint(model, pt)
    save_vision_checkpoint(model, st, metadata={"llm_dir": tiny_llm["checkpoint_dir"]})
    images = [str(folder / "a.png"), str(folder / "b.png"), pydicom.data.get_testdata_file("CT_small.dcm")]
    return {"root": root, "folder": str(folder), "images": images, "pt": str(pt), "st": str(st), "model": model}


@pytest.fixture(scope="module")
def engine(tiny_llm, world):
    from medcap.generation import GenerationEngine
    from medcap.models import llama3_tokenizer

    tok = llama3_tokenizer(tiny_llm["tokenizer_path"], special_tokens_path=tiny_llm["special_tokens_path"])
    model = world["model"].eval()
    return GenerationEngine(model, tok, batch_size=1)


def _tensor(engine, path):
    from medcap.data import image_transform, load_image

    return image_transform(engine.model.vision.visual.image_size)(load_image(path))


def _expected(engine, messages_or_question, image_path):
    prompt = engine.prompt(messages_or_question)
    return engine.generate_texts([prompt], [_tensor(engine, image_path)], MAX_NEW, ["k"])[0]


def _medcap(*args, env=None, stdin=None, timeout=120):
    full_env = {k: v for k, v in os.environ.items() if k != "MEDCAP_LLM"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "medcap.cli", *args], capture_output=True, text=True, input=stdin,
        env=full_env, timeout=timeout,
    )


def test_caption_folder_and_dicom_with_llm_flag_to_jsonl(tiny_llm, world, engine, tmp_path):
    out = tmp_path / "r.jsonl"
    res = _medcap("caption", world["folder"], world["images"][2], "--config", "tiny/generate",
                  "--llm", tiny_llm["checkpoint_dir"], "--checkpoint", world["pt"], "--out", str(out))
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["image"] for r in rows] == world["images"]
    for row in rows:
        assert row["question"] is None
        assert row["answer"] == _expected(engine, None, row["image"])
        assert f"{row['image']}: {row['answer']}" in res.stdout
    assert "LLM shard 1/1" in res.stderr  # loading progress is shown


def test_caption_question_llm_from_checkpoint_metadata_to_csv(tiny_llm, world, engine, tmp_path):
    out = tmp_path / "r.csv"
    # assets_dir points nowhere: the LLM can only come from the checkpoint's metadata.
    res = _medcap("caption", os.path.join(world["folder"], "*.png"), "--config", "tiny/generate",
                  "assets_dir=/nonexistent", "--checkpoint", world["st"], "--question", QUESTION, "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "the vision checkpoint's metadata" in res.stderr
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == world["images"][:2]
    for row in rows:
        assert row["question"] == QUESTION
        assert row["answer"] == _expected(engine, QUESTION, row["image"])


def test_chat_two_turns_then_q(tiny_llm, world, engine):
    first, second = "What is shown?", "Modality: which one?"
    res = _medcap("chat", world["images"][2], "--config", "tiny/generate", "--checkpoint", world["pt"],
                  env={"MEDCAP_LLM": tiny_llm["checkpoint_dir"]}, stdin=f"{first}\n\n{second}\nq\nnever asked\n")
    assert res.returncode == 0, res.stderr
    replies = [line[len("ASSISTANT: "):] for line in res.stdout.splitlines() if line.startswith("ASSISTANT:")]
    assert len(replies) == 2
    messages = [{"role": "user", "content": "<image>\n\n" + first}]
    assert replies[0] == _expected(engine, messages, world["images"][2])
    messages += [{"role": "assistant", "content": replies[0]}, {"role": "user", "content": second}]
    assert replies[1] == _expected(engine, messages, world["images"][2])


def test_no_llm_anywhere_is_one_line_before_loading(world):
    res = _medcap("caption", world["folder"], "--checkpoint", world["pt"], "--config", "custom_generation_config")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == ("medcap caption: error: the LLM folder "
                                                   "'./models/llama3/Meta-Llama-3.1-8B-Instruct/' is not a folder "
                                                   "(give --llm LLAMA_DIR or set $MEDCAP_LLM)")
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("kind", ["pt", "st"])
def test_a_checkpoint_that_records_no_model_needs_a_config_in_one_line(world, kind):
    """The reference's .pt and a .safetensors that names only its LLM folder: the error says which config to pass."""
    res = _medcap("caption", world["folder"], "--checkpoint", world[kind])
    assert res.returncode == 2 and "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("medcap caption: error: ") and "pass --config custom_generation_config" in last


def test_missing_image_named(world):
    res = _medcap("caption", str(Path(world["folder"]) / "nope.png"), "--checkpoint", world["pt"])
    assert res.returncode == 2
    assert "image not found" in res.stderr and "nope.png" in res.stderr


def test_help_does_not_import_torch():
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "medcap.cli", "caption", "-h"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "--checkpoint" in res.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in res.stderr.splitlines()}
    assert "torch" not in imported
