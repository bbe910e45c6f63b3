"""The peers' scoring conventions against outcomes worked out by hand from each peer's
published rules (MedEvalKit's ``utils.py`` and dataset classes, LLaVA-Med's
``run_eval.py`` and VQA normalisation, HuatuoGPT-Vision's ``match_choice3``), one row
for every difference issue #25 lists, beside medcap's own outcome for the same row."""

from __future__ import annotations

import pytest

from medcap.eval._benchmark_scores import closed_correct, exact_match, token_scores
from medcap.eval._choices import is_correct, read_letter
from medcap.eval._conventions import (
    headlines, huatuo_letter, llava_closed, llava_normalize, llava_recall, mek_choice, medevalkit_correct, row_cells,
)


def _row(kind, answer, reply, options=None):
    row = {"answer_type": kind, "output": answer, "generated": reply, "question": "q?"}
    row.update({f"option_{L}": (options or {}).get(L, "") for L in "ABCD"})
    return row


# (suite, kind, answer, reply, medcap correct, medevalkit correct): by hand from the rules
CLOSED_AND_OPEN = [
    # SLAKE writes its yes/no answers capitalised. MedEvalKit tests `answer in ["yes", "no"]` on the answer as
    # written, so "Yes" goes to exact match: "yes, there is a mass" (full stop removed) is not "yes".
    ("slake", "closed", "Yes", "Yes, there is a mass.", 1, 0),
    ("slake", "closed", "Yes", "Yes.", 1, 1),  # "yes." -> full stop removed -> "yes" == "yes"
    ("slake", "closed", "No", "No, it is not.", 1, 0),
    # Lower-case answers (PathVQA, VQA-RAD) take the yes/no rule in both: exactly one of yes/no, and the answer.
    ("pathvqa", "closed", "yes", "Yes, there is a mass.", 1, 1),
    ("pathvqa", "closed", "yes", "yes or no, hard to say", 0, 0),
    # \boxed{} and <answer> are unwrapped by MedEvalKit only.
    ("slake", "open", "liver", "The organ is \\boxed{Liver}.", 0, 1),
    ("pathvqa", "open", "kidney", "<think>It is bean shaped.</think><answer>Kidney</answer>", 0, 1),
    # After "answer is" MedEvalKit keeps the space: " liver" != "liver"; medcap trims it.
    ("pathvqa", "open", "liver", "The answer is liver", 1, 0),
    ("slake", "open", "liver", "Answer: liver", 1, 0),
    # An empty reply: wrong in both, and no crash (MedEvalKit's ROUGE raises on an empty hypothesis).
    ("pathvqa", "open", "liver", "", 0, 0),
    ("slake", "closed", "Yes", "", 0, 0),
]


@pytest.mark.parametrize("suite, kind, answer, reply, ours, mek", CLOSED_AND_OPEN)
def test_medcap_and_medevalkit_on_closed_and_open_rows(suite, kind, answer, reply, ours, mek):
    assert (closed_correct(answer, reply) if kind == "closed" else exact_match(answer, reply)) == ours
    assert medevalkit_correct(_row(kind, answer, reply), suite) == mek


MRI = {"A": "Computed tomography", "B": "Magnetic resonance imaging", "C": "Ultrasound", "D": "X-ray"}


@pytest.mark.parametrize("reply, ours, mek, huatuo_letter_, huatuo", [
    # medcap reads the first character of the mapped reply; were the mapping to return the reply unchanged:
    # "(" and "A" (of "Answer") name no right option. MedEvalKit: "(b) magnetic..." is no letter and no option
    # text ("b:magnetic resonance imaging" is), so difflib picks B (ratio 0.93, the others below 0.25);
    # "answer: b" is cut after "answer:" to " b", trimmed: the letter b. HuatuoGPT: the first letter standing
    # alone, "(B)" and ": B".
    ("(B) Magnetic resonance imaging", 0, 1, "B", 1),
    ("Answer: B", 0, 1, "B", 1),
    ("B", 1, 1, "B", 1),
    # HuatuoGPT's letter comes first, and an "I" standing alone is a letter: wrong here. MedEvalKit reads
    # the last paragraph when it is a bare letter: "b".
    ("I would say B\n\nB", 0, 1, "I", 0),
    # Empty: MedEvalKit's difflib finds no similarity and takes the first option (A, wrong);
    # HuatuoGPT's ties go to the later option (D, wrong).
    ("", 0, 0, "D", 0),
])
def test_choice_rows_pmcvqa(reply, ours, mek, huatuo_letter_, huatuo):
    row = _row("choice", MRI["B"], reply, MRI)
    assert is_correct(read_letter(reply), MRI, MRI["B"]) == ours
    assert medevalkit_correct(row, "pmcvqa") == mek
    cells = row_cells(row, "pmcvqa")
    assert (cells["huatuo_predict"], cells["huatuo_correct"]) == (huatuo_letter_, huatuo)


