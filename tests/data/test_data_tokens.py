"""Tokens and labels under the Llama 3 template: masks, the image placeholders, truncation that
never cuts the image, the open prompt turn, the ignore index."""

from __future__ import annotations

import pytest

from medcap.data import BadSample
from tests.data.chat_samples import N
from tests.data.chat_samples import expected_tokens as _expected
from tests.data.chat_samples import make_dataset as _ds


def test_labels_mask_user_turn_and_keep_assistant(tok, special, tmp_path, dh):
    ds = _ds(tok, tmp_path, dh, [dh.rec(human=dh.PH * 50, gpt="Yes.")])
    item = ds[0]
    toks, labels = item["tokens"], item["labels"]
    a = toks.index(special["<|eot_id|>"]) + 1  # first token of the assistant turn
    assert all(lab == -100 for lab in labels[:a])
    assert labels[a:-1] == toks[a:-1]  # assistant header, answer and its <|eot_id|>
    assert labels[-1] == -100  # <|end_of_text|>


def test_labels_exclude_placeholders_and_the_next_position(tok, special, tmp_path, dh):
    # With train_on_input the user turn is learnt, which makes the image rule visible.
    ds = _ds(tok, tmp_path, dh, [dh.rec(human="Look: <image>\n\nWhat?", gpt="Yes.")], train_on_input=True)
    toks, labels = ds[0]["tokens"], ds[0]["labels"]
    img = [i for i, t in enumerate(toks) if t == special["<|image|>"]]
    assert len(img) == N and img == list(range(img[0], img[0] + N))
    excluded = set(img) | {i + 1 for i in img}
    for i, (t, lab) in enumerate(zip(toks, labels)):
        if i == 0 or i == len(toks) - 1 or i in excluded:
            assert lab == -100, i
        else:
            assert lab == t, i
    assert toks[img[-1] + 1] == ord("\n")  # the excluded next position is real text


def test_truncation_cuts_text_from_the_end_never_the_image(tok, special, tmp_path, dh):
    answer = "word " * 40
    ds = _ds(tok, tmp_path, dh, [dh.rec(gpt=answer)], bad_samples="raise")
    full = ds[0]["tokens"]
    assert len(full) > 60
    short = _ds(tok, tmp_path, dh, [dh.rec(gpt=answer)], max_seq_len=40, bad_samples="raise")[0]
    assert len(short["tokens"]) == 40 and len(short["labels"]) == 40
    assert short["tokens"][:39] == full[:39]  # a prefix: only the end was dropped
    assert short["tokens"][-1] == special["<|end_of_text|>"] and short["labels"][-1] == -100
    assert special["<|eot_id|>"] not in short["tokens"][full.index(special["<|eot_id|>"]) + 1 :]  # cut answer not closed
    assert short["tokens"].count(special["<|image|>"]) == N
    assert any(lab != -100 for lab in short["labels"])


@pytest.mark.parametrize(
    "max_seq_len, why", [(10, "the image cannot fit"), (20, "nothing of the answer"), (28, "nothing of the answer")]
)
def test_impossible_length_is_a_bad_sample(tok, tmp_path, dh, max_seq_len, why):
    # prompt: bos(1) + user header(8) + placeholders(4) + eot(1) + assistant header(13) = 27 tokens;
    # truncation keeps max_seq_len - 1 of them and ends with <|end_of_text|>.
    ds = _ds(tok, tmp_path, dh, [dh.rec(human=dh.PH, gpt="Long answer.")], max_seq_len=max_seq_len, bad_samples="raise")
    with pytest.raises(BadSample, match="too long") as e:
        ds[0]
    assert e.value.index == 0 and why in e.value.reason
    ok = _ds(tok, tmp_path, dh, [dh.rec(human=dh.PH, gpt="Long answer.")], max_seq_len=29, bad_samples="raise")[0]
    assert len(ok["tokens"]) == 29 and ok["tokens"].count(tok.image_id) == N
    assert [lab for lab in ok["labels"] if lab != -100][-1] == ord("L")  # one answer token learnt


def test_prompt_mode_leaves_the_assistant_turn_open(tok, special):
    from medcap.data import Turn, tokenize_conversation

    t = tokenize_conversation(tok, [Turn("user", "<image>"), Turn("assistant", "")], num_image_tokens=N,
                              add_end_tokens=False)
    exp = _expected(special, [("user", [None]), ("assistant", [])])
    assert t.tokens == exp[:-2]  # no <|eot_id|> after the open turn, no <|end_of_text|>
    assert t.image_starts == [1 + 8]


def test_ignore_index_matches_torchtune():
    from torchtune.data import CROSS_ENTROPY_IGNORE_IDX as TT

    from medcap.data._tokens import CROSS_ENTROPY_IGNORE_IDX

    assert CROSS_ENTROPY_IGNORE_IDX == TT
