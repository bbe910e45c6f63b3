"""The image chat dataset: template, markers, labels, truncation, bad records, policies."""

from __future__ import annotations

import json
import logging
import time

import pytest
import torch

from medcap.data import BadSample, SkipLog, chat_dataset, image_chat_dataset

N = 4  # image tokens in these tests
S = 16  # image side


def _b(text: str):
    return list(text.encode("utf-8"))


def _expected(special, turns, n_img=N):
    """Tokens of the Llama 3 template, written out by hand for a byte-level tokenizer.

    ``turns``: (role, [pieces]) with pieces str (text bytes) or None (the image run).
    """
    out = [special["<|begin_of_text|>"]]
    for role, pieces in turns:
        out += [special["<|start_header_id|>"]] + _b(role) + [special["<|end_header_id|>"]] + _b("\n\n")
        for p in pieces:
            out += [special["<|image|>"]] * n_img if p is None else _b(p)
        out.append(special["<|eot_id|>"])
    return out + [special["<|end_of_text|>"]]


def _ds(tok, tmp_path, dh, records, jsonl=False, **kw):
    dh.save_rgb(tmp_path / "img" / "img.png", 20, 12)
    path = dh.write_records(tmp_path / ("d.jsonl" if jsonl else "d.json"), records, tmp_path / "img", jsonl=jsonl)
    kw.setdefault("num_image_tokens", N)
    kw.setdefault("image_size", S)
    return image_chat_dataset(tok, source=str(path), **kw)


# ------------------------------------------------------------------ template and markers


@pytest.mark.parametrize("marker", ["\u2460" * 50, "\u2460", "\u2460 \u2460\u2460", "<image>", "<|image|>"])
def test_marker_run_becomes_n_placeholders_with_instruction_kept(tok, special, tmp_path, dh, marker):
    ds = _ds(tok, tmp_path, dh, [dh.rec(human=marker + "\n\nDescribe it.", gpt="A cat.")])
    item = ds[0]
    assert item["tokens"] == _expected(
        special, [("user", [None, "\n\nDescribe it."]), ("assistant", ["A cat."])]
    )
    assert item["image"].shape == (3, S, S)
    assert item["skipped"] == [] and item["index"] == 0


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


def test_image_without_marker_is_prepended_to_first_user_turn(tok, special, tmp_path, dh):
    ds = _ds(tok, tmp_path, dh, [dh.rec(human="What is shown?", gpt="Lungs.")])
    assert ds[0]["tokens"] == _expected(
        special, [("user", [None, "\n\nWhat is shown?"]), ("assistant", ["Lungs."])]
    )


def test_text_only_samples_system_and_multi_turn(tok, special, tmp_path, dh):
    extra = [{"from": "human", "value": "And?"}, {"from": "gpt", "value": "No."}]
    records = [
        dh.rec(human="Hi", gpt="Hello.", image=None, meta=None),
        dh.rec(human="Hi", gpt="Hello.", meta=""),  # empty meta: text-only even with an image key
        {"conversations": [{"from": "system", "value": "Be brief."}] + dh.rec(gpt="Ok.", extra_turns=extra)["conversations"],
         "image": "img.png", "meta": "__dir__"},
    ]
    ds = _ds(tok, tmp_path, dh, records)
    for i in (0, 1):
        assert ds[i]["image"] is None
        assert ds[i]["tokens"] == _expected(special, [("user", ["Hi"]), ("assistant", ["Hello."])])
    item = ds[2]
    assert item["image"] is not None
    exp = _expected(
        special,
        [("system", ["Be brief."]), ("user", [None]), ("assistant", ["Ok."]), ("user", ["And?"]), ("assistant", ["No."])],
    )
    assert item["tokens"] == exp
    learnt = [t for t, lab in zip(item["tokens"], item["labels"]) if lab != -100]
    assert bytes(t for t in learnt if t < 256) == b"assistant\n\nOk.assistant\n\nNo."


def test_new_system_prompt_replaces_system_turns(tok, special, tmp_path, dh):
    r = {"conversations": [{"from": "system", "value": "old"}] + dh.rec(gpt="Ok.")["conversations"],
         "image": "img.png", "meta": "__dir__"}
    ds = _ds(tok, tmp_path, dh, [r], new_system_prompt="new")
    assert ds[0]["tokens"] == _expected(special, [("system", ["new"]), ("user", [None]), ("assistant", ["Ok."])])


def test_jsonl_folder_and_split(tok, tmp_path, dh):
    recs = [dh.rec(gpt=f"caption {i}.") for i in range(10)]
    dh.save_rgb(tmp_path / "img" / "img.png")
    dh.write_records(tmp_path / "src" / "a.jsonl", recs[:6], tmp_path / "img", jsonl=True)
    dh.write_records(tmp_path / "src" / "b.json", recs[6:], tmp_path / "img")
    ds = image_chat_dataset(tok, source=tmp_path / "src", num_image_tokens=N, image_size=S)
    assert len(ds) == 10
    assert ds.record(7)["conversations"][1]["value"] == "caption 7."
    assert ds.origin(2) == "a.jsonl line 3" and ds.origin(7) == "b.json item 1"
    head = image_chat_dataset(tok, source=tmp_path / "src", split="train[:30%]", num_image_tokens=N, image_size=S)
    tail = image_chat_dataset(tok, source=tmp_path / "src", split="train[-2:]", num_image_tokens=N, image_size=S)
    assert len(head) == 3 and len(tail) == 2
    assert tail.record(0)["conversations"][1]["value"] == "caption 8."
    with pytest.raises(ValueError, match="split"):
        image_chat_dataset(tok, source=tmp_path / "src", split="validation")


