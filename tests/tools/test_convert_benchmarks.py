"""tools/convert_to_sharegpt.py --dataset slake / pathvqa: training splits as
question/answer records, with the same bad-record reporting as the other sources."""

from __future__ import annotations

import json
import re

from PIL import Image

from medcap.data import convert_main
from medcap.testing import make_hf_parquet_layout, make_slake_layout

PH = "\u2460"


def _summary(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_slake_train_english_questions(tmp_path, capsys):
    want = make_slake_layout(tmp_path)
    base = tmp_path / "Slake1.0"
    (base / "test.json").rename(base / "train.json")
    assert convert_main(["--dataset", "slake", "--data-dir", str(tmp_path), "--save-dir", str(tmp_path / "out"),
                         "--no-progress"]) == 0
    summary = _summary(capsys)
    assert summary["written"] == {"slake_train.json": 4}
    assert summary["skipped"]["SLAKE train"] == {"other language than en": 2, "empty text": 1, "no image name": 1,
                                                 "missing image": 1}
    assert any("validate.json not written" in w for w in summary["warnings"])
    recs = json.loads((tmp_path / "out" / "slake_train.json").read_text(encoding="utf-8"))
    got = [(r["image"], r["conversations"][0]["value"], r["conversations"][1]["value"]) for r in recs]
    assert got == [(img, PH * 50 + "\n" + q, a) for img, q, a, _ in want["english"]]
    assert recs[0]["meta"] == "dir=../Slake1.0/imgs"  # relative to the JSON file: the tree can move


def test_pathvqa_train_images_written_once_outside_the_data(tmp_path, capsys):
    make_hf_parquet_layout(tmp_path, "path-vqa")
    data = tmp_path / "path-vqa" / "data"
    for p in data.glob("test-*.parquet"):
        p.rename(p.with_name(p.name.replace("test-", "train-")))
    out = tmp_path / "out"
    assert convert_main(["--dataset", "pathvqa", "--data-dir", str(tmp_path), "--save-dir", str(out), "--no-progress"]) == 0
    summary = _summary(capsys)
    assert summary["written"] == {"pathvqa_train.json": 3}
    assert summary["skipped"]["PathVQA train"] == {"missing image": 1, "empty text": 1, "corrupt image": 1}
    recs = json.loads((out / "pathvqa_train.json").read_text(encoding="utf-8"))
    assert [r["conversations"][1]["value"] for r in recs] == ["yes", "liver", "no"]
    assert recs[0]["conversations"][0]["value"] == PH * 50 + "\nis there a tumor?"
    files = sorted((out / "pathvqa_images").iterdir())
    assert len(files) == 3 and all(f.suffix == ".jpg" for f in files)
    modes = {Image.open(out / "pathvqa_images" / r["image"]).mode for r in recs}
    assert modes == {"CMYK", "RGB"}  # the bytes as published; the training loader converts them
    assert sorted(p.name for p in data.iterdir()) == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]


def test_missing_training_splits_are_an_error(tmp_path, capsys):
    assert convert_main(["--dataset", "pathvqa", "--data-dir", str(tmp_path), "--save-dir", str(tmp_path / "o")]) == 1
    assert "PathVQA" in capsys.readouterr().err


def test_progress_off_a_terminal_is_plain_lines_without_carriage_return(tmp_path, capsys):
    """capsys's stderr is no terminal: each split reports through medcap._io.progress as plain lines."""
    make_slake_layout(tmp_path)
    (tmp_path / "Slake1.0" / "test.json").rename(tmp_path / "Slake1.0" / "train.json")
    make_hf_parquet_layout(tmp_path, "path-vqa")
    for p in (tmp_path / "path-vqa" / "data").glob("test-*.parquet"):
        p.rename(p.with_name(p.name.replace("test-", "train-")))
    for dataset in ("slake", "pathvqa"):
        assert convert_main(["--dataset", dataset, "--data-dir", str(tmp_path), "--save-dir", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    assert re.search(r"^SLAKE train: (\d+)/\1 rec \(100%\) \| ", err, re.M), err
    assert re.search(r"^PathVQA train: \d+ rec \| ", err, re.M), err