def test_huatuo_order_letter_then_text_then_difflib():
    options = {"A": "kidney", "B": "liver"}
    # 1. a letter standing alone wins over any option text
    assert huatuo_letter("B, the liver; not the kidney", options) == "B"
    # 2. no letter: the option whose text occurs last in the reply
    assert huatuo_letter("the lesion is in the liver, not the kidney", options) == "A"
    # 3. neither: difflib's most similar option; "lvr" shares l, v, r with "liver" (ratio 6/8), nothing with "kidney"
    assert huatuo_letter("lvr", {"A": "liver", "B": "kidney"}) == "A"
    # ties (all 0.0) go to the later option; MedEvalKit's go to the earlier
    assert huatuo_letter("zzz", {"A": "liver", "B": "kidney"}) == "B"
    assert mek_choice(["A. liver", "B. kidney"], "A", "zzz") == 1
    # a lower-case letter is found, but compared with the upper-case label it is never right
    assert row_cells(_row("choice", "liver", "(b) maybe", {"A": "kidney", "B": "liver"}), "questions")["huatuo_correct"] == 0


def test_omnimedvqa_medevalkit_letter_is_the_last_equal_option():
    # MedEvalKit turns gt_answer into the letter of the *last* option equal to it (its loop does not stop):
    # duplicate options A and B "yes", reply "A": wrong there; medcap's rule takes the first (right).
    row = {"output": "yes", "generated": "A", "option_A": "yes", "option_B": "yes", "option_C": "", "option_D": ""}
    assert medevalkit_correct(row, "omnimedvqa") == 0
    assert is_correct("A", {"A": "yes", "B": "yes"}, "yes") == 1
    row["generated"] = "<answer>B</answer>"  # the <answer> content is read first
    assert medevalkit_correct(row, "omnimedvqa") == 1


@pytest.mark.parametrize("answer, reply, ours, llava", [
    ("the liver", "liver", 0.5, 1.0),  # articles dropped by LLaVA-Med
    ("2", "two", 0.0, 1.0),  # number words to digits
    ("left lung", "left left left", 0.5, 0.75),  # repeats uncapped: 3 found / (3 + "lung" missing)
    ("left lung", "The left lung.", 1.0, 1.0),
    ("pleural effusion", "effusion", 0.5, 0.5),
    ("liver", "", 0.0, 0.0),
])
def test_open_recall_medcap_and_llava_med(answer, reply, ours, llava):
    assert token_scores(answer, reply)["recall"] == pytest.approx(ours)
    assert llava_recall(answer, reply) == pytest.approx(llava)


def test_llava_med_normalisation_and_closed_rule():
    assert llava_normalize("The left-lung, (upper) lobe.") == "left lung upper lobe"
    assert llava_normalize("3,5 cm.") == "35 cm"  # a digit comma: punctuation joined, not spaced
    # "none" becomes "0" before the yes/no test: no "no" is left; medcap's substring test finds it
    assert llava_closed("no", "There is none") == 0 and closed_correct("no", "There is none") == 1
    assert llava_closed("yes", "Yes, it is") == 1
    # "no" inside "not": the reply holds the answer "no" for LLaVA-Med (and for medcap's xor, "yes" is absent too)
    assert llava_closed("no", "it is not") == 1


def test_headlines_count_every_row():
    rows = [_row("closed", "yes", "No."), _row("closed", "no", "No."), _row("open", "the liver", "liver"),
            _row("open", "2", "two"), _row("choice", MRI["B"], "Answer: B", MRI)]
    cells = [{**r, **row_cells(r, "questions")} for r in rows]
    h = headlines(cells, "questions")
    # LLaVA-Med drops a wrong yes/no reply from its denominator (1/1 here); every row counts: 1/2
    assert h["llava_med"] == {"open_recall": 1.0, "n_open": 2, "closed_accuracy": 0.5, "n_closed": 2}
    # MedEvalKit: closed 1/2, open exact 0/2 ("liver" != "the liver", "two" != "2"), choice 1/1: 2/5
    assert h["medevalkit"]["overall"] == pytest.approx(2 / 5)
    assert (h["medevalkit"]["closed"], h["medevalkit"]["open"], h["medevalkit"]["choice"]) == (0.5, 0.0, 1.0)
    assert h["huatuo"] == {"accuracy": 1.0, "n": 1}
    cells[2]["judge_verdict"] = 1  # the judge accepts "liver" for "the liver": its verdict replaces the rule
    judged = headlines(cells, "questions", judged=True)["medevalkit"]
    assert judged["judged_overall"] == pytest.approx(3 / 5) and judged["judged_rows"] == 1
