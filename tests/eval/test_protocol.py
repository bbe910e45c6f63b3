"""The two-step VQA protocol per vqa_type, the description budget, the per-image
description cache, and resuming a stopped run to identical files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medcap.eval import VQA_TYPES, ImageLoader, read_csv_rows, read_omnimedvqa, run_vqa
from medcap.eval import EvalItem as VQAItem
from medcap.eval._omnimedvqa import OMNIMEDVQA_EXTRA_COLUMNS
from medcap.eval._protocol import answer_messages, description_budget
from medcap.eval._run import drop_missing_images
from medcap.generation import question_from_instruction
from medcap.data import PLACEHOLDER_CHAR
from medcap.testing import make_image, make_omnimedvqa_layout


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
    answer_sees_image = not vqa_type.endswith("_no_image")
    assert len(ans_calls) == len(items)
    # Step 1 always sees the image (the reference's *_no_image types hide it from step 2 only).
    assert all(img for _, img, _, _ in desc_calls)
    assert all(t.startswith(f"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{PLACEHOLDER_CHAR * 4}<|eot_id|>")
               for t, *_ in desc_calls)
    assert all(img == answer_sees_image for _, img, _, _ in ans_calls)
    assert all(b == 50 for _, _, b, _ in ans_calls)  # min(50, max_new_tokens)
    first_turn = PLACEHOLDER_CHAR * 4 if answer_sees_image else "Describe the image."
    for t, _, _, _ in ans_calls:
        assert t.startswith(f"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{first_turn}<|eot_id|>")
        assert (PLACEHOLDER_CHAR in t) == answer_sees_image
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
        # The reference's instruction column: the prompt's text, without <|begin_of_text|>.
        assert row["instruction"].startswith(f"<|start_header_id|>user<|end_header_id|>\n\n{first_turn}<|eot_id|>")
        assert question_from_instruction(row["instruction"]) == it.question
    assert read_csv_rows(tmp_path / "raw.csv") == rows
    assert (tmp_path / "raw.csv").read_bytes().startswith(b"\xef\xbb\xbf")  # BOM, as the reference's
    if vqa_type != "omit":
        assert fake_image_loader.loads  # the description is made from the image, whatever step 2 sees


def test_no_image_descriptions_differ_between_images(scripted, tmp_path):
    """The blind answer step still gets a description made from each image: an engine
    that describes the image tensor it is given tells three images apart."""
    engine = scripted(_reply, batch_size=2)
    seen = []

    def describe_the_pixels(prompts, images, budgets, keys):
        seen.append([im is not None for im in images])
        return [f"mean {im.mean().item():.3f}" if im is not None else "blind" for im in images]

    engine.generate_texts = describe_the_pixels
    paths = [str(make_image(tmp_path / f"i{k}.png", 36, seed=10 + k)) for k in range(3)]
    items = [VQAItem(image=p, question="What is shown?", answer="x", key=f"q{k}") for k, p in enumerate(paths)]
    loader = ImageLoader(32)
    rows = run_vqa(engine, items, vqa_type="no_cond_desc_no_image", raw_path=tmp_path / "raw.csv", image_loader=loader,
                   max_seq_len=2000, max_new_tokens=8, progress=False)
    descs = [r["instruction"].split("<|start_header_id|>assistant<|end_header_id|>\n\n")[1].split("<|eot_id|>")[0]
             for r in rows]
    assert all(d.startswith("mean ") for d in descs) and len(set(descs)) == 3
    assert all(r["generated"] == "blind" for r in rows)  # step 2 got no image
    assert all(r["instruction"].startswith("<|start_header_id|>user<|end_header_id|>\n\nDescribe the image.<|eot_id|>")
               for r in rows)


def test_unknown_vqa_type_is_an_error(scripted, fake_image_loader, tmp_path):
    with pytest.raises(ValueError, match="vqa_type"):
        run_vqa(scripted(_reply), _items(tmp_path), vqa_type="cond", raw_path=tmp_path / "r.csv",
                image_loader=fake_image_loader, max_seq_len=500, max_new_tokens=10, progress=False)


def test_description_budget_leaves_room_for_the_answer_prompt(ev_tok, scripted):
    """The reference counts its prompts in text form (special tokens spelled out), which
    takes more tokens than the real prompt: a description that uses its whole budget
    leaves step 2 inside max_seq_len. (Exact counts: test_eval_prompts_llama3.py.)"""
    engine = scripted(_reply)
    q = "Is there a pleural effusion on the left?"
    for vqa_type in ("no_cond_desc", "cond_desc_no_image"):
        budget = description_budget(engine, vqa_type, q, max_seq_len=600, max_new_tokens=5000)
        assert 0 < budget < 600
        full = engine.prompt(answer_messages(vqa_type, "x" * budget, q), has_image=vqa_type == "no_cond_desc")
        assert len(full) <= 600 - 5
        assert description_budget(engine, vqa_type, q, max_seq_len=600, max_new_tokens=7) == 7
        # no room left: the reference still generates one token (its first comes before the budget)
        assert description_budget(engine, vqa_type, q, max_seq_len=20, max_new_tokens=7) == 1
    # Both *_no_image twins budget exactly as their image counterparts (step 1 is the same).
    assert description_budget(engine, "cond_desc_no_image", q, max_seq_len=600, max_new_tokens=5000) == \
        description_budget(engine, "cond_desc", q, max_seq_len=600, max_new_tokens=5000)
    assert description_budget(engine, "omit", q, max_seq_len=600, max_new_tokens=50) == 0


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
    record = json.loads((tmp_path / "raw.run.json").read_text())
    assert list(record["left_out"]) == ["kbad"] and record["complete"] is False
    # The image comes back: the next run tries it again, and only it, and puts its row in place.
    make_image(bad, 32, seed=9)
    engine3 = scripted(_reply, batch_size=2)
    rows = run_vqa(engine3, items, vqa_type="no_cond_desc", raw_path=raw, image_loader=fake_image_loader,
                   max_seq_len=500, max_new_tokens=20, progress=False)
    assert [k for c in engine3.calls for k in c[3]] == [f"desc:{bad}", "answer:kbad"]
    assert [r["output"] for r in rows] == [it.answer for it in items]
    assert json.loads((tmp_path / "raw.run.json").read_text())["left_out"] == {}


def test_changed_settings_never_reuse_rows_or_descriptions(scripted, fake_image_loader, tmp_path, caplog):
    items = _items(tmp_path)
    raw = tmp_path / "raw.csv"
    args = dict(vqa_type="no_cond_desc", raw_path=raw, image_loader=fake_image_loader, max_seq_len=500, progress=False)

    class Stop(Exception):
        pass

    def stop(n):
        raise Stop

    with pytest.raises(Stop):
        run_vqa(scripted(_reply, batch_size=2), items, max_new_tokens=20, identity={"vision_checkpoint": "A"},
                on_batch=stop, **args)
    # Another checkpoint: the half-made file is refused, naming what to move.
    with pytest.raises(ValueError, match=r"another model or with other settings.*vision_checkpoint.*raw\.partial\.csv"):
        run_vqa(scripted(_reply), items, max_new_tokens=20, identity={"vision_checkpoint": "B"}, **args)
    # Asked to, it starts afresh: every description is made again.
    engine = scripted(_reply, batch_size=2)
    rows = run_vqa(engine, items, max_new_tokens=20, identity={"vision_checkpoint": "B"}, overwrite=True, **args)
    assert len([k for c in engine.calls for k in c[3] if k.startswith("desc:")]) == 3 and len(rows) == len(items)
    # A finished file is not reused by other settings either.
    with pytest.raises(ValueError, match="max_new_tokens"):
        run_vqa(scripted(_reply), items, max_new_tokens=30, identity={"vision_checkpoint": "B"}, **args)
    # A description cache made with other settings is discarded, with a log line.
    raw.unlink()
    (tmp_path / "raw.run.json").unlink()
    engine = scripted(_reply, batch_size=2)
    with caplog.at_level("INFO", logger="medcap.eval._results"):
        run_vqa(engine, items, max_new_tokens=30, identity={"vision_checkpoint": "B"}, **args)
    assert "discarding 3 cached entries" in caplog.text
    assert len([k for c in engine.calls for k in c[3] if k.startswith("desc:")]) == 3


def test_answers_with_carriage_returns_resume(scripted, fake_image_loader, tmp_path):
    items = _items(tmp_path)
    items[0].answer = "left\r\nside"  # a gt answer with CR LF, as some data sets have

    def reply(text, key, budget):
        return "line one\r\nline two\r" if key.startswith("answer:") else "a\rdescription"

    class Stop(Exception):
        pass

    def stop(n):
        raise Stop

    raw = tmp_path / "raw.csv"
    args = dict(vqa_type="no_cond_desc", raw_path=raw, image_loader=fake_image_loader, max_seq_len=500,
                max_new_tokens=20, progress=False)
    with pytest.raises(Stop):
        run_vqa(scripted(reply, batch_size=2), items, on_batch=stop, **args)
    engine = scripted(reply, batch_size=2)
    rows = run_vqa(engine, items, **args)
    assert len([k for c in engine.calls for k in c[3] if k.startswith("answer:")]) == len(items) - 2
    assert rows[0]["output"] == "left\nside" and rows[0]["generated"] == "line one\nline two\n"


def test_a_killed_writers_temporary_files_are_removed_when_the_file_is_finished(scripted, fake_image_loader, tmp_path):
    """A kill during an atomic write leaves ``.NAME.XXXXXXXX.tmp``; the run that finishes
    the file removes those of its own files, and no other file's (another chunk may be
    writing it in the same folder)."""
    items = _items(tmp_path)
    ours = [".raw.csv.abcdefgh.tmp", ".raw.left_out.rank1.json.k2_9xq0z.tmp", ".raw-0.0.csv.00000000.tmp"]
    theirs = [".raw2.csv.abcdefgh.tmp", ".other.csv.abcdefgh.tmp", ".raw.csv.notours.tmp"]
    for name in ours + theirs:
        (tmp_path / name).write_text("x")
    run_vqa(scripted(lambda text, key, budget: "a reply", batch_size=2), items, vqa_type="no_cond_desc",
            raw_path=tmp_path / "raw.csv", image_loader=fake_image_loader, max_seq_len=500, max_new_tokens=20,
            progress=False)
    assert (tmp_path / "raw.csv").exists()
    assert [n for n in ours + theirs if (tmp_path / n).exists()] == theirs


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
    next_row = ref.read_bytes().split(b"\nImages/")[4]
    with open(partial, "ab") as f:
        f.write(b"omnimedvqa:" + next_row[: len(next_row) // 2])
    resumed = ev_engine_factory(batch_size=2, **kw)  # even another batch size
    run_vqa(resumed, omni_items, raw_path=run, **args)
    assert run.read_bytes() == ref.read_bytes()
    assert not partial.exists()
