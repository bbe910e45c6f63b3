"""The field's VQA scores, against values worked out by hand."""

from __future__ import annotations

import pytest

from medcap.eval._benchmark_scores import closed_correct, exact_match, summarize, token_scores


@pytest.mark.parametrize("answer, reply, right", [
    ("yes", "Yes, there is a mass.", 1),
    ("no", "No.", 1),
    ("yes", "No, it is not.", 0),
    ("yes", "yes or no, hard to say", 0),  # both words: unreadable, as MedEvalKit reads it
    ("no", "There is none", 1),  # "no" inside "none" counts, as MedEvalKit's substring test does
    ("yes", "The answer is: yes", 1),
    ("yes", "", 0),
    ("Liver", "liver.", 1),  # a closed answer other than yes/no must equal the reply
    ("Liver", "the liver", 0),
])
def test_closed(answer, reply, right):
    assert closed_correct(answer, reply) == right


def test_exact_match_lowercases_and_reads_after_the_marker():
    assert exact_match("Left Lung", "left lung") == 1
    assert exact_match("left lung", "Final answer: left lung") == 1
    assert exact_match("left lung", "the left lung") == 0


def test_token_scores():
    s = token_scores("left lung", "The left upper lung, left side")
    # answer words {left, lung}, both in the reply: recall 2/2; reply has 6 words: precision 2/6
    assert s["recall"] == pytest.approx(1.0)
    assert s["precision"] == pytest.approx(2 / 6)
    assert s["f1"] == pytest.approx(2 * (1 / 3) / (1 + 1 / 3))
    assert token_scores("pleural effusion", "effusion")["recall"] == pytest.approx(0.5)
    assert token_scores("x", "")["f1"] == 0.0


def _row(kind, answer, reply, predict="", options=("", "", "", "")):
    row = {"answer_type": kind, "output": answer, "generated": reply, "predict": predict}
    row.update({f"option_{L}": o for L, o in zip("ABCD", options)})
    return row


def test_summary_overall_is_right_answers_over_all_questions():
    rows = [
        _row("closed", "yes", "yes"),  # right
        _row("closed", "no", "yes"),  # wrong
        _row("open", "left lung", "left lung"),  # exact: right
        _row("open", "pleural effusion", "effusion"),  # recall 0.5, wrong
        _row("choice", "CT", "", "B", ("MRI", "CT", "", "")),  # right
        _row("open", "", "anything"),  # no answer: not scored
    ]
    s = summarize(rows)
    assert s["overall"] == pytest.approx(3 / 5)
    assert s["closed"] == {"n": 2, "accuracy": 0.5}
    assert s["open"]["exact_match"] == pytest.approx(0.5)
    assert s["open"]["token_recall"] == pytest.approx(0.75)
    assert s["choice"] == {"n": 1, "accuracy": 1.0}
    assert (s["scored"], s["unscored"]) == (5, 1)
