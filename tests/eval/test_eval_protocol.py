"""The two-step VQA protocol per vqa_type, the description budget, the per-image
description cache, and resuming a stopped run to identical files."""

from __future__ import annotations

from pathlib import Path

import pytest

from medcap.eval import (
    OMNIMEDVQA_EXTRA_COLUMNS,
    ImageLoader,
    VQA_TYPES,
    VQAItem,
    answer_messages,
    description_budget,
    drop_missing_images,
    make_omnimedvqa_layout,
    read_csv_rows,
    read_omnimedvqa,
    run_vqa,
)
from medcap.generation import IMAGE_PLACEHOLDER, question_from_instruction
from medcap.testing import make_image


def _items(tmp_path, n_images=3, questions=((0, "Is it normal?"), (0, "Any mass?"), (1, "Which side?"), (0, "Size?"), (2, "Contrast?"))):
    paths = [str(make_image(tmp_path / f"img{i}.png", 32, seed=i)) for i in range(n_images)]
    return [VQAItem(image=paths[i], question=q, answer=f"gt{k}", key=f"k{k}") for k, (i, q) in enumerate(questions)]


def _reply(text, key, budget):
    return f"description for {key}" if key.startswith("desc:") else f"answer for {key}"


@pytest.mark.parametrize("vqa_type", VQA_TYPES)
def test_each_vqa_type_runs_the_references_two_steps(vqa_type, scripted, fake_image_loader, tmp_path):
    items = _items(tmp_path)
    engine = scripted(_reply, batch_size=2)
    rows = run_vqa(engine, items, vqa_type=vqa_type, raw_path=tmp_path / "raw.csv", image_loader=fake_image_loader,
                   max_seq_len=500, max_new_tokens=200, progress=False)
    desc_calls = [(t, img, b, k) for c in engine.calls for t, img, b, k in zip(*c) if k.startswith("desc:")]
    ans_calls = [(t, img, b, k) for c in engine.calls for t, img, b, k in zip(*c) if k.startswith("answer:")]
    with_image = not vqa_type.endswith("_no_image")
    assert len(ans_calls) == len(items)
    assert all(img == with_image for _, img, _, _ in desc_calls + ans_calls)
    assert all(b == 50 for _, _, b, _ in ans_calls)  # min(50, max_new_tokens)
    first_turn = IMAGE_PLACEHOLDER * 4 if with_image else "Describe the image."
    for t, _, _, _ in desc_calls + ans_calls:
        assert t.startswith(f"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{first_turn}<|eot_id|>")
        assert (IMAGE_PLACEHOLDER in t) == with_image
    if vqa_type.startswith("no_cond_desc"):
        # One description per image, at its first question, reused afterwards.
        assert [k for *_, k in desc_calls] == [f"desc:{items[0].image}", f"desc:{items[2].image}", f"desc:{items[4].image}"]
        assert all(t.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n") and t.count("<|start_header_id|>") == 2
                   for t, *_ in desc_calls)
        expect_desc = [f"description for desc:{it.image}" for it in items]
    elif vqa_type.startswith("cond_desc"):
        assert [k for *_, k in desc_calls] == [f"desc:{it.key}" for it in items]
        for (t, *_), it in zip(desc_calls, items):
            assert f"<|start_header_id|>assistant<|end_header_id|>\n\n...<|eot_id|>" in t
            assert f"Describe the image to answer the question: {it.question}<|eot_id|>" in t
        expect_desc = [f"description for desc:{it.key}" for it in items]
    else:
        assert desc_calls == []
        expect_desc = ["..."] * len(items)
    for row, it, d in zip(rows, items, expect_desc):
        assert row["image"] == it.image and row["output"] == it.answer and row["generated"] == f"answer for answer:{it.key}"
        assert f"<|start_header_id|>assistant<|end_header_id|>\n\n{d}<|eot_id|>" in row["instruction"]
        assert question_from_instruction(row["instruction"]) == it.question
    assert read_csv_rows(tmp_path / "raw.csv") == rows
    if not with_image:
        assert fake_image_loader.loads == []


def test_unknown_vqa_type_is_an_error(scripted, fake_image_loader, tmp_path):
    with pytest.raises(ValueError, match="vqa_type"):
        run_vqa(scripted(_reply), _items(tmp_path), vqa_type="cond", raw_path=tmp_path / "r.csv",
                image_loader=fake_image_loader, max_seq_len=500, max_new_tokens=10, progress=False)


