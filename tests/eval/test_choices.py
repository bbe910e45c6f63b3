"""A choice read as a letter: the reference's letter-mapping prompt, the letter read from
the reply, and its rule for a right letter."""

from __future__ import annotations

import pytest

from medcap.eval import letter_prompt
from medcap.eval._choices import is_correct, read_letter

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
