"""Captioning: the caption set's reader, the metrics against pycocoevalcap's own scorers,
and the missing-Java error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medcap.eval import SuiteRun, caption_metrics, check_java, read_caption_set, run_test_metrics
from medcap.eval._captions import METRIC_NAMES, JavaNotFoundError, write_metrics_csv
from medcap.testing import make_caption_dataset

REFS = [
    "A small lesion in the left lower lobe.",
    "No acute cardiopulmonary abnormality.",
    "Large mass, right upper quadrant; 5 cm.",
    "Axial CT of the abdomen shows a cyst.",
]
CANDS = [
    "a lesion in the left lower lobe",
    "",
    "A large mass in the right upper quadrant.",
    "CT of the abdomen showing a renal cyst",
]


@pytest.mark.slow
def test_metrics_equal_pycocoevalcaps_own_pipeline(tmp_path):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ours = caption_metrics(REFS, CANDS)
    assert list(ours) == list(METRIC_NAMES)

    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": r}] for i, r in enumerate(REFS)})
    res = tok.tokenize({i: [{"caption": c}] for i, c in enumerate(CANDS)})
    for i in range(len(REFS)):  # an empty caption can lose its line in the PTB tokenizer
        res.setdefault(i, [""])
    expect = {}
    bleu, _ = Bleu(4).compute_score(gts, res)
    expect.update({f"Bleu_{n + 1}": b for n, b in enumerate(bleu)})
    expect["METEOR"], _ = Meteor().compute_score(gts, res)
    expect["ROUGE_L"], _ = Rouge().compute_score(gts, res)
    expect["CIDEr"], _ = Cider().compute_score(gts, res)
    assert ours == pytest.approx(expect, abs=1e-9)
    assert 0 < ours["Bleu_1"] < 1 and ours["CIDEr"] > 0

    path = write_metrics_csv(tmp_path / "metrics-x.csv", ours)
    lines = path.read_text().splitlines()
    assert [ln.split(",")[0] for ln in lines] == list(METRIC_NAMES)
    assert all(len(ln.split(",")[1].split(".")[1]) == 6 for ln in lines)


def test_missing_java_is_a_clear_error_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without java
    with pytest.raises(JavaNotFoundError, match="(?s)Java.*install"):
        check_java()
    with pytest.raises(JavaNotFoundError):
        caption_metrics(["a"], ["a"])

    class NoEngine:
        def __getattr__(self, name):
            raise AssertionError("generation must not start without Java")

    with pytest.raises(JavaNotFoundError):
        run_test_metrics(NoEngine(), SuiteRun(output_dir=tmp_path, ckpt="c", image_loader=None, progress=False),
                         dataset_source=str(tmp_path / "x.json"), max_new_tokens=4)


def test_caption_set_prompt_is_the_conversation_before_the_first_answer(tmp_path):
    path = make_caption_dataset(tmp_path, n=3, image_size=32)
    recs = json.loads(path.read_text())
    recs[1]["conversations"][0]["value"] += "\n\nDescribe the image."
    recs.append({"conversations": [{"from": "gpt", "value": "no question"}], "image": "x.png", "meta": f"dir={tmp_path}"})
    path.write_text(json.dumps(recs))
    items, report = read_caption_set(path)
    assert report["bad"] == 1 and len(items) == 3
    assert [it.answer for it in items] == [r["conversations"][1]["value"] for r in recs[:3]]
    assert items[1].messages == [{"role": "user", "content": "<image>\n\nDescribe the image."}]
    assert [it.image for it in items] == [r["image"] for r in recs[:3]]  # the record's own value
    assert all(Path(it.file).is_file() and Path(it.file).name == Path(it.image).name for it in items)


@pytest.mark.slow
def test_a_carriage_return_would_shift_the_captions_after_it_in_pycocoevalcap():
    """Why medcap writes a reply's ``\\r`` as ``\\n``: pycocoevalcap's PTB tokenizer joins the
    captions one per line after turning ``\\n`` into a space, but not ``\\r``, which Java
    then reads as a line break: every later caption is scored against the wrong line."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    check_java()
    tok = PTBTokenizer()
    with_cr = tok.tokenize({0: [{"caption": "a small\rnodule"}], 1: [{"caption": "no finding"}]})
    with_lf = tok.tokenize({0: [{"caption": "a small\nnodule"}], 1: [{"caption": "no finding"}]})
    assert with_lf == {0: ["a small nodule"], 1: ["no finding"]}
    assert with_cr[0] == ["a small"] and with_cr[1] != ["no finding"]  # caption 1 got caption 0's tail
