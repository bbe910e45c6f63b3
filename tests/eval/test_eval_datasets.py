"""Readers of the evaluation sets in the reference's layouts, with their quirks."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from medcap.eval import read_caption_set, read_omnimedvqa, read_vqarad
from medcap.eval._suites import OMNIMEDVQA_MODALITIES, chunk_bounds, drop_missing_images, select_chunk
from medcap.testing import make_caption_dataset, make_omnimedvqa_layout, make_vqarad_layout


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


def test_vqarad_reader_keeps_closed_test_questions(tmp_path):
    info = make_vqarad_layout(tmp_path, n_images=3)
    items, report = read_vqarad(tmp_path)
    assert [(it.image, it.question, it.answer) for it in items] == info["expected"]  # image_name as written
    assert report["records"] == 12 and report["kept"] == 6
    assert all(Path(it.file).parent.name == "VQA_RAD Image Folder" and Path(it.file).name == it.image for it in items)
    with pytest.raises(FileNotFoundError, match="VQA_RAD Dataset Public.json"):
        read_vqarad(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="Open-access"):
        read_omnimedvqa(tmp_path / "nowhere")


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


def test_caption_set_prompt_is_the_conversation_before_the_first_answer(tmp_path):
    path = make_caption_dataset(tmp_path, n=3, image_size=32)
    recs = json.loads(path.read_text())
    recs[1]["conversations"][0]["value"] += "\n\nDescribe the image."
    recs.append({"conversations": [{"from": "gpt", "value": "no question"}], "image": "x.png", "meta": f"dir={tmp_path}"})
    path.write_text(json.dumps(recs))
    items, report = read_caption_set(path)
    assert report["bad"] == 1 and len(items) == 3
    assert [it.answer for it in items] == [r["conversations"][1]["value"] for r in recs[:3]]
    assert items[1].messages == [{"role": "user", "content": "<image>\n\nDescribe the image."}]
    assert [it.image for it in items] == [r["image"] for r in recs[:3]]  # the record's own value
    assert all(Path(it.file).is_file() and Path(it.file).name == Path(it.image).name for it in items)
