"""OmniMedVQA: the reader in the reference's layout, with its quirks; chunks; the scoring
step (letter mapping, unreadable replies counted wrong with their own empty prediction,
macro accuracy over modalities, the files)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from medcap.eval import read_csv_rows, read_omnimedvqa, score_file
from medcap.eval._choices import LETTER_MAX_NEW_TOKENS, letter_prompt
from medcap.eval._omnimedvqa import (
    OMNIMEDVQA_EXTRA_COLUMNS,
    OMNIMEDVQA_MODALITIES,
    accuracy_by_modality,
    chunk_bounds,
    select_chunk,
)
from medcap.eval._protocol import answer_messages
from medcap.eval._results import write_csv_atomic
from medcap.eval._run import RAW_COLUMNS, drop_missing_images
from medcap.generation import build_prompt, prompt_text
from medcap.testing import make_omnimedvqa_layout


def test_the_eight_modalities_are_the_datasets_own_spellings():
    assert OMNIMEDVQA_MODALITIES == (
        "CT(Computed Tomography)", "X-Ray", "Dermoscopy", "Fundus Photography",
        "OCT (Optical Coherence Tomography", "ultrasound", "MR (Mag-netic Resonance Imaging)", "Microscopy Images",
    )


def test_omnimedvqa_reader_keeps_exact_spellings_and_handles_quirks(tmp_path):
    info = make_omnimedvqa_layout(tmp_path, per_modality=2)
    items, report = read_omnimedvqa(tmp_path)
    # The record keyed `modality` is left out, as the reference's filter on `modality_type` leaves it out.
    assert len(items) == info["kept"] == report["kept"] == 15
    assert report["modality_key_instead_of_modality_type"] == info["modality_key"] == 1
    assert report["left_out_modality_key"] == 1
    assert report["no_option_C"] == info["no_option_C"]
    assert sorted(report["excluded_modalities"]) == sorted(
        ["MR (Magnetic Resonance Imaging)", "OCT (Optical Coherence Tomography)", "Ultrasound"])
    assert set(report["per_modality"]) == set(OMNIMEDVQA_MODALITIES)
    # The order is the reference's: the kept records in file order, shuffled by random.Random(0).
    qa = Path(tmp_path) / "OmniMedVQA" / "QA_information" / "Open-access"
    recs = [r for f in sorted(qa.glob("*.json")) for r in json.loads(f.read_text())]
    kept = [r for r in recs if r.get("modality_type", "") in OMNIMEDVQA_MODALITIES]
    random.Random(0).shuffle(kept)
    assert [it.extra["question_id"] for it in items] == [r["question_id"] for r in kept]
    assert [it.answer for it in items] == [r["gt_answer"] for r in kept]
    for it, r in zip(items, kept):
        assert it.image == r["image_path"]  # the data set's own value, written in the `image` column
        assert it.file == str(Path(tmp_path) / "OmniMedVQA" / r["image_path"])
        assert it.extra["option_C"] == r.get("option_C", "") and it.extra["option_D"] == r.get("option_D", "")
        assert it.options() == {L: r[f"option_{L}"] for L in "ABCD" if f"option_{L}" in r}
    assert len({it.key for it in items}) == len(items)
    present, missing = drop_missing_images(items)
    assert len(missing) == info["missing_images"] == 1 and len(present) == 14
    assert all(Path(it.file).is_file() for it in present)
    # The option brings the `modality` record in, where its file order puts it.
    more, report = read_omnimedvqa(tmp_path, include_modality_key=True)
    assert len(more) == 16 and report["modality_key_instead_of_modality_type"] == 1
    assert "left_out_modality_key" not in report


@pytest.mark.parametrize("n,chunks", [(2600, 50), (120, 50), (1000, 3), (49, 2), (0, 4)])
def test_chunks_cover_everything_once_with_the_intended_sizes(n, chunks):
    size = max(n // chunks, 50)
    seen = []
    for i in range(chunks):
        lo, hi = chunk_bounds(n, i, chunks)
        if i < chunks - 1:
            assert hi - lo == min(size, max(0, n - lo)) and lo == min(n, i * size)
        else:
            assert hi == n
        seen += list(range(lo, hi))
    assert seen == list(range(n))


def test_select_chunk_only_when_asked():
    items = list(range(130))
    # Without test_chunk_idx everything runs, under the reference's name for that launch line (0_50).
    assert select_chunk(items, None, 50) == (items, (0, 50))
    assert select_chunk(items, None, 7) == (items, (0, 7))
    part, name = select_chunk(items, 1, 50)
    assert part == items[50:100] and name == (1, 50)
    assert select_chunk(items, 49, 50)[0] == []
    assert select_chunk(items, 1, 2)[0] == items[65:]
    with pytest.raises(ValueError, match="test_chunk_idx"):
        select_chunk(items, 50, 50)


# (modality, gt option letter, options, scripted reply)
ROWS = [
    ("X-Ray", "A", ["yes", "no"], ""),  # unreadable first reply: the reference crashed here
    ("X-Ray", "B", ["yes", "no"], "b"),
    ("X-Ray", "A", ["left", "right", "both"], "Z"),  # names no option
    ("ultrasound", "C", ["cyst", "mass", "normal", "stone"], "C) normal"),
    ("ultrasound", "D", ["cyst", "mass", "normal", "stone"], "A"),
    ("MR (Mag-netic Resonance Imaging)", "B", ["T1", "T2"], "C"),  # C is absent
    ("MR (Mag-netic Resonance Imaging)", "B", ["T1", "T2"], "B"),
]


def _write_raw(tok, path: Path):
    rows = []
    for i, (mod, gt, opts, _) in enumerate(ROWS):
        question = f"Question number {i}?"
        p = build_prompt(tok, answer_messages("no_cond_desc", f"description {i}", question), num_image_tokens=4)
        row = {"image": f"img{i}.png", "instruction": prompt_text(tok, p), "output": opts["ABCD".index(gt)],
               "generated": f"free answer {i}", "modality_type": mod, "question_id": f"q{i}"}
        for k, L in enumerate("ABCD"):
            row[f"option_{L}"] = opts[k] if k < len(opts) else ""
        rows.append(row)
    write_csv_atomic(path, list(RAW_COLUMNS) + list(OMNIMEDVQA_EXTRA_COLUMNS), rows)
    return rows


def _reply_by_question(text, key, budget):
    i = int(text.split("Question number ")[1].split("?")[0])
    return ROWS[i][3]


def test_letter_scoring_files_and_macro_accuracy(ev_tok, scripted, tmp_path, capsys):
    raw = tmp_path / "omnimedvqa-no_cond_desc-raw-ck-0_1.csv"
    written = _write_raw(ev_tok, raw)
    engine = scripted(_reply_by_question)
    summary = score_file(engine, raw, method="letter", progress=False)
    # Every scoring prompt: text only, the reference's wording, at most 20 new tokens.
    texts = [t for call in engine.calls for t in call[0]]
    assert all(not any(call[1]) and set(call[2]) == {LETTER_MAX_NEW_TOKENS} for call in engine.calls)
    for i, t in enumerate(texts):
        opts = {L: v for L, v in zip("ABCD", ROWS[i][2])}
        body = letter_prompt(f"Question number {i}?", f"free answer {i}", opts)
        assert body in t and "①" not in t
    scored = read_csv_rows(summary["scored_path"])
    assert [r["predict"] for r in scored] == ["", "B", "Z", "C", "A", "C", "B"]  # letters, as the reference's
    assert [r["predict_generated"] for r in scored] == [r[3] for r in ROWS]
    assert [r["correct"] for r in scored] == ["0", "1", "0", "1", "0", "0", "1"]
    assert [{k: r[k] for k in written[0]} for r in scored] == written  # raw columns kept as they were
    # Independent recount: mean over modalities of each modality's accuracy.
    per = {"X-Ray": 1 / 3, "ultrasound": 1 / 2, "MR (Mag-netic Resonance Imaging)": 1 / 2}
    macro = sum(per.values()) / 3
    assert summary["accuracy"] == pytest.approx(macro)
    assert Path(summary["scored_path"]).name == "omnimedvqa-no_cond_desc-raw-ck-0_1-0.4444.csv"  # round(acc, 4)
    assert Path(summary["scored_path"]).read_bytes().startswith(b"\xef\xbb\xbf")  # BOM, as pandas' utf-8-sig
    js = json.loads(Path(summary["modality_json"]).read_text())
    assert {k: v["accuracy"] for k, v in js["per_modality"].items()} == pytest.approx(per)
    assert read_csv_rows(summary["modality_csv"])[0].keys() == {"modality_type", "n", "correct", "accuracy"}
    assert Path(summary["modality_png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "ultrasound" in out and f"{macro:.4f}" in out
    assert not list(tmp_path.glob("*.partial.csv"))


def test_scoring_resumes_after_an_interruption(ev_tok, scripted, tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref_dir.mkdir()
    run_dir.mkdir()
    raw_ref = ref_dir / "omnimedvqa-omit-raw-ck-0_1.csv"
    _write_raw(ev_tok, raw_ref)
    shutil.copy(raw_ref, run_dir / raw_ref.name)
    ref = score_file(scripted(_reply_by_question), raw_ref, progress=False)

    def dies_in_second_batch(text, key, budget):
        if int(key.split(":")[1]) >= 3:
            raise KeyboardInterrupt
        return _reply_by_question(text, key, budget)

    with pytest.raises(KeyboardInterrupt):
        score_file(scripted(dies_in_second_batch), run_dir / raw_ref.name, progress=False)
    partial = run_dir / "omnimedvqa-omit-raw-ck-0_1-scored.partial.csv"
    assert len(read_csv_rows(partial)) == 3
    engine = scripted(_reply_by_question)
    got = score_file(engine, run_dir / raw_ref.name, progress=False)
    assert len([t for c in engine.calls for t in c[0]]) == len(ROWS) - 3  # nothing redone
    assert Path(got["scored_path"]).read_bytes() == Path(ref["scored_path"]).read_bytes()


def test_accuracy_is_macro_over_modalities():
    rows = [{"modality_type": "a", "correct": "1"}] * 9 + [{"modality_type": "a", "correct": "0"}] + [
        {"modality_type": "b", "correct": "0"}]
    acc, per = accuracy_by_modality(rows)
    assert acc == pytest.approx((0.9 + 0.0) / 2)
    assert per["a"] == {"n": 10, "correct": 9, "accuracy": 0.9}
