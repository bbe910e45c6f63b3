"""Two of the reference's details (issue #22, items 8.1 and 8.5): the letter-scoring prompt
holds the question stripped, token for token on the real Llama 3 tokenizer, and scored
files are named with the accuracy rounded as numpy rounds it."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from medcap.eval._results import accuracy_name, read_csv_rows, write_csv_atomic

BOT, SH, EH, EOT, NL2 = 128000, 128006, 128007, 128009, 271
USER, ASSISTANT = 882, 78191
TAIL = "Based on the question and our answer, respond with only the letter of the correct option from the given choices."


def test_accuracy_names_round_as_numpy_does():
    assert accuracy_name(93 / 160) == "0.5812"  # numpy: rint(5812.5) = 5812 (half to even)
    assert f"{round(93 / 160, 4)}" == "0.5813"  # Python's round on the decimal value: what medcap wrote before
    rng = random.Random(0)
    for x in [rng.random() for _ in range(20000)] + [k / 160 for k in range(161)] + [k / 32 for k in range(33)]:
        assert accuracy_name(x) == f"{np.round(x, 4)}", x
    assert accuracy_name(2 / 3, 5) == f"{np.round(2 / 3, 5)}"
    assert accuracy_name(float("nan")) == "nan"


def test_a_benchmark_file_of_93_right_in_160_is_named_0_5812(tmp_path):
    from medcap.eval._benchmarks import score_benchmark

    raw = tmp_path / "questions-omit-raw-ck.csv"
    rows = [{"image": f"{i}.png", "instruction": "p", "output": "yes", "generated": "Yes." if i < 93 else "No.",
             "question": "q", "answer": "yes", "answer_type": "closed"} for i in range(160)]
    write_csv_atomic(raw, list(rows[0]), rows, bom=True)
    got = score_benchmark(None, raw, progress=False)
    assert Path(got["scored_path"]).name == "questions-omit-raw-ck-0.5812.csv"


def test_an_omnimedvqa_file_of_93_right_in_160_is_named_0_5812(scripted, tmp_path):
    from medcap.eval._omnimedvqa import OMNIMEDVQA_EXTRA_COLUMNS, score_omnimedvqa
    from medcap.eval._run import RAW_COLUMNS

    raw = tmp_path / "omnimedvqa-omit-raw-ck-0_1.csv"
    rows = [{"image": f"{i}.png", "instruction": "p", "output": "CT", "generated": f"answer {i}", "option_A": "CT",
             "option_B": "MRI", "option_C": "", "option_D": "", "modality_type": "X-Ray", "question_id": f"q{i}"}
            for i in range(160)]
    write_csv_atomic(raw, list(RAW_COLUMNS) + list(OMNIMEDVQA_EXTRA_COLUMNS), rows, bom=True)

    def reply(text, key, budget):
        return "A" if int(text.split("Our answer: answer ")[1].split("\n")[0]) < 93 else "B"

    got = score_omnimedvqa(scripted(reply), raw, progress=False, questions={f"q{i}": "Which?" for i in range(160)})
    assert Path(got["scored_path"]).name == "omnimedvqa-omit-raw-ck-0_1-0.5812.csv"
    assert sum(int(r["correct"]) for r in read_csv_rows(got["scored_path"])) == 93


class _Recorder:
    """The engine's prompt building on the real tokenizer; records each prompt's tokens."""

    batch_size = 4
    num_image_tokens = 50

    def __init__(self, tokenizer):
        self.tokenizer, self.prompts = tokenizer, []

    def prompt(self, question_or_messages, *, has_image=True):
        from medcap.generation import build_prompt

        return build_prompt(self.tokenizer, question_or_messages, num_image_tokens=50, has_image=has_image)

    def generate_texts(self, prompts, images, max_new_tokens, keys):
        self.prompts += [list(p) for p in prompts]
        return ["A"] * len(prompts)


def test_the_letter_prompt_holds_the_question_stripped(llama3_tokenizer, tmp_path):
    from medcap.eval._omnimedvqa import OMNIMEDVQA_EXTRA_COLUMNS, score_omnimedvqa
    from medcap.eval._run import RAW_COLUMNS

    raw = tmp_path / "omnimedvqa-omit-raw-ck-0_1.csv"
    row = {"image": "a.png", "instruction": "p", "output": "liver", "generated": "The liver.", "option_A": "liver",
           "option_B": "kidney", "option_C": "", "option_D": "", "modality_type": "CT", "question_id": "q1"}
    write_csv_atomic(raw, list(RAW_COLUMNS) + list(OMNIMEDVQA_EXTRA_COLUMNS), [row], bom=True)
    engine = _Recorder(llama3_tokenizer)
    score_omnimedvqa(engine, raw, progress=False, questions={"q1": "  What organ is shown?\n"})
    # As the reference asks it: the question read back from the answer prompt, whose turns are trimmed.
    text = f"Question: What organ is shown?\nOur answer: The liver.\nA. liver\nB. kidney\n\n{TAIL}"
    content = llama3_tokenizer.encode(text, add_bos=False, add_eos=False)
    assert engine.prompts == [[BOT, SH, USER, EH, NL2] + content + [EOT, SH, ASSISTANT, EH, NL2]]
    # what the question as the data set holds it gave before: "Question:   What organ is shown?\n\nOur answer"
    unstripped = text.replace("Question: What organ is shown?\n", "Question:   What organ is shown?\n\n")
    assert llama3_tokenizer.encode(unstripped, add_bos=False, add_eos=False) != content
