"""The demo's figures and report (``medcap.demo._scores``, ``_targets``, ``_report``): seen and
unseen halves scored apart, chance per half, the targets against control and chance,
report.png with its test images (found as the data loader finds them, from any working
folder), a missing image said, the legends clear of the bars."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medcap.demo._settings import DemoSettings
from medcap.demo._stages import Demo
from medcap.demo._world import MODALITY_KEYS, write_world

FULL = {m: 1.0 for m in MODALITY_KEYS}  # the tallest bars there are, in every modality
SUMMARY = {  # a hand-made summary: what draw_report reads from it
    "trained": {"seen": {"macro_accuracy": 1.0, "CIDEr": 10.0, "per_modality": FULL},
                "unseen": {"macro_accuracy": 0.7, "CIDEr": 5.2, "per_modality": FULL}},
    "control": {"seen": {"macro_accuracy": 0.33, "CIDEr": 1.9}, "unseen": {"macro_accuracy": 0.36, "CIDEr": 1.8},
                "per_modality": FULL},
    "chance": {"seen": {"macro_accuracy": 0.35, "CIDEr": 1.7}, "unseen": {"macro_accuracy": 0.35, "CIDEr": 1.6}},
    "chance_accuracy": 0.35, "seconds": {"total": 300.0},
}


def _write_csv(path: Path, rows, columns) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8-sig", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)


@pytest.fixture()
def demo(tmp_path):
    """A demo folder with a real (small) world and results files written by hand: the
    trained model right on every seen image and on the first half of the unseen ones."""
    d = Demo(tmp_path / "demo", DemoSettings(n_train=8, n_test=32, questions_per_image=2, image_size=32))
    write_world(d.world, d.settings)
    world = json.loads((d.world / "world.json").read_text())
    unseen = [r for r in world["test"] if r["combination"] == "unseen"]
    wrong = {r["image"] for r in unseen[len(unseen) // 2:]}
    for who, ckpt in (("trained", "meta_model_last"), ("control", "untrained")):
        rows = [{"image": r["image"], "instruction": "", "output": r["caption"],
                 "generated": "a wrong caption." if who == "control" or r["image"] in wrong else r["caption"]}
                for r in world["test"]]
        _write_csv(d.out / "eval" / who / f"metrics-raw-{ckpt}.csv", rows, ["image", "instruction", "output", "generated"])
        (d.out / "eval" / who / f"metrics-{ckpt}.csv").write_text("Bleu_1,0.5\nCIDEr,4.0\n")
        qs = json.loads((d.world / "OmniMedVQA" / "QA_information" / "Open-access" / "MedcapDemo.json").read_text())
        scored = [{"image": q["image_path"], "modality_type": q["modality_type"], "question_id": q["question_id"],
                   "correct": int(who == "trained" and q["image_path"] not in wrong)} for q in qs]
        _write_csv(d.out / "eval" / who / f"omnimedvqa-no_cond_desc-raw-{ckpt}-0_50-0.7500.csv", scored,
                   ["image", "modality_type", "question_id", "correct"])
    return d


def test_seen_and_unseen_are_scored_apart(demo, monkeypatch):
    """Accuracy and exact match per half, recounted by hand from what the fixture wrote;
    the captioning metrics get exactly one half's rows each."""
    import medcap.eval

    calls = []

    def fake_metrics(refs, cands):
        calls.append((list(refs), list(cands)))
        return {"CIDEr": float(len(refs))}

    monkeypatch.setattr(medcap.eval, "caption_metrics", fake_metrics)
    from medcap.demo._scores import read_eval

    got = read_eval(demo.out / "eval" / "trained", demo.world)
    assert got["seen"]["macro_accuracy"] == 1.0 and got["seen"]["caption_exact_match"] == 1.0
    assert got["unseen"]["macro_accuracy"] == pytest.approx(0.5)  # 16 unseen images: 8 right, 1 per modality
    assert got["unseen"]["caption_exact_match"] == 0.5
    assert got["seen"]["n_images"] == got["unseen"]["n_images"] == 16
    assert got["seen"]["n_questions"] == got["unseen"]["n_questions"] == 32
    assert got["caption_exact_match"] == 0.75 and got["CIDEr"] == 4.0  # the whole split: the recipe's own file
    world = json.loads((demo.world / "world.json").read_text())
    seen_caps = sorted(r["caption"] for r in world["test"] if r["combination"] == "seen")
    assert sorted(calls[0][0]) == seen_caps and len(calls) == 2
    control = read_eval(demo.out / "eval" / "control", demo.world)
    assert control["unseen"]["macro_accuracy"] == 0.0 and control["seen"]["caption_exact_match"] == 0.0


