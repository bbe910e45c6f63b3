"""A lone surrogate escape (JSON "\\ud800") is a bad record everywhere records are read.

Python decodes the escape into a str that cannot be encoded as UTF-8, so such a
record used to pass validation and training and crash the evaluation's results
file. Written by hand below: json.dumps would refuse to write the file as UTF-8.
"""

from __future__ import annotations

import csv
import json

import pytest

from medcap.data import image_chat_dataset, validate_main
from medcap.data._validate import validate_data
from medcap.eval import read_caption_set

PH50 = "\\u2460" * 50  # the escape text of fifty placeholders, as written in the file

# (line, expected bad reason fragment or None for a good record)
LINES = [
    ('{"conversations": [{"from": "human", "value": "%s"}, {"from": "gpt", "value": "fine."}], "image": "a.png"}', None),
    ('{"conversations": [{"from": "human", "value": "%s"}, {"from": "gpt", "value": "bad \\ud800 caption"}], "image": "a.png"}',
     "message 1 (gpt) holds a lone surrogate \\ud800 at character 4"),
    ('{"conversations": [{"from": "human", "value": "%s what \\udfff?"}, {"from": "gpt", "value": "ok"}], "image": "a.png"}',
     "message 0 (human) holds a lone surrogate \\udfff"),
    ('{"conversations": [{"from": "human", "value": "%s"}, {"from": "gpt", "value": "ok"}], "image": "a\\udc80.png"}',
     "'image' holds a lone surrogate \\udc80 at character 1"),
    # a surrogate *pair* is one valid character (U+1F600) and stays a good record
    ('{"conversations": [{"from": "human", "value": "%s"}, {"from": "gpt", "value": "smile \\ud83d\\ude00"}], "image": "a.png"}', None),
]  # fmt: skip


@pytest.fixture()
def surrogates(tmp_path, dh):
    dh.save_rgb(tmp_path / "a.png", 20, 20)
    path = tmp_path / "caps.jsonl"
    path.write_text("\n".join(line % PH50 for line, _ in LINES) + "\n", encoding="ascii")
    bad = {i: why for i, (_, why) in enumerate(LINES) if why}
    return path, bad


def test_validate_data_reports_each_lone_surrogate(tok, surrogates):
    path, bad = surrogates
    rep = validate_data(path, tok, num_image_tokens=5, image_size=16, workers=0, progress=False)
    assert rep["good"] == 2 and rep["bad_by_kind"] == {"malformed record": 3}
    got = {b["index"]: b["reason"] for b in rep["bad"]}
    assert sorted(got) == sorted(bad)
    for i, why in bad.items():
        assert got[i].startswith("malformed record: ") and why in got[i], got[i]


def test_validate_data_command_prints_the_reasons(tok, surrogates, capsys):
    path, bad = surrogates
    code = validate_main([str(path), "--tokenizer", str(tok.paths["path"]), "--special-tokens",
                          str(tok.paths["special_tokens_path"]), "--num-image-tokens", "5", "--image-size", "16",
                          "--workers", "0", "--no-progress", "--json"])  # fmt: skip
    assert code == 0
    rep = json.loads(capsys.readouterr().out)
    assert [b["where"] for b in rep["bad"]] == [f"caps.jsonl line {i + 1}" for i in sorted(bad)]


def test_training_skips_them(tok, surrogates):
    path, bad = surrogates
    ds = image_chat_dataset(tok, source=path, num_image_tokens=5, image_size=16, bad_samples="skip")
    item = ds[1]  # bad 1, 2 and 3 are passed over to the good record 4
    assert item["index"] == 4 and [i for i, _ in item["skipped"]] == [1, 2, 3]
    assert all("lone surrogate" in why for _, why in item["skipped"])
    with pytest.raises(Exception, match="lone surrogate"):
        image_chat_dataset(tok, source=path, num_image_tokens=5, image_size=16, bad_samples="raise")[1]


def test_evaluation_leaves_them_out_and_says_so(surrogates, tmp_path):
    path, bad = surrogates
    items, report = read_caption_set(path)
    assert [it.answer for it in items] == ["fine.", "smile \U0001F600"]
    assert report["records"] == 5 and report["kept"] == 2 and report["bad"] == 3
    assert all("lone surrogate" in b for b in report["bad_examples"])
    # what used to crash: every kept text goes into a UTF-8 results file
    with open(tmp_path / "results.csv", "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([it.image, it.answer, json.dumps(it.messages, ensure_ascii=False)] for it in items)