def test_relative_meta_dir_resolves_against_json_folder(tok, tmp_path, dh, monkeypatch):
    dh.save_rgb(tmp_path / "data" / "imgs" / "x.png", 20, 20)
    path = dh.write_records(tmp_path / "data" / "d.json", [dh.rec(image="x.png", meta="dir=imgs")], tmp_path)
    monkeypatch.chdir(tmp_path)  # "imgs" is not relative to the working directory
    ds = image_chat_dataset(tok, source=path, num_image_tokens=N, image_size=S, bad_samples="raise")
    assert ds[0]["image"].shape == (3, S, S)


# ------------------------------------------------------------------ truncation


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


def test_tokenizer_max_seq_len_is_the_default(tmp_path, tok, dh):
    from medcap.models import llama3_tokenizer

    t = llama3_tokenizer(str(tok.paths["path"]), str(tok.paths["special_tokens_path"]), max_seq_len=30)
    ds = _ds(t, tmp_path, dh, [dh.rec(gpt="word " * 40)])
    assert ds.max_seq_len == 30 and len(ds[0]["tokens"]) == 30


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


# ------------------------------------------------------------------ bad records


BAD = {
    "not an object": (["a", "list"], "malformed record"),
    "no conversations": ({"image": "img.png", "meta": "__dir__"}, "malformed record"),
    "conversations not a list": ({"conversations": "hi"}, "malformed record"),
    "empty conversations": ({"conversations": []}, "malformed record"),
    "message without value": ({"conversations": [{"from": "human"}]}, "malformed record"),
    "unknown role": ({"conversations": [{"from": "robot", "value": "x"}]}, "malformed record"),
    "value not a string": ({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]}, "malformed record"),
    "no assistant turn": ({"conversations": [{"from": "human", "value": "x"}]}, "malformed record"),
    "empty assistant": ({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "  "}]}, "malformed record"),
    "no user turn": ({"conversations": [{"from": "gpt", "value": "x"}]}, "malformed record"),
    "two markers": ({"conversations": [{"from": "human", "value": "<image> and \u2460\u2460"}, {"from": "gpt", "value": "a"}],
                     "image": "img.png", "meta": "__dir__"}, "malformed record"),
    "two images": ({**{"conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}]},
                    "image": ["img.png", "img.png"], "meta": "__dir__"}, "malformed record"),
    "image not a string": ({"conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}],
                            "image": 7, "meta": "__dir__"}, "malformed record"),
    "meta not key=value": ({"conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}],
                            "image": "img.png", "meta": "nodir"}, "malformed record"),
    "marker without image": ({"conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}]},
                             "marker without image"),
    "marker, empty meta": ({"conversations": [{"from": "human", "value": "\u2460" * 50}, {"from": "gpt", "value": "a"}],
                           "image": "img.png", "meta": ""}, "marker without image"),
    "missing image file": ({"conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}],
                           "image": "nope.png", "meta": "__dir__"}, "image not found"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_record_reasons_under_raise_policy(tok, tmp_path, dh, name):
    record, kind = BAD[name]
    ds = _ds(tok, tmp_path, dh, [record], bad_samples="raise")
    with pytest.raises(BadSample) as e:
        ds[0]
    assert e.value.reason.startswith(kind), e.value.reason
    assert e.value.index == 0 and "sample 0" in str(e.value)


def test_invalid_json_line_is_one_bad_sample(tok, tmp_path, dh):
    dh.save_rgb(tmp_path / "img" / "img.png")
    path = dh.write_records(tmp_path / "d.jsonl", [dh.rec(), dh.rec()], tmp_path / "img", jsonl=True)
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n{broken\n" + lines[1] + "\n")
    ds = image_chat_dataset(tok, source=path, num_image_tokens=N, image_size=S)
    assert len(ds) == 3
    assert ds[1]["index"] == 2 and ds[1]["skipped"][0][0] == 1
    assert "invalid JSON at d.jsonl line 2" in ds[1]["skipped"][0][1]


def test_skip_policy_moves_to_next_good_sample_deterministically(tok, tmp_path, dh, caplog):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "bad.png").write_bytes(b"not a png")
    records = [dh.rec(gpt="zero."), BAD["no assistant turn"][0], dh.rec(image="bad.png"), dh.rec(gpt="three."), dh.rec(image="gone.png")]
    ds = _ds(tok, tmp_path, dh, records)
    item = ds[1]
    assert item["index"] == 3 and [i for i, _ in item["skipped"]] == [1, 2]
    assert item["tokens"] == ds[3]["tokens"]
    wrapped = ds[4]  # the last record is bad: wraps to record 0
    assert wrapped["index"] == 0 and wrapped["skipped"][0][0] == 4
    assert ds[1]["skipped"] == item["skipped"]  # same answer the second time (known-bad cache)

    log = SkipLog(total=len(ds))
    with caplog.at_level(logging.WARNING, logger="medcap.data"):
        for i in range(len(ds)):
            log.update(ds[i])
        log.update(ds[2])  # seen again: neither logged nor counted twice
    assert log.count == 3 and sorted(log.reasons) == [1, 2, 4]
    assert sum("skipping sample" in r.message for r in caplog.records) == 3
    s = log.summary()
    assert "3 of 5 skipped (60.00%)" in s
    for kind in ("malformed record", "corrupt image", "image not found"):
        assert f"1 {kind}" in s
    assert log.events > log.count


def test_all_bad_fails_with_a_clear_message(tok, tmp_path, dh):
    ds = _ds(tok, tmp_path, dh, [dh.rec(image="gone.png"), dh.rec(image="gone2.png")])
    with pytest.raises(RuntimeError, match="every one of the 2 samples.*image not found"):
        ds[0]


# ------------------------------------------------------------------ construction and aliases


def test_construction_reads_only_the_index(tok, tmp_path, dh, monkeypatch):
    """200k records: no image opened, nothing tokenized, a few seconds at most."""
    n = 200_000
    line = json.dumps(dh.rec(gpt="a small opacity in the left upper lobe.", meta="dir=/nowhere"), ensure_ascii=False)
    (tmp_path / "big.jsonl").write_text("\n".join([line] * n) + "\n", encoding="utf-8")
    (tmp_path / "big.json").write_text("[" + ",".join([line] * n) + "]", encoding="utf-8")

    class NoTok:
        image_id = 999
        max_seq_len = None

        def __getattr__(self, name):
            raise AssertionError(f"tokenizer.{name} used at construction")

    import PIL.Image

    def no_open(*a, **k):
        raise AssertionError("an image was opened at construction")

    monkeypatch.setattr(PIL.Image, "open", no_open)
    for name, limit in (("big.jsonl", 5.0), ("big.json", 10.0)):
        t0 = time.perf_counter()
        ds = image_chat_dataset(NoTok(), source=tmp_path / name)
        took = time.perf_counter() - t0
        assert len(ds) == n
        assert took < limit, f"{name}: {took:.1f}s"
    assert ds.record(n - 1)["conversations"][1]["value"].startswith("a small opacity")


def test_chat_dataset_alias_takes_torchtune_arguments(tok, tmp_path, dh):
    dh.save_rgb(tmp_path / "img" / "img.png")
    path = dh.write_records(tmp_path / "d.json", [dh.rec()], tmp_path / "img")
    a = chat_dataset(tok, source=str(path), conversation_column="conversations", conversation_style="sharegpt",
                     train_on_input=False, max_seq_len=500, num_image_tokens=N, image_size=S)
    b = chat_dataset(tok, source="json", data_files=str(path), conversation_column="conversations",
                     conversation_style="sharegpt", split="train", num_image_tokens=N, image_size=S)
    assert a[0]["tokens"] == b[0]["tokens"] and a.max_seq_len == 500
    for bad, msg in ((dict(packed=True), "packed"), (dict(conversation_style="openai"), "sharegpt"),
                     (dict(filter_fn=len), "filter_fn"), (dict(chat_format="x"), "chat_format"),
                     (dict(column_map={}), "unsupported")):
        with pytest.raises(ValueError, match=msg):
            chat_dataset(tok, source=str(path), **bad)
    with pytest.raises(FileNotFoundError, match="dataset file not found"):
        chat_dataset(tok, source=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="bad_samples"):
        image_chat_dataset(tok, source=str(path), bad_samples="ignore")


def test_prompt_mode_leaves_the_assistant_turn_open(tok, special):
    from medcap.data import Turn, tokenize_conversation

    t = tokenize_conversation(tok, [Turn("user", "<image>"), Turn("assistant", "")], num_image_tokens=N,
                              add_end_tokens=False)
    exp = _expected(special, [("user", [None]), ("assistant", [])])
    assert t.tokens == exp[:-2]  # no <|eot_id|> after the open turn, no <|end_of_text|>
    assert t.image_starts == [1 + 8]


def test_dataset_pickles_for_spawned_workers(tok, tmp_path, dh):
    import pickle

    ds = _ds(tok, tmp_path, dh, [dh.rec(gpt="one."), dh.rec(image="gone.png")])
    ds.skip_log.add(1, "image not found: gone.png")
    clone = pickle.loads(pickle.dumps(ds))
    assert clone[0]["tokens"] == ds[0]["tokens"]
    torch.testing.assert_close(clone[0]["image"], ds[0]["image"])
    assert clone.skip_log.count == 1 and clone[1]["index"] == 0
