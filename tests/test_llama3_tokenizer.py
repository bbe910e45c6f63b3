"""medcap's data, conversion and generation paths with the real Llama 3 BPE.

The tiny tests use a byte-level tokenizer, under which ``①`` is three byte tokens
and every text is trivially reversible. Here the real ``tokenizer.model``
(``llama3_tokenizer`` fixture, from quicktok-v1) checks what only the real table
shows: ``①`` is one token (118075) that must never reach the model as text,
placeholders are ``<|image|>`` (128256), and the template ids are Meta's.

Every expected id below is written out by hand (content ids were read once from
``tiktoken.Encoding.encode`` of the raw text over the same ranks).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

PH = "\u2460"  # '①'
PH_ID = 118075  # '①' in the Llama 3 BPE
IMG = 128256  # <|image|>: tokenizer.image_id, one past Llama-3.1-8B's vocabulary
N = 50  # the real model's image tokens

BOT, EOT_TEXT = 128000, 128001  # <|begin_of_text|>, <|end_of_text|>
SH, EH, EOT = 128006, 128007, 128009  # <|start_header_id|>, <|end_header_id|>, <|eot_id|>
NL2 = 271  # "\n\n"
USER, ASSISTANT, SYSTEM = 882, 78191, 9125

DESCRIBE = [NL2, 75885, 279, 2217, 13]  # "\n\nDescribe the image."
CAPTION = [791, 8737, 5039, 264, 3148, 13]  # "The scan shows a mass."
SYSTEM_PROMPT = [2675, 527, 264, 12164, 16549, 13]  # "You are a radiologist."
QUESTION = [3957, 1070, 264, 59904, 30]  # "Is there a fracture?"
REPLY = [7566, 11, 1070, 374, 264, 59904, 13]  # " Yes, there is a fracture."
PANEL_PH = [4480, 220, PH_ID, 5039, 264, 3148, 13]  # "Panel ① shows a mass."
PANEL_1 = [4480, 320, 16, 8, 5039, 264, 3148, 13]  # "Panel (1) shows a mass."


def header(role_id):
    return [SH, role_id, EH, NL2]


def enc(tok, text):
    return tok.encode(text, add_bos=False, add_eos=False)


def save_png(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8), "RGB").save(path)
    return path


def dataset_item(tok, tmp_path, conversations, **kw):
    """Item 0 of ``image_chat_dataset`` over one sharegpt record with a real image."""
    from medcap.data import image_chat_dataset

    save_png(tmp_path / "img" / "a.png")
    record = {"conversations": conversations, "image": "a.png", "meta": f"dir={tmp_path / 'img'}"}
    src = tmp_path / "d.json"
    src.write_text(json.dumps([record], ensure_ascii=False), encoding="utf-8")
    return image_chat_dataset(tok, source=str(src), num_image_tokens=N, image_size=16, bad_samples="raise", **kw)[0]


# ---- the table itself


def test_real_table_ids(llama3_tokenizer):
    tok = llama3_tokenizer
    assert enc(tok, PH * 50) == [PH_ID] * 50
    assert tok.encode("Hello world", add_bos=True, add_eos=False) == [BOT, 9906, 1917]
    assert (tok.bos_id, tok.eos_id, tok.eot_id, tok.image_id) == (BOT, EOT_TEXT, EOT, IMG)
    assert tok.special_tokens["<|start_header_id|>"] == SH and tok.special_tokens["<|end_header_id|>"] == EH
    assert [enc(tok, w) for w in ("user", "assistant", "system", "\n\n")] == [[USER], [ASSISTANT], [SYSTEM], [NL2]]
    assert enc(tok, "Describe the image.") == DESCRIBE[1:] and enc(tok, "The scan shows a mass.") == CAPTION


# ---- training tokens and labels

RECORD = [
    {"from": "human", "value": PH * 50 + "\n\nDescribe the image."},
    {"from": "gpt", "value": "The scan shows a mass."},
]
# <|begin_of_text|> user-turn(placeholders, instruction) assistant-turn(caption) <|end_of_text|>
USER_TURN = header(USER) + [IMG] * N + DESCRIBE + [EOT]
ASSISTANT_TURN = header(ASSISTANT) + CAPTION + [EOT]
EXPECTED = [BOT] + USER_TURN + ASSISTANT_TURN + [EOT_TEXT]


def test_training_tokens_are_the_llama3_template(llama3_tokenizer, tmp_path):
    item = dataset_item(llama3_tokenizer, tmp_path, RECORD)
    assert item["tokens"] == EXPECTED
    assert PH_ID not in item["tokens"]  # the marker never reaches the model as text
    assert item["image"].shape == (3, 16, 16)


def test_training_labels_mask_user_turn_and_image(llama3_tokenizer, tmp_path):
    item = dataset_item(llama3_tokenizer, tmp_path, RECORD)
    masked = 1 + len(USER_TURN)  # <|begin_of_text|> and the whole user turn
    assert item["labels"] == [-100] * masked + ASSISTANT_TURN + [-100]


def test_training_labels_with_train_on_input_still_skip_image_and_next(llama3_tokenizer, tmp_path):
    item = dataset_item(llama3_tokenizer, tmp_path, RECORD, train_on_input=True)
    # the placeholders (5..54) and the "\n\n" right after them (55) are never learnt
    expected = [-100] + header(USER) + [-100] * (N + 1) + DESCRIBE[1:] + [EOT] + ASSISTANT_TURN + [-100]
    assert item["tokens"] == EXPECTED
    assert item["labels"] == expected


def test_system_turn_and_image_only_user_turn(llama3_tokenizer, tmp_path):
    conv = [
        {"from": "system", "value": "You are a radiologist."},
        {"from": "human", "value": PH * 50},
        {"from": "gpt", "value": "The scan shows a mass."},
    ]
    item = dataset_item(llama3_tokenizer, tmp_path, conv)
    system = header(SYSTEM) + SYSTEM_PROMPT + [EOT]
    user = header(USER) + [IMG] * N + [EOT]
    assert item["tokens"] == [BOT] + system + user + ASSISTANT_TURN + [EOT_TEXT]
    assert item["labels"] == [-100] * (1 + len(system) + len(user)) + ASSISTANT_TURN + [-100]


# ---- the converters' ① -> (1)


def test_converted_caption_holds_no_placeholder_token(llama3_tokenizer, tmp_path, capsys):
    from medcap.data import convert_main, image_chat_dataset

    tok = llama3_tokenizer
    root = tmp_path / "datasets" / "pmc_oa"
    save_png(root / "caption_T060_filtered_top4_sep_v0_subfigures" / "a.jpg")
    raw = "Panel \u2460 shows a mass."
    (root / "train.jsonl").write_text(json.dumps({"image": "a.jpg", "caption": raw}) + "\n", encoding="utf-8")
    assert enc(tok, raw) == PANEL_PH  # unconverted, the caption would carry the placeholder token

    args = ["--dataset", "pmcoa", "--data_dir", str(tmp_path / "datasets"), "--save_dir", str(tmp_path / "out"),
            "--no-progress"]
    assert convert_main(args) == 0, capsys.readouterr().err
    [record] = json.loads((tmp_path / "out" / "pmcoa_train.json").read_text(encoding="utf-8"))
    human, gpt = (t["value"] for t in record["conversations"])
    assert enc(tok, gpt) == PANEL_1
    assert enc(tok, human) == [PH_ID] * 50  # the human turn keeps exactly the 50 markers

    item = image_chat_dataset(tok, source=str(tmp_path / "out" / "pmcoa_train.json"), num_image_tokens=N,
                              image_size=16, bad_samples="raise")[0]
    user = header(USER) + [IMG] * N + [EOT]
    assert item["tokens"] == [BOT] + user + header(ASSISTANT) + PANEL_1 + [EOT, EOT_TEXT]


# ---- generation prompts and replies


def test_reply_is_cut_at_the_first_special_token(llama3_tokenizer):
    from medcap.generation._prompt import decode_text

    new_tokens = REPLY + [EOT] + [128006, 9906, 1917, EOT_TEXT]  # whatever follows <|eot_id|> is dropped
    assert decode_text(llama3_tokenizer, new_tokens) == "Yes, there is a fracture."
    assert decode_text(llama3_tokenizer, REPLY + [EOT_TEXT]) == "Yes, there is a fracture."
    assert decode_text(llama3_tokenizer, [EOT] + REPLY) == ""


def test_engine_text_is_decode_text_of_the_new_tokens(llama3_tokenizer):
    from medcap.generation import GenerationEngine

    engine = GenerationEngine(SimpleNamespace(num_image_tokens=N), llama3_tokenizer)
    engine.generate_tokens = lambda prompts, images, max_new_tokens, keys: [REPLY + [EOT, 9906], [EOT]]
    texts = engine.generate_texts([[BOT], [BOT]], [None, None], 8, ["a", "b"])
    assert texts == ["Yes, there is a fracture.", ""]


def test_text_prompt_is_the_llama3_template(llama3_tokenizer):
    from medcap.generation import GenerationEngine, build_prompt

    expected = [BOT] + header(USER) + QUESTION + [EOT] + header(ASSISTANT)
    tok = llama3_tokenizer
    assert build_prompt(tok, "Is there a fracture?", num_image_tokens=N, has_image=False) == expected
    engine = GenerationEngine(SimpleNamespace(num_image_tokens=N), tok)
    assert engine.prompt("Is there a fracture?", has_image=False) == expected


def test_image_prompt_matches_training_layout(llama3_tokenizer):
    from medcap.generation import build_prompt

    expected = [BOT] + header(USER) + [IMG] * N + [NL2] + QUESTION + [EOT] + header(ASSISTANT)
    assert build_prompt(llama3_tokenizer, "Is there a fracture?", num_image_tokens=N) == expected
    # a literal ① in a question is rewritten as the converters do, never a second image
    got = build_prompt(llama3_tokenizer, "Panel \u2460 shows a mass.", num_image_tokens=N)
    assert got == [BOT] + header(USER) + [IMG] * N + [NL2] + PANEL_1 + [EOT] + header(ASSISTANT)


def test_prompt_text_round_trip(llama3_tokenizer):
    from medcap.generation import build_prompt, prompt_text, prompt_tokens_from_text

    tokens = build_prompt(llama3_tokenizer, "Is there a fracture?", num_image_tokens=N)
    text = prompt_text(llama3_tokenizer, tokens)
    assert text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n" + PH * N
        + "\n\nIs there a fracture?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert prompt_tokens_from_text(llama3_tokenizer, text, num_image_tokens=N) == (tokens, True)
