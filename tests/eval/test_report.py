"""``medcap report``: chunks of one checkpoint combined (different chunkings refused),
checkpoint names with dashes read whole, every suite's column (captions, the judged
VQA-RAD), and the peers' conventions in a table of their own, the judge named."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

from medcap.eval._report import collect, collect_all, report_main
from medcap.eval._results import write_csv_atomic

OMNI = ["image", "instruction", "output", "generated", "option_A", "option_B", "option_C", "option_D", "modality_type",
        "question_id", "predict_generated", "predict", "correct"]


def _omni_file(folder: Path, name: str, rows, mtime: float) -> Path:
    """rows: (question id, modality, correct); the options make the peers' cells computable."""
    out = [{"image": f"{q}.png", "instruction": "p", "output": "lung", "generated": "lung" if c else "liver",
            "option_A": "lung", "option_B": "liver", "option_C": "", "option_D": "", "modality_type": m,
            "question_id": q, "predict_generated": "A" if c else "B", "predict": "A" if c else "B", "correct": c}
           for q, m, c in rows]
    path = write_csv_atomic(folder / name, OMNI, out, bom=True)
    os.utime(path, (mtime, mtime))
    return path


def test_the_chunks_of_one_checkpoint_are_combined(tmp_path, capsys):
    # chunk 0: CT 1/2; chunk 1: CT 1/1, X-Ray 0/2. Together: CT 2/3, X-Ray 0/2 -> macro 1/3 (not chunk 1's 1/2).
    _omni_file(tmp_path, "omnimedvqa-omit-raw-ck-0_2-0.5.csv", [("a", "CT", 1), ("b", "CT", 0)], 1000)
    _omni_file(tmp_path, "omnimedvqa-omit-raw-ck-1_2-0.5.csv", [("c", "CT", 1), ("d", "X-Ray", 0), ("e", "X-Ray", 0)], 2000)
    # an older scoring of chunk 0 (other rows) is not counted: the newest scoring of each chunk is
    _omni_file(tmp_path, "omnimedvqa-omit-raw-ck-0_2-1.0.csv", [("a", "CT", 1), ("b", "CT", 1)], 500)
    rows, columns, scores = collect([tmp_path])
    assert (rows, columns) == (["ck"], ["OmniMedVQA"])
    assert scores[("ck", "OmniMedVQA")] == pytest.approx((2 / 3 + 0) / 2)
    _, _, every, notes = collect_all([tmp_path])
    # MedEvalKit and HuatuoGPT read the free answer: "lung" right, "liver" wrong, micro over 5 questions
    assert every[("ck", "OmniMedVQA [medevalkit]")] == pytest.approx(2 / 5)
    assert every[("ck", "OmniMedVQA [huatuo]")] == pytest.approx(2 / 5)
    assert notes == ["OmniMedVQA ck: chunks 0_2, 1_2 combined (5 questions)"]
    assert report_main([str(tmp_path)]) == 0
    assert "chunks 0_2, 1_2 combined" in capsys.readouterr().out


def test_different_chunkings_of_one_checkpoint_are_refused(tmp_path, capsys):
    _omni_file(tmp_path, "omnimedvqa-omit-raw-ck-0_50-1.0.csv", [("a", "CT", 1)], 1000)
    _omni_file(tmp_path, "omnimedvqa-omit-raw-ck-1_2-0.0.csv", [("b", "CT", 0)], 2000)
    assert report_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("medcap report: error: OmniMedVQA results of ck come in different chunkings") and "\n" not in err


def test_a_checkpoint_named_with_a_dash_and_number_makes_no_phantom_row(tmp_path):
    header = ["image", "instruction", "output", "generated", "question", "answer", "answer_type"]
    raw = [{"image": "a.png", "instruction": "p", "output": "yes", "generated": "Yes.", "question": "q", "answer": "yes",
            "answer_type": "closed"}]
    write_csv_atomic(tmp_path / "questions-omit-raw-model-3.csv", header, raw)  # ends in "-3.csv": not a score
    scored = [{**raw[0], "correct": 1, "exact_match": 0, "token_recall": 1.0, "token_f1": 1.0}]
    write_csv_atomic(tmp_path / "questions-omit-raw-model-3-1.0.csv", header + ["correct", "exact_match", "token_recall",
                                                                              "token_f1"], scored)
    _omni_file(tmp_path, "omnimedvqa-omit-raw-model-3-0_50-1.0.csv", [("a", "CT", 1)], 1000)
    rows, columns, scores = collect([tmp_path])
    assert rows == ["model-3"]
    assert scores == {("model-3", "OmniMedVQA"): 1.0, ("model-3", "questions"): 1.0}


def test_captions_the_judged_vqarad_and_the_peers_table(tmp_path, capsys):
    (tmp_path / "metrics-ck.csv").write_text("Bleu_1,0.400000\nBleu_2,0.3\nBleu_3,0.2\nBleu_4,0.100000\nMETEOR,0.150000\n"
                                             "ROUGE_L,0.350000\nCIDEr,0.950000\n", encoding="utf-8")
    write_csv_atomic(tmp_path / "vqarad-omit-raw-ck-70B_4bit-0.66667.csv", ["image", "instruction", "generated"],
                     [{"image": "a", "instruction": "p", "generated": g} for g in ("RIGHT", "wrong", "Right.")])
    header = ["image", "instruction", "output", "generated", "question", "answer", "answer_type", "correct"]
    write_csv_atomic(tmp_path / "slake-omit-raw-ck-0.5.csv", header, [
        {"image": "a", "instruction": "p", "output": "Yes", "generated": "Yes, it is.", "question": "q", "answer": "Yes",
         "answer_type": "closed", "correct": 1},
        {"image": "b", "instruction": "p", "output": "liver", "generated": "The answer is liver", "question": "q",
         "answer": "liver", "answer_type": "open", "correct": 1}])
    assert report_main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "MedEvalKit" in out and "judge: off" in out
    with open(tmp_path / "report.csv", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    row = table[0]
    assert row["checkpoint"] == "ck"
    assert (row["BLEU-1"], row["BLEU-4"], row["METEOR"], row["ROUGE-L"], row["CIDEr"]) == (
        "0.400000", "0.100000", "0.150000", "0.350000", "0.950000")
    assert float(row["VQA-RAD (judge)"]) == pytest.approx(2 / 3)
    # medcap: both right (1.0); MedEvalKit: "Yes" falls to exact match ("yes, it is" != "yes") and " liver"
    # keeps its space: 0/2; LLaVA-Med: closed 1/1, open recall 1/1
    assert float(row["SLAKE"]) == 1.0 and float(row["SLAKE [medevalkit]"]) == 0.0
    assert float(row["SLAKE [llava_med closed]"]) == 1.0 and float(row["SLAKE [llava_med open]"]) == 1.0
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("scores in %") and "[medevalkit]" in md and "judge: off" in md
