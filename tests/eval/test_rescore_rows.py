"""``medcap rescore`` checks every row and every stated number: balanced flips of two
``correct`` cells, an edited score cell, an edited summary or breakdown are each
flagged (exit 1, the rows named by id); a file left alone passes; the conventions
are named beside medcap's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medcap.eval._rescore import rescore, rescore_main
from medcap.eval._results import read_csv_rows, write_csv_atomic

# A SLAKE file by hand: (qid, answer_type, answer, reply). medcap / medevalkit / llava_med outcomes below.
SLAKE = [
    ("s1", "closed", "Yes", "Yes, there is."),  # medcap 1, medevalkit 0 (SLAKE's "Yes" falls to exact match)
    ("s2", "closed", "No", "No."),  # 1, 1
    ("s3", "closed", "Yes", "No, none."),  # 0, 0
    ("s4", "open", "liver", "The answer is liver"),  # exact 1, medevalkit 0 (" liver"); llava recall 1.0
    ("s5", "open", "the left lung", "left lung"),  # exact 0, 0; recall: medcap 2/3, llava 1.0
    ("s6", "open", "2", "two"),  # 0, 0; llava 1.0
]


def _slake(tmp_path) -> Path:
    from medcap.eval._benchmarks import score_benchmark

    raw = tmp_path / "slake-no_cond_desc-raw-ck.csv"
    rows = [{"image": f"{q}.png", "instruction": "p", "output": a, "generated": g, "question": f"question {q}?",
             "answer": a, "answer_type": k, "option_A": "", "option_B": "", "option_C": "", "option_D": "",
             "question_id": q} for q, k, a, g in SLAKE]
    write_csv_atomic(raw, list(rows[0]), rows, bom=True)
    summary = score_benchmark(None, raw, progress=False)
    (tmp_path / f"{raw.stem}-summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return Path(summary["scored_path"])


def _edit(path: Path, edits):
    rows = read_csv_rows(path)
    for qid, column, value in edits:
        next(r for r in rows if r["question_id"] == qid)[column] = value
    write_csv_atomic(path, list(rows[0]), rows, bom=True)


def test_a_scored_slake_file_names_each_convention(tmp_path, capsys):
    scored = _slake(tmp_path)
    # medcap: right on s1, s2, s4 of 6 -> 0.5 (the file's name)
    assert scored.name == "slake-no_cond_desc-raw-ck-0.5.csv"
    assert rescore_main(["--json", str(scored)]) == 0
    got = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert set(got["conventions"]) >= {"medcap", "medevalkit", "llava_med"}
    s = got["scores"]
    assert s["overall"]["recomputed"] == pytest.approx(3 / 6)
    assert s["medevalkit_overall"] == {"file": pytest.approx(1 / 6), "recomputed": pytest.approx(1 / 6)}  # s2 only
    assert s["llava_med_open_recall"]["recomputed"] == pytest.approx(1.0)  # 1.0, 1.0, 1.0
    # LLaVA-Med closed: s1 "yes there is" holds yes and "yes": 1; s2: 1; s3 "no 0" holds "no" but not "yes": 0
    assert s["llava_med_closed_accuracy"]["recomputed"] == pytest.approx(2 / 3)
    assert got["judge"] == "off" and got["row_differences"] == {"count": 0, "first": []}
    assert rescore_main([str(scored)]) == 0
    out = capsys.readouterr().out
    assert "conventions: medcap (own rules), medevalkit, llava_med, huatuo; judge: off" in out
    assert "every row's cells: ok" in out


def test_a_balanced_flip_of_two_correct_cells_is_flagged(tmp_path, capsys):
    scored = _slake(tmp_path)
    _edit(scored, [("s1", "correct", "0"), ("s3", "correct", "1")])  # totals unchanged
    assert rescore_main([str(scored)]) == 1
    out = capsys.readouterr().out
    assert "cells that differ: 2" in out and "(id s1): correct is '0'" in out and "(id s3): correct is '1'" in out


@pytest.mark.parametrize("qid, column, value", [
    ("s5", "token_recall", "0.9"), ("s4", "exact_match", "0"), ("s6", "token_f1", "0.5"),
    ("s1", "medevalkit_correct", "1"), ("s5", "llava_med_recall", "0.5"), ("s2", "llava_med_correct", "0"),
])
def test_an_edited_score_cell_is_flagged(tmp_path, capsys, qid, column, value):
    scored = _slake(tmp_path)
    _edit(scored, [(qid, column, value)])
    assert rescore_main(["--json", str(scored)]) == 1
    got = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert got["row_differences"]["count"] == 1
    assert got["row_differences"]["first"][0]["id"] == qid and got["row_differences"]["first"][0]["column"] == column


def test_an_edited_summary_is_flagged(tmp_path, capsys):
    scored = _slake(tmp_path)
    summary_path = tmp_path / "slake-no_cond_desc-raw-ck-summary.json"
    summary = json.loads(summary_path.read_text())
    summary["scores"]["open"]["n"] = 4
    summary["conventions"]["medevalkit"]["overall"] = 0.5
    summary_path.write_text(json.dumps(summary))
    assert rescore_main(["--json", str(scored)]) == 1
    s = json.loads(capsys.readouterr().out.splitlines()[-1])["scores"]
    assert s["open_n"] == {"file": 4, "recomputed": 3}
    assert s["medevalkit_overall"]["file"] == 0.5


def _omni(tmp_path) -> Path:
    """A scored OmniMedVQA file (hand letters) with its breakdown, as the scorer writes them."""
    from medcap.eval._omnimedvqa import accuracy_by_modality, save_modality_report

    rows = []
    for i, (mod, letter) in enumerate([("CT", "A"), ("CT", "B"), ("CT", "A"), ("X-Ray", "B"), ("X-Ray", "A")]):
        rows.append({"image": f"{i}.png", "instruction": "p", "output": "lung", "generated": "the lung",
                     "option_A": "lung", "option_B": "liver", "option_C": "", "option_D": "", "modality_type": mod,
                     "question_id": f"o{i}", "predict_generated": letter, "predict": letter,
                     "correct": int(letter == "A")})
    # by hand: CT 2/3, X-Ray 1/2 -> macro 7/12 = 0.5833
    path = tmp_path / "omnimedvqa-omit-raw-ck-0_1-0.5833.csv"
    write_csv_atomic(path, list(rows[0]), rows, bom=True)
    macro, per = accuracy_by_modality(rows)
    assert macro == pytest.approx(7 / 12)
    save_modality_report(path, macro, per, method="letter")
    return path


def test_omnimedvqa_flip_within_a_modality_and_an_edited_breakdown(tmp_path, capsys):
    scored = _omni(tmp_path)
    assert rescore_main([str(scored)]) == 0
    capsys.readouterr()
    _edit(scored, [("o0", "correct", "0"), ("o1", "correct", "1")])  # CT stays 2/3
    assert rescore_main(["--json", str(scored)]) == 1
    got = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert [d["id"] for d in got["row_differences"]["first"]] == ["o0", "o1"]
    assert got["scores"]["letter_macro"]["recomputed"] == pytest.approx(7 / 12)


def test_the_breakdown_is_checked_and_named_as_one(tmp_path, capsys):
    scored = _omni(tmp_path)
    breakdown = tmp_path / f"modality-{scored.name}"
    rows = read_csv_rows(breakdown)
    assert [(r["modality_type"], r["n"], r["correct"]) for r in rows] == [("CT", "3", "2"), ("X-Ray", "2", "1")]
    rows[0]["correct"] = "3"
    write_csv_atomic(breakdown, list(rows[0]), rows)
    assert rescore_main([str(scored)]) == 1
    assert "modality-omnimedvqa-omit-raw-ck-0_1-0.5833.csv: CT" in capsys.readouterr().out
    result = rescore(breakdown)
    assert result["kind"] == "breakdown" and result["note"].startswith(f"a per-modality breakdown of {scored.name}")
    assert "judge VQA-RAD" not in json.dumps(result)


def test_a_glob_for_scored_files_matches_the_scored_file_alone(tmp_path):
    scored = _omni(tmp_path)
    assert [p.name for p in tmp_path.glob("omnimedvqa-*-raw-ck-0_1-*.csv")] == [scored.name]
