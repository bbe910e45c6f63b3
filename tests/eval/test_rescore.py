"""``medcap rescore``: every score recomputed from rows on disk, against hand counts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from medcap.eval._omnimedvqa import OMNIMEDVQA_EXTRA_COLUMNS
from medcap.eval._rescore import nearest_option, rescore, rescore_main
from medcap.eval._results import write_csv_atomic
from medcap.eval._run import RAW_COLUMNS

COLS = list(RAW_COLUMNS) + list(OMNIMEDVQA_EXTRA_COLUMNS) + ["predict_generated", "predict", "correct"]

# (modality, options, gt, generated, predict letter)
ROWS = [
    ("CT", ["lung", "liver"], "lung", "it shows the lung", "A"),  # letter right, nearest right
    ("CT", ["lung", "liver"], "liver", "the lung", "A"),  # letter wrong, nearest wrong
    ("CT", ["axial", "sagittal", "coronal"], "coronal", "coronal plane", "C"),  # three options
    ("X-Ray", ["yes", "no"], "no", "no", "T"),  # not a letter: wrong; nearest right
    ("X-Ray", ["left", "right"], "left", "", ""),  # empty reply: wrong; nearest: tie -> later option (right): wrong
]


def _scored_file(tmp_path, name, rows=ROWS, correct_override=None):
    out = []
    for i, (mod, opts, gt, gen, letter) in enumerate(rows):
        r = {"image": f"i{i}.png", "instruction": "x", "output": gt, "generated": gen, "modality_type": mod,
             "question_id": f"q{i}", "predict_generated": letter, "predict": letter}
        for k, L in enumerate("ABCD"):
            r[f"option_{L}"] = opts[k] if k < len(opts) else ""
        out.append(r)
    # Hand counts: letters right on rows 0 and 2.
    correct = correct_override or [1, 0, 1, 0, 0]
    for r, c in zip(out, correct):
        r["correct"] = c
    path = tmp_path / name
    write_csv_atomic(path, COLS, out, bom=True)
    return path


def test_nearest_option_is_difflib_closest_with_ties_to_the_later():
    assert nearest_option("it shows the lung", {"A": "lung", "B": "liver", "C": "", "D": ""}) == "A"
    assert nearest_option("coronal plane", {"A": "axial", "B": "sagittal", "C": "coronal", "D": ""}) == "C"
    assert nearest_option("", {"A": "left", "B": "right", "C": "", "D": ""}) == "B"  # both 0.0: the later one
    assert nearest_option("x", {"A": "", "B": "", "C": "", "D": ""}) == ""


def test_scored_file_recomputed_beside_its_own_numbers(tmp_path, capsys):
    # CT: 2/3, X-Ray: 0/2 -> macro (2/3 + 0) / 2 = 0.3333; micro 2/5.
    path = _scored_file(tmp_path, "omnimedvqa-no_cond_desc-raw-ck-0_50-0.3333.csv")
    res = rescore(path)["scores"]
    assert res["letter_macro"] == {"file": 0.3333, "recomputed": pytest.approx(1 / 3)}
    assert res["letter_micro"]["recomputed"] == pytest.approx(2 / 5)
    # Nearest option: rows 0, 2, 3 right -> CT 2/3, X-Ray 1/2.
    assert res["nearest_macro"]["recomputed"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert res["nearest_micro"]["recomputed"] == pytest.approx(3 / 5)
    assert rescore_main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "letter_macro" in out and "DIFFERS" not in out


def test_a_file_whose_numbers_do_not_hold_is_flagged(tmp_path, capsys):
    path = _scored_file(tmp_path, "omnimedvqa-omit-raw-ck-0_50-0.9.csv", correct_override=[1, 1, 1, 1, 0])
    assert rescore_main([str(path)]) == 1
    assert "DIFFERS" in capsys.readouterr().out


def test_loglik_and_judged_and_raw_files(tmp_path):
    rows = [(m, o, gt, gen, L) for m, o, gt, gen, L in ROWS]
    path = _scored_file(tmp_path, "omnimedvqa-omit-raw-ck-0_50-loglik-0.3333.csv", rows)
    from medcap.eval import read_csv_rows

    data = read_csv_rows(path)
    for r, best in zip(data, ["A", "A", "C", "B", "B"]):
        r["predict_generated"] = json.dumps({L: (0.0 if L == best else -5.0) for L in "AB" + ("C" if r["option_C"] else "")})
        r["predict"] = best
    # Hand count: rows 0, 2, 3 right -> CT 2/3, X-Ray 1/2.
    for r, c in zip(data, [1, 0, 1, 1, 0]):
        r["correct"] = c
    write_csv_atomic(path, COLS, data, bom=True)
    res = rescore(path)["scores"]
    assert res["loglik_macro"]["recomputed"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert res["loglik_argmax_macro"]["recomputed"] == pytest.approx((2 / 3 + 1 / 2) / 2)

    judged = tmp_path / "vqarad-no_cond_desc-raw-ck-70B_4bit-0.66667.csv"
    write_csv_atomic(judged, ["image", "instruction", "generated"],
                     [{"image": "a", "instruction": "p", "generated": g} for g in ("RIGHT", "Wrong.", "right!")], bom=True)
    assert rescore(judged)["scores"]["judge_accuracy"] == {"file": 0.66667, "recomputed": pytest.approx(2 / 3)}

    raw = tmp_path / "vqarad-no_cond_desc-raw-ck.csv"
    write_csv_atomic(raw, list(RAW_COLUMNS), [{"image": "a", "instruction": "p", "output": "yes", "generated": "y"}], bom=True)
    assert rescore(raw)["kind"] == "unscored"


def test_the_command(tmp_path):
    path = _scored_file(tmp_path, "omnimedvqa-no_cond_desc-raw-ck-0_50-0.3333.csv")
    done = subprocess.run([sys.executable, "-m", "medcap.cli", "rescore", "--json", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.splitlines()[-1])
    assert got["scores"]["letter_macro"]["recomputed"] == pytest.approx(1 / 3)
    missing = subprocess.run([sys.executable, "-m", "medcap.cli", "rescore", str(tmp_path / "nope.csv")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "no such results file" in missing.stderr