def test_description_budget_leaves_room_for_the_answer_prompt(ev_tok, scripted):
    engine = scripted(_reply)
    q = "Is there a pleural effusion on the left?"
    for vqa_type in ("no_cond_desc", "cond_desc_no_image"):
        budget = description_budget(engine, vqa_type, q, max_seq_len=200, max_new_tokens=500)
        assert 0 < budget < 200
        # The byte-level tokenizer makes one token per ASCII character: a description that
        # uses the whole budget leaves exactly the 5 spare tokens of the rule.
        full = engine.prompt(answer_messages(vqa_type, "x" * budget, q), has_image=vqa_type == "no_cond_desc")
        assert len(full) == 200 - 5
        assert description_budget(engine, vqa_type, q, max_seq_len=200, max_new_tokens=7) == 7
        assert description_budget(engine, vqa_type, q, max_seq_len=20, max_new_tokens=7) == 0


def test_restart_reuses_descriptions_and_skips_unreadable_images(scripted, fake_image_loader, tmp_path):
    items = _items(tmp_path)
    bad = tmp_path / "broken.png"
    items.insert(2, VQAItem(image=str(bad), question="Broken?", answer="x", key="kbad"))
    bad.write_bytes(b"not an image")
    Path(bad).unlink()  # the loader reports it missing, mid-run

    class Stop(Exception):
        pass

    def stop_after_first_batch(n):
        raise Stop

    engine = scripted(_reply, batch_size=2)
    raw = tmp_path / "raw.csv"
    with pytest.raises(Stop):
        run_vqa(engine, items, vqa_type="no_cond_desc", raw_path=raw, image_loader=fake_image_loader,
                max_seq_len=500, max_new_tokens=20, progress=False, on_batch=stop_after_first_batch)
    first = [k for c in engine.calls for k in c[3] if k.startswith("desc:")]
    assert first == [f"desc:{items[0].image}"]
    engine2 = scripted(_reply, batch_size=2)
    rows = run_vqa(engine2, items, vqa_type="no_cond_desc", raw_path=raw, image_loader=fake_image_loader,
                   max_seq_len=500, max_new_tokens=20, progress=False)
    second = [k for c in engine2.calls for k in c[3] if k.startswith("desc:")]
    assert f"desc:{items[0].image}" not in second  # cached on disk, not generated again
    assert [r["output"] for r in rows] == [it.answer for it in items if it.key != "kbad"]
    assert (tmp_path / "raw.skipped.jsonl").read_text().count("kbad") == 1


@pytest.fixture(scope="module")
def omni_items(tmp_path_factory):
    root = tmp_path_factory.mktemp("omni")
    make_omnimedvqa_layout(root, per_modality=1, image_size=36)
    items, _ = read_omnimedvqa(root)
    return drop_missing_images(items)[0][:7]


@pytest.mark.parametrize("sampling", [False, True])
def test_interrupted_and_half_written_run_resumes_to_identical_files(omni_items, ev_engine_factory, tmp_path, sampling):
    """A real (tiny) model: greedy is deterministic, sampling is per row; a run stopped
    after its first batch, whose partial file then loses half a row (as a kill -9 mid
    write would leave it), ends with the same bytes as an uninterrupted run."""
    kw = dict(temperature=0.9, top_k=50, seed=3) if sampling else {}
    engine = ev_engine_factory(batch_size=3, **kw)
    loader = ImageLoader(engine.model.vision.visual.image_size)
    args = dict(vqa_type="no_cond_desc", image_loader=loader, max_seq_len=120, max_new_tokens=6,
                extra_columns=OMNIMEDVQA_EXTRA_COLUMNS, progress=False)
    ref = tmp_path / "ref" / "raw.csv"
    run_vqa(engine, omni_items, raw_path=ref, **args)

    class Killed(Exception):
        pass

    def kill(n):
        raise Killed

    run = tmp_path / "run" / "raw.csv"
    with pytest.raises(Killed):
        run_vqa(engine, omni_items, raw_path=run, on_batch=kill, **args)
    partial = run.with_name("raw.partial.csv")
    assert len(read_csv_rows(partial)) == 3 and not run.exists()
    # Half of the next row reached the disk before the kill.
    next_row = ref.read_bytes().split(b"\n/")[4]
    with open(partial, "ab") as f:
        f.write(b"/" + next_row[: len(next_row) // 2])
    resumed = ev_engine_factory(batch_size=2, **kw)  # even another batch size
    run_vqa(resumed, omni_items, raw_path=run, **args)
    assert run.read_bytes() == ref.read_bytes()
    assert not partial.exists()
