"""Sharegpt records as the dataset reads them: markers, roles, image paths, the index, and every
broken record refused with its reason."""

from __future__ import annotations

import pytest

from medcap.data import BadSample, image_chat_dataset
from tests.data.chat_samples import BAD, N, S
from tests.data.chat_samples import expected_tokens as _expected
from tests.data.chat_samples import make_dataset as _ds


@pytest.mark.parametrize("marker", ["\u2460" * 50, "\u2460", "\u2460 \u2460\u2460", "<image>", "<|image|>"])
def test_marker_run_becomes_n_placeholders_with_instruction_kept(tok, special, tmp_path, dh, marker):
    ds = _ds(tok, tmp_path, dh, [dh.rec(human=marker + "\n\nDescribe it.", gpt="A cat.")])
    item = ds[0]
    assert item["tokens"] == _expected(
        special, [("user", [None, "\n\nDescribe it."]), ("assistant", ["A cat."])]
    )
    assert item["image"].shape == (3, S, S)
    assert item["skipped"] == [] and item["index"] == 0


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


def test_relative_meta_dir_resolves_against_json_folder(tok, tmp_path, dh, monkeypatch):
    dh.save_rgb(tmp_path / "data" / "imgs" / "x.png", 20, 20)
    path = dh.write_records(tmp_path / "data" / "d.json", [dh.rec(image="x.png", meta="dir=imgs")], tmp_path)
    monkeypatch.chdir(tmp_path)  # "imgs" is not relative to the working directory
    ds = image_chat_dataset(tok, source=path, num_image_tokens=N, image_size=S, bad_samples="raise")
    assert ds[0]["image"].shape == (3, S, S)


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
