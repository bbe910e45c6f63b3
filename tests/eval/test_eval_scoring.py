"""The scoring step: the reference's letter-mapping prompt, unreadable replies counted
wrong with their own empty prediction, macro accuracy over modalities, the files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from medcap.eval import letter_prompt, read_csv_rows, score_file
from medcap.eval._loop import write_csv_atomic
from medcap.eval._suites import OMNIMEDVQA_EXTRA_COLUMNS, RAW_COLUMNS, answer_messages
from medcap.eval._scoring import LETTER_MAX_NEW_TOKENS, accuracy_by_modality, is_correct, read_letter
from medcap.generation import build_prompt, prompt_text

TAIL = "Based on the question and our answer, respond with only the letter of the correct option from the given choices."


def test_letter_prompt_is_the_references():
    four = {"A": "CT", "B": "MRI", "C": "X-ray", "D": "PET"}
    assert letter_prompt("Which modality?", "It is a CT scan.", four) == (
        "Question: Which modality?\nOur answer: It is a CT scan.\nA. CT\nB. MRI\nC. X-ray\nD. PET\n\n" + TAIL
    )
    assert letter_prompt("Q", "G", {"A": "yes", "B": "no"}) == "Question: Q\nOur answer: G\nA. yes\nB. no\n\n" + TAIL
    # The reference's rule: when C or D is given, both lines are listed (an absent one empty).
    assert letter_prompt("Q", "G", {"A": "a", "B": "b", "C": "c"}) == "Question: Q\nOur answer: G\nA. a\nB. b\nC. c\nD. \n\n" + TAIL
    assert letter_prompt("Q", "G", {"A": "a", "B": "b", "C": "", "D": "d"}) == (
        "Question: Q\nOur answer: G\nA. a\nB. b\nC. \nD. d\n\n" + TAIL)


@pytest.mark.parametrize(
    "reply,expect",
    [("B", "B"), ("b. MRI", "B"), ("  c", "C"), ("", ""), ("   ", ""), ("D", "D"), ("The answer is A", "T"), ("?", "?")],
)
def test_read_letter_is_the_first_character_upper_cased(reply, expect):
    assert read_letter(reply) == expect


@pytest.mark.parametrize(
    "letter,options,answer,expect",
    [("B", {"A": "CT", "B": "MRI"}, "MRI", 1),
     ("A", {"A": "CT", "B": "MRI"}, "MRI", 0),
     ("C", {"A": "CT", "B": "MRI"}, "MRI", 0),  # names an absent option
     ("T", {"A": "CT", "B": "MRI"}, "CT", 0),  # not a letter of A-D
     ("", {"A": "CT", "B": "MRI"}, "CT", 0),
     ("A", {"A": "yes", "B": "yes"}, "yes", 1),  # duplicates: the first equal option is the answer's
     ("B", {"A": "yes", "B": "yes"}, "yes", 0),
     ("A", {"A": "CT", "B": "MRI"}, "PET", 0)],  # the answer is no option
)
def test_correct_is_the_references_position_rule(letter, options, answer, expect):
    assert is_correct(letter, options, answer) == expect


# (modality, gt option letter, options, scripted reply)
ROWS = [
    ("X-Ray", "A", ["yes", "no"], ""),  # unreadable first reply: the reference crashed here
    ("X-Ray", "B", ["yes", "no"], "b"),
    ("X-Ray", "A", ["left", "right", "both"], "Z"),  # names no option
    ("ultrasound", "C", ["cyst", "mass", "normal", "stone"], "C) normal"),
    ("ultrasound", "D", ["cyst", "mass", "normal", "stone"], "A"),
    ("MR (Mag-netic Resonance Imaging)", "B", ["T1", "T2"], "C"),  # C is absent
    ("MR (Mag-netic Resonance Imaging)", "B", ["T1", "T2"], "B"),
]


def _write_raw(tok, path: Path):
    rows = []
    for i, (mod, gt, opts, _) in enumerate(ROWS):
        question = f"Question number {i}?"
        p = build_prompt(tok, answer_messages("no_cond_desc", f"description {i}", question), num_image_tokens=4)
        row = {"image": f"img{i}.png", "instruction": prompt_text(tok, p), "output": opts["ABCD".index(gt)],
               "generated": f"free answer {i}", "modality_type": mod, "question_id": f"q{i}"}
        for k, L in enumerate("ABCD"):
            row[f"option_{L}"] = opts[k] if k < len(opts) else ""
        rows.append(row)
    write_csv_atomic(path, list(RAW_COLUMNS) + list(OMNIMEDVQA_EXTRA_COLUMNS), rows)
    return rows


def _reply_by_question(text, key, budget):
    i = int(text.split("Question number ")[1].split("?")[0])
    return ROWS[i][3]


def test_letter_scoring_files_and_macro_accuracy(ev_tok, scripted, tmp_path, capsys):
    raw = tmp_path / "omnimedvqa-no_cond_desc-raw-ck-0_1.csv"
    written = _write_raw(ev_tok, raw)
    engine = scripted(_reply_by_question)
    summary = score_file(engine, raw, method="letter", progress=False)
    # Every scoring prompt: text only, the reference's wording, at most 20 new tokens.
    texts = [t for call in engine.calls for t in call[0]]
    assert all(not any(call[1]) and set(call[2]) == {LETTER_MAX_NEW_TOKENS} for call in engine.calls)
    for i, t in enumerate(texts):
        opts = {L: v for L, v in zip("ABCD", ROWS[i][2])}
        body = letter_prompt(f"Question number {i}?", f"free answer {i}", opts)
        assert body in t and "①" not in t
    scored = read_csv_rows(summary["scored_path"])
    assert [r["predict"] for r in scored] == ["", "B", "Z", "C", "A", "C", "B"]  # letters, as the reference's
    assert [r["predict_generated"] for r in scored] == [r[3] for r in ROWS]
    assert [r["correct"] for r in scored] == ["0", "1", "0", "1", "0", "0", "1"]
    assert [{k: r[k] for k in written[0]} for r in scored] == written  # raw columns kept as they were
    # Independent recount: mean over modalities of each modality's accuracy.
    per = {"X-Ray": 1 / 3, "ultrasound": 1 / 2, "MR (Mag-netic Resonance Imaging)": 1 / 2}
    macro = sum(per.values()) / 3
    assert summary["accuracy"] == pytest.approx(macro)
    assert Path(summary["scored_path"]).name == "omnimedvqa-no_cond_desc-raw-ck-0_1-0.4444.csv"  # round(acc, 4)
    assert Path(summary["scored_path"]).read_bytes().startswith(b"\xef\xbb\xbf")  # BOM, as pandas' utf-8-sig
    js = json.loads(Path(summary["modality_json"]).read_text())
    assert {k: v["accuracy"] for k, v in js["per_modality"].items()} == pytest.approx(per)
    assert read_csv_rows(summary["modality_csv"])[0].keys() == {"modality_type", "n", "correct", "accuracy"}
    assert Path(summary["modality_png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "ultrasound" in out and f"{macro:.4f}" in out
    assert not list(tmp_path.glob("*.partial.csv"))


def test_scoring_resumes_after_an_interruption(ev_tok, scripted, tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref_dir.mkdir()
    run_dir.mkdir()
    raw_ref = ref_dir / "omnimedvqa-omit-raw-ck-0_1.csv"
    _write_raw(ev_tok, raw_ref)
    shutil.copy(raw_ref, run_dir / raw_ref.name)
    ref = score_file(scripted(_reply_by_question), raw_ref, progress=False)

    def dies_in_second_batch(text, key, budget):
        if int(key.split(":")[1]) >= 3:
            raise KeyboardInterrupt
        return _reply_by_question(text, key, budget)

    with pytest.raises(KeyboardInterrupt):
        score_file(scripted(dies_in_second_batch), run_dir / raw_ref.name, progress=False)
    partial = run_dir / "omnimedvqa-omit-raw-ck-0_1-scored.partial.csv"
    assert len(read_csv_rows(partial)) == 3
    engine = scripted(_reply_by_question)
    got = score_file(engine, run_dir / raw_ref.name, progress=False)
    assert len([t for c in engine.calls for t in c[0]]) == len(ROWS) - 3  # nothing redone
    assert Path(got["scored_path"]).read_bytes() == Path(ref["scored_path"]).read_bytes()


def test_accuracy_is_macro_over_modalities():
    rows = [{"modality_type": "a", "correct": "1"}] * 9 + [{"modality_type": "a", "correct": "0"}] + [
        {"modality_type": "b", "correct": "0"}]
    acc, per = accuracy_by_modality(rows)
    assert acc == pytest.approx((0.9 + 0.0) / 2)
    assert per["a"] == {"n": 10, "correct": 9, "accuracy": 0.9}
