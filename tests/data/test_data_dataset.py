"""The image chat dataset: files and splits, the default length, construction that reads only
the index, torchtune's chat_dataset arguments, pickling for spawned workers."""

from __future__ import annotations

import json
import time

import pytest
import torch

from medcap.data import chat_dataset, image_chat_dataset
from tests.data.chat_samples import N, S
from tests.data.chat_samples import make_dataset as _ds


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


def test_tokenizer_max_seq_len_is_the_default(tmp_path, tok, dh):
    from medcap.models import llama3_tokenizer

    t = llama3_tokenizer(str(tok.paths["path"]), str(tok.paths["special_tokens_path"]), max_seq_len=30)
    ds = _ds(t, tmp_path, dh, [dh.rec(gpt="word " * 40)])
    assert ds.max_seq_len == 30 and len(ds[0]["tokens"]) == 30


def test_all_bad_fails_with_a_clear_message(tok, tmp_path, dh):
    ds = _ds(tok, tmp_path, dh, [dh.rec(image="gone.png"), dh.rec(image="gone2.png")])
    with pytest.raises(RuntimeError, match="every one of the 2 samples.*image not found"):
        ds[0]


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


def test_dataset_pickles_for_spawned_workers(tok, tmp_path, dh):
    import pickle

    ds = _ds(tok, tmp_path, dh, [dh.rec(gpt="one."), dh.rec(image="gone.png")])
    ds.skip_log.add(1, "image not found: gone.png")
    clone = pickle.loads(pickle.dumps(ds))
    assert clone[0]["tokens"] == ds[0]["tokens"]
    torch.testing.assert_close(clone[0]["image"], ds[0]["image"])
    assert clone.skip_log.count == 1 and clone[1]["index"] == 0