def test_chance_per_half(demo, monkeypatch):
    from medcap.demo import _scores

    given = []
    monkeypatch.setattr(_scores, "_chance_captions", lambda refs: given.append(list(refs)) or {"CIDEr": 1.0})
    got = _scores.chance_figures(demo.world)
    # modality questions offer 4 options, kind 4, location 4, size 2, intensity 2: recount by hand
    qs = json.loads((demo.world / "OmniMedVQA" / "QA_information" / "Open-access" / "MedcapDemo.json").read_text())
    world = json.loads((demo.world / "world.json").read_text())
    unseen = {r["image"] for r in world["test"] if r["combination"] == "unseen"}
    per_mod = {}
    for q in qs:
        if q["image_path"] in unseen:
            opts = 2 if q["question_id"].endswith(("_size", "_intensity")) else 4
            per_mod.setdefault(q["modality_type"], []).append(1 / opts)
    assert got["unseen"]["macro_accuracy"] == pytest.approx(np.mean([np.mean(v) for v in per_mod.values()]))
    halves = [[r["caption"] for r in world["test"] if s in ("all", r["combination"])] for s in ("all", "seen", "unseen")]
    assert [sorted(g) for g in given] == [sorted(h) for h in halves]
    for n in (2, 3, 16):
        d = _scores.derangement(n)
        assert sorted(d) == list(range(n)) and all(d[i] != i for i in range(n))


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's PTB tokenizer runs java")
def test_chance_captions_are_other_images_captions():
    """Exact match of the derangement recounted by hand; the captions scored against
    themselves (what a right model writes) score far above chance."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    from medcap.demo._scores import _chance_captions, derangement

    refs = ["a cat on a mat.", "a cat on a mat.", "a dog in the park.", "the red car is fast.", "a dog in the park."]
    got = _chance_captions(refs)
    assert got["caption_exact_match"] == sum(r == refs[j] for r, j in zip(refs, derangement(5))) / 5
    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": r}] for i, r in enumerate(refs)})
    perfect, _ = Cider().compute_score(gts, gts)
    assert 0 <= got["CIDEr"] < perfect / 2


def test_targets_need_a_margin_over_control_and_chance():
    from medcap.demo._targets import judge_targets, verdict

    checks = judge_targets(SUMMARY, {"CIDEr": 2.0, "macro_accuracy": 0.25})
    by = {(c["metric"], c["combinations"]): c for c in checks}
    assert by[("CIDEr", "unseen")]["needed"] == pytest.approx(1.8 + 2.0)  # the control beats chance here
    assert by[("macro_accuracy", "seen")]["needed"] == pytest.approx(0.35 + 0.25)  # chance beats the control
    assert all(c["met"] for c in checks)
    assert verdict(checks, quick=False) == (True, verdict(checks, quick=False)[1])
    worse = json.loads(json.dumps(SUMMARY))
    worse["trained"]["unseen"]["macro_accuracy"] = 0.6  # above both, but by less than the margin
    met, line = verdict(judge_targets(worse, {"CIDEr": 2.0, "macro_accuracy": 0.25}), quick=False)
    assert met is False and "3 of 4 met" in line and "macro accuracy on unseen combinations 0.600 < 0.610" in line


def test_quick_run_says_what_it_cannot_meet():
    from medcap.demo._targets import judge_targets, verdict

    met, line = verdict(judge_targets(SUMMARY, {"CIDEr": 2.0, "macro_accuracy": 0.25}), quick=True)
    assert met is None
    assert "--quick" in line and "can meet none of the targets" in line
    assert "Cannot be met in a quick run: CIDEr" in line and "macro accuracy (" in line
    assert "False" not in line


def _blank_share(png: Path, top: float) -> float:
    """Share of near-white pixels in the image below ``top`` (a fraction of its height)."""
    a = np.asarray(Image.open(png).convert("L"))
    band = a[int(a.shape[0] * top):]
    return float((band > 245).mean())


def test_report_shows_the_test_images_from_any_working_folder(demo, tmp_path, monkeypatch):
    """The bottom row holds the test images, found through test.json's meta dir= wherever the
    command runs; the same report with the images gone is nearly blank there."""
    from medcap.demo._report import draw_report

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    png = demo.out / "report.png"
    assert draw_report(demo, SUMMARY, png) == []
    with_images = _blank_share(png, 0.72)
    for p in (demo.world / "OmniMedVQA" / "Images").rglob("*.png"):
        p.unlink()
    problems = draw_report(demo, SUMMARY, png)
    assert len(problems) == 4
    assert with_images < _blank_share(png, 0.72) - 0.1, "the bottom of report.png shows no images"


def test_a_missing_test_image_is_said(demo, capsys):
    """A missing image is named with every place the data loader looks, in the report's
    problems and on the console at the end of the run."""
    from medcap.demo._report import draw_report, print_summary

    first = sorted((demo.world / "OmniMedVQA" / "Images").rglob("*.png"))
    for p in first:
        p.unlink()
    problems = draw_report(demo, SUMMARY, demo.out / "report.png")
    assert problems and all(p.startswith("report.png: test image 'Images/MedcapDemo/test_") for p in problems)
    assert "not found" in problems[0] and str(demo.world / "OmniMedVQA" / "Images" / "MedcapDemo") in problems[0]
    assert "meta dir=" in problems[0]
    print_summary({**SUMMARY, "targets_verdict": "x"}, problems)
    assert problems[0] in capsys.readouterr().out


def test_legends_cover_no_bar(demo):
    import matplotlib.pyplot as plt

    from medcap.demo._report import report_figure

    fig, _ = report_figure(demo, SUMMARY)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    checked = 0
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is None:
            continue
        box = legend.get_window_extent(renderer)
        for bar in ax.patches:
            b = bar.get_window_extent(renderer)
            if b.width * b.height > 0:
                checked += 1
                assert not box.overlaps(b), f"the legend of {ax.get_title()!r} covers a bar"
    plt.close(fig)
    assert checked == 2 * 6 + 3 * 8
