"""Both steps of every vqa_type, token for token, with the real Llama 3 tokenizer.

Each expected sequence is written out by hand from the Llama 3 chat template
(content ids read once from ``tiktoken.Encoding.encode`` over Meta's ranks). The
description budget is checked against counts of the reference's text form
taken the same way: the hand-written template string with the special tokens
spelled out, encoded as plain text (128 tokens for the ``no_cond_desc``
skeleton, 183 for ``cond_desc``'s with the question below), plus BOS and EOS.
"""

from __future__ import annotations

from typing import List

import pytest
import torch

from medcap.eval import VQA_TYPES, EvalItem, run_vqa

BOT = 128000
SH, EH, EOT = 128006, 128007, 128009
NL2 = 271
USER, ASSISTANT = 882, 78191
IMG = 128256
N = 50

QUESTION = [3957, 1070, 264, 59904, 30]  # "Is there a fracture?"
DESCRIPTION = [32, 4883, 19172, 304, 279, 2163, 21271, 13]  # "A round opacity in the left lung."
DESCRIBE_TURN = [75885, 279, 2217, 13]  # "Describe the image."
COND = [75885, 279, 2217, 311, 4320, 279, 3488, 25, 2209, 1070, 264, 59904, 30]  # "Describe the image to answer the question: Is there a fracture?"
DOTS = [1131]  # "..."
ANSWER = "Yes."


def h(role: int) -> List[int]:
    return [SH, role, EH, NL2]


IMAGE_TURN = h(USER) + [IMG] * N + [EOT]
OPEN = h(ASSISTANT)

DESCRIPTION_PROMPT = {
    "no_cond_desc": [BOT] + IMAGE_TURN + OPEN,
    "cond_desc": [BOT] + IMAGE_TURN + h(ASSISTANT) + DOTS + [EOT] + h(USER) + COND + [EOT] + OPEN,
}
DESCRIPTION_PROMPT["no_cond_desc_no_image"] = DESCRIPTION_PROMPT["no_cond_desc"]  # step 1 sees the image
DESCRIPTION_PROMPT["cond_desc_no_image"] = DESCRIPTION_PROMPT["cond_desc"]


def answer_prompt(first_turn: List[int], description: List[int]) -> List[int]:
    return [BOT] + first_turn + h(ASSISTANT) + description + [EOT] + h(USER) + QUESTION + [EOT] + OPEN


ANSWER_PROMPT = {
    "no_cond_desc": answer_prompt(IMAGE_TURN, DESCRIPTION),
    "cond_desc": answer_prompt(IMAGE_TURN, DESCRIPTION),
    "no_cond_desc_no_image": answer_prompt(h(USER) + DESCRIBE_TURN + [EOT], DESCRIPTION),
    "cond_desc_no_image": answer_prompt(h(USER) + DESCRIBE_TURN + [EOT], DESCRIPTION),
    "omit": answer_prompt(IMAGE_TURN, DOTS),
}
# max_seq_len 500: 500 - (skeleton + 2 + question 5 + 2 + 5 spare)
BUDGET = {"no_cond_desc": 500 - (128 + 2 + 7 + 5), "cond_desc": 500 - (183 + 2 + 7 + 5)}
BUDGET["no_cond_desc_no_image"] = BUDGET["no_cond_desc"]
BUDGET["cond_desc_no_image"] = BUDGET["cond_desc"]


class Recorder:
    """Engine stand-in over the real tokenizer: records each prompt's tokens, whether
    it carried an image, and its budget; describes and answers with fixed texts."""

    batch_size = 4
    num_image_tokens = N

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.calls = []

    def prompt(self, question_or_messages, *, has_image=True):
        from medcap.generation import build_prompt

        return build_prompt(self.tokenizer, question_or_messages, num_image_tokens=N, has_image=has_image)

    def generate_texts(self, prompts, images, max_new_tokens, keys):
        budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        out = []
        for p, im, b, k in zip(prompts, images, budgets, keys):
            self.calls.append((k.split(":")[0], list(p), im is not None, b))
            out.append("A round opacity in the left lung." if k.startswith("desc:") else ANSWER)
        return out


@pytest.mark.parametrize("vqa_type", VQA_TYPES)
def test_both_steps_token_for_token(vqa_type, llama3_tokenizer, tmp_path):
    image = tmp_path / "x.png"
    image.write_bytes(b"png")
    engine = Recorder(llama3_tokenizer)
    item = EvalItem(image="x.png", path=str(image), question="Is there a fracture?", answer="yes", key="q1")
    rows = run_vqa(engine, [item], vqa_type=vqa_type, raw_path=tmp_path / "raw.csv",
                   image_loader=lambda p: torch.zeros(3, 8, 8), max_seq_len=500, max_new_tokens=1000, progress=False)
    desc = [c for c in engine.calls if c[0] == "desc"]
    answer = [c for c in engine.calls if c[0] == "answer"]
    if vqa_type == "omit":
        assert desc == []
    else:
        (_, tokens, has_image, budget), = desc
        assert tokens == DESCRIPTION_PROMPT[vqa_type]
        assert has_image  # every type describes the image itself
        assert budget == BUDGET[vqa_type]
    (_, tokens, has_image, budget), = answer
    assert tokens == ANSWER_PROMPT[vqa_type]
    assert has_image == (not vqa_type.endswith("_no_image"))
    assert budget == 50
    assert rows[0]["image"] == "x.png" and rows[0]["generated"] == ANSWER
    # The instruction column: the answer prompt's text, special tokens written out, no <|begin_of_text|>.
    first = "\u2460" * N if not vqa_type.endswith("_no_image") else "Describe the image."
    desc_text = "..." if vqa_type == "omit" else "A round opacity in the left lung."
    assert rows[0]["instruction"] == (
        f"<|start_header_id|>user<|end_header_id|>\n\n{first}<|eot_id|>"
        f"<|start_header_id|>assistant<|end_header_id|>\n\n{desc_text}<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nIs there a fracture?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


@pytest.mark.parametrize("vqa_type", ["no_cond_desc", "cond_desc"])
def test_a_description_budget_of_zero_or_less_still_generates_one_token(vqa_type, llama3_tokenizer, tmp_path):
    """The reference's generation makes its first token from the prompt before it looks
    at the budget: with no room left (budget 0) or less than none, it describes with one."""
    image = tmp_path / "x.png"
    image.write_bytes(b"png")
    skeleton = {"no_cond_desc": 128, "cond_desc": 183}[vqa_type]
    no_room = skeleton + 2 + 7 + 5  # the rule above gives exactly 0 here
    for max_seq_len in (no_room, no_room - 30, no_room + 1):
        engine = Recorder(llama3_tokenizer)
        item = EvalItem(image="x.png", path=str(image), question="Is there a fracture?", answer="yes", key="q1")
        run_vqa(engine, [item], vqa_type=vqa_type, raw_path=tmp_path / f"raw{max_seq_len}.csv",
                image_loader=lambda p: torch.zeros(3, 8, 8), max_seq_len=max_seq_len, max_new_tokens=1000,
                progress=False)
        (_, tokens, _, budget), = [c for c in engine.calls if c[0] == "desc"]
        assert tokens == DESCRIPTION_PROMPT[vqa_type]
        assert budget == 1, (max_seq_len, budget)
