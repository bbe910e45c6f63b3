"""validate-data: the report, the --json output, exit codes, and the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medcap.data import image_chat_dataset, validate_main
from medcap.data._validate import validate_data

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def mixed(tmp_path, dh):
    """A JSON Lines dataset: 4 good (one long, one text-only) and 4 bad records."""
    img = tmp_path / "img"
    for i in range(3):
        dh.save_rgb(img / f"{i}.png", 24, 18, seed=i)
    (img / "garbage.png").write_bytes(b"\x89PNG garbage")
    records = [
        dh.rec(image="0.png", gpt="short."),
        dh.rec(image="1.png", gpt="a much longer caption " * 6),
        dh.rec(human="no image here", gpt="fine.", image=None, meta=None),
        dh.rec(image="2.png", human="<image>\n\nWhat is it?", gpt="a thing."),
        dh.rec(image="garbage.png"),
        dh.rec(image="missing.png"),
        {"conversations": [{"from": "gpt", "value": "no question"}]},
        dh.rec(human="\u2460\u2460", image=None, meta=None),
    ]
    path = dh.write_records(tmp_path / "mixed.jsonl", records, img, jsonl=True)
    return path, {0, 1, 2, 3}, {4: "corrupt image", 5: "image not found", 6: "malformed record", 7: "marker without image"}


def _check(rep, good, bad, tok, path, max_seq_len=None):
    assert rep["total"] == len(good) + len(bad) and rep["good"] == len(good)
    assert {b["index"]: b["reason"].split(":")[0] for b in rep["bad"]} == bad
    assert rep["with_image"] == 3 and rep["text_only"] == 1
    # lengths against the dataset's own items (untruncated)
    ds = image_chat_dataset(tok, source=path, num_image_tokens=5, image_size=16, bad_samples="raise")
    lengths = np.array([len(ds[i]["tokens"]) for i in sorted(good)])
    s = rep["lengths"]
    assert (s["min"], s["max"]) == (lengths.min(), lengths.max())
    assert s["median"] == pytest.approx(np.median(lengths)) and s["p95"] == pytest.approx(np.percentile(lengths, 95))
    if max_seq_len:
        assert rep["truncated"] == int((lengths > max_seq_len).sum()) > 0


def test_validate_data_function_in_parallel(tok, mixed):
    path, good, bad = mixed
    rep = validate_data(path, tok, num_image_tokens=5, image_size=16, max_seq_len=60, workers=2, progress=False)
    _check(rep, good, bad, tok, path, max_seq_len=60)
    assert rep["bad"][0]["where"] == "mixed.jsonl line 5"
    assert rep["tokenizer"] == "given"


def test_validate_main_json_and_exit_codes(tok, mixed, capsys):
    path, good, bad = mixed
    args = [str(path), "--tokenizer", str(tok.paths["path"]), "--special-tokens", str(tok.paths["special_tokens_path"]),
            "--num-image-tokens", "5", "--image-size", "16", "--max-seq-len", "60", "--workers", "0", "--json",
            "--no-progress"]
    assert validate_main(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1  # one JSON object, nothing else on stdout
    _check(json.loads(out[0]), good, bad, tok, path, max_seq_len=60)
    assert validate_main(args + ["--fail-on-bad"]) == 3
    capsys.readouterr()

    assert validate_main([str(path.parent / "nope.json"), "--json", "--no-progress"]) == 1
    assert "dataset file not found" in json.loads(capsys.readouterr().out)["error"]

    # human-readable form names every bad row and the statistics
    assert validate_main(args[:-2] + ["--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "8 records, 4 good" in text and "#5 (mixed.jsonl line 6): image not found" in text
    assert "would be truncated at max_seq_len=60" in text


def test_without_tokenizer_uses_labelled_byte_fallback(mixed, capsys):
    path, good, bad = mixed
    assert validate_main([str(path), "--json", "--workers", "0", "--no-progress", "--num-image-tokens", "5"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["good"] == len(good) and len(rep["bad"]) == len(bad)
    assert rep["tokenizer"].startswith("byte-level fallback")


@pytest.mark.integration
def test_command_line(tok, mixed):
    path, good, bad = mixed
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # One subprocess (each pays the torch import): the console script when installed.
    console = Path(sys.executable).parent / "medcap"
    cmd = [str(console), "validate-data"] if console.exists() else [sys.executable, "-m", "medcap.data"]
    res = subprocess.run(cmd + [str(path), "--json", "--workers", "2", "--num-image-tokens", "5",
                                "--tokenizer", str(tok.paths["path"]),
                                "--special-tokens", str(tok.paths["special_tokens_path"])],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    assert rep["total"] == 8 and rep["good"] == 4
    assert sorted(b["index"] for b in rep["bad"]) == sorted(bad)
    assert "validate mixed.jsonl" in res.stderr  # the progress bar


@pytest.mark.integration
def test_a_run_into_a_log_file_writes_plain_lines_and_no_carriage_return(tok, mixed, tmp_path):
    """Not a terminal: the progress is one plain line (through medcap._io.progress), not a redrawn bar."""
    path, good, bad = mixed
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log = tmp_path / "validate.log"
    with open(log, "w", encoding="utf-8") as out:
        res = subprocess.run([sys.executable, "-m", "medcap.data", str(path), "--workers", "0", "--num-image-tokens",
                              "5", "--tokenizer", str(tok.paths["path"]), "--special-tokens",
                              str(tok.paths["special_tokens_path"])],
                             stdout=out, stderr=subprocess.STDOUT, env=env, timeout=120)  # fmt: skip
    text = log.read_text(encoding="utf-8")
    assert res.returncode == 0, text
    assert "\r" not in text
    assert "validate mixed.jsonl: 8/8 rec (100%)" in text
