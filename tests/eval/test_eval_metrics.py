"""Captioning metrics against pycocoevalcap's own scorers, and the missing-Java error."""

from __future__ import annotations

import pytest

from medcap.eval import caption_metrics, check_java, run_test_metrics
from medcap.eval._scoring import METRIC_NAMES, JavaNotFoundError, write_metrics_csv

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
        run_test_metrics(NoEngine(), dataset_source=str(tmp_path / "x.json"), output_dir=tmp_path, ckpt="c",
                         max_new_tokens=4, image_loader=None, progress=False)
