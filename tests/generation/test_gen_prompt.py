"""Prompts: the real Llama 3 special tokens (not their spelling), the training data's
layout, and a text form that reads back into the same tokens."""

from __future__ import annotations

import pytest

from medcap.data import image_chat_dataset
from medcap.generation import (
    build_prompt,
    clean_text,
    prompt_text,
    prompt_tokens_from_text,
    question_from_instruction,
)
from medcap.data import PLACEHOLDER_CHAR
from medcap.generation._prompt import decode_text, parse_prompt_text
from medcap.testing import make_caption_dataset


def _enc(tok, s):
    return tok.encode(s, add_bos=False, add_eos=False)


def test_question_prompt_is_the_chat_template_with_real_special_tokens(gen_tok):
    st = gen_tok.special_tokens
    got = build_prompt(gen_tok, "What is it?", num_image_tokens=4)
    expect = (
        [st["<|begin_of_text|>"], st["<|start_header_id|>"]] + _enc(gen_tok, "user") + [st["<|end_header_id|>"]]
        + _enc(gen_tok, "\n\n") + [gen_tok.image_id] * 4 + _enc(gen_tok, "\n\nWhat is it?") + [st["<|eot_id|>"]]
        + [st["<|start_header_id|>"]] + _enc(gen_tok, "assistant") + [st["<|end_header_id|>"]] + _enc(gen_tok, "\n\n")
    )
    assert got == expect
    # The template's tokens are special ids, never their spelling as text.
    spelled = _enc(gen_tok, "<|start_header_id|>")
    assert not any(got[i : i + len(spelled)] == spelled for i in range(len(got)))
    text_only = build_prompt(gen_tok, "What is it?", num_image_tokens=4, has_image=False)
    tail = [st["<|eot_id|>"], st["<|start_header_id|>"]] + _enc(gen_tok, "assistant") + [st["<|end_header_id|>"]] + _enc(gen_tok, "\n\n")
    head = [st["<|begin_of_text|>"], st["<|start_header_id|>"]] + _enc(gen_tok, "user") + [st["<|end_header_id|>"]] + _enc(gen_tok, "\n\n")
    assert text_only == head + _enc(gen_tok, "What is it?") + tail


def test_prompt_equals_the_training_tokens_up_to_the_answer(gen_tok, tmp_path):
    """Inference sees exactly what training saw before the caption."""
    path = make_caption_dataset(tmp_path, n=3, image_size=32, num_placeholders=50)
    ds = image_chat_dataset(gen_tok, source=str(path), num_image_tokens=4, image_size=32)
    import json

    records = json.loads(path.read_text())
    for i, rec in enumerate(records):
        human = rec["conversations"][0]["value"]
        prompt = build_prompt(gen_tok, [{"role": "user", "content": human}], num_image_tokens=4)
        train = ds[i]["tokens"]
        assert train[: len(prompt)] == prompt
        caption = _enc(gen_tok, rec["conversations"][1]["value"].strip())
        assert train[len(prompt) : len(prompt) + len(caption)] == caption


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "<image>"}],
        [{"role": "system", "content": "You are a radiologist."}, {"role": "user", "content": "<image>\n\nDescribe it."}],
        [
            {"role": "user", "content": PLACEHOLDER_CHAR * 50},
            {"role": "assistant", "content": "A chest film.\nTwo lines."},
            {"role": "user", "content": "Is there an effusion?"},
        ],
        [{"role": "user", "content": "Before the image: <|image|> and after."}],
        [{"role": "user", "content": "No image at all."}, {"role": "assistant", "content": ""}],
    ],
)
def test_prompt_text_reads_back_into_the_same_tokens(gen_tok, messages):
    has_image = any(
        mk in m["content"] for m in messages if m["role"] == "user" for mk in ("<image>", "<|image|>", PLACEHOLDER_CHAR)
    )
    tokens = build_prompt(gen_tok, messages, num_image_tokens=4, has_image=has_image)
    text = prompt_text(gen_tok, tokens)
    assert text.startswith("<|begin_of_text|><|start_header_id|>")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert text.count(PLACEHOLDER_CHAR) == (4 if has_image else 0)
    back, back_has_image = prompt_tokens_from_text(gen_tok, text, num_image_tokens=4)
    assert back == tokens and back_has_image == has_image
    users = [m for m in messages if m["role"] == "user"]
    last = users[-1]["content"]
    for marker in ("<image>", "<|image|>", PLACEHOLDER_CHAR):
        last = last.replace(marker, "")
    assert question_from_instruction(text) == last.strip()
    roles = [m["role"] for m in parse_prompt_text(text)]
    assert roles == [m["role"] for m in messages if m["content"] or m["role"] != "assistant"]


def test_literal_markers_in_questions_stay_text(gen_tok):
    q = f"Compare {PLACEHOLDER_CHAR} with <image>, please"
    tokens = build_prompt(gen_tok, q, num_image_tokens=4)
    assert tokens.count(gen_tok.image_id) == 4  # only the prompt's own image
    assert clean_text(q) == "Compare (1) with (image), please"
    assert question_from_instruction(prompt_text(gen_tok, tokens)) == clean_text(q)


def test_decode_text_cuts_at_the_first_special_token(gen_tok):
    st = gen_tok.special_tokens
    toks = _enc(gen_tok, "  a lesion. ") + [st["<|eot_id|>"]] + _enc(gen_tok, "tail")
    assert decode_text(gen_tok, toks) == "a lesion."
    assert decode_text(gen_tok, [st["<|finetune_right_pad_id|>"]] + _enc(gen_tok, "x")) == ""
    assert decode_text(gen_tok, _enc(gen_tok, "plain")) == "plain"


def test_prompt_errors_are_clear(gen_tok):
    with pytest.raises(ValueError, match="no user turn holds an image marker"):
        build_prompt(gen_tok, [{"role": "user", "content": "hi"}], num_image_tokens=4, has_image=True)
    with pytest.raises(ValueError, match="one image"):
        build_prompt(gen_tok, [{"role": "user", "content": "<image> and <image>"}], num_image_tokens=4)
    with pytest.raises(ValueError, match="has_image=False"):
        build_prompt(gen_tok, [{"role": "user", "content": "<image>"}], num_image_tokens=4, has_image=False)
    with pytest.raises(ValueError, match="nothing is left to generate"):
        build_prompt(gen_tok, [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "x"}], num_image_tokens=4)
