"""Readers of the field's benchmarks, on small copies of each download layout."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from medcap.data import BadSample
from medcap.testing import (
    make_hf_parquet_layout, make_pmcvqa_layout, make_questions_file, make_slake_layout,
)
from medcap.eval._benchmark_readers import (
    benchmark_loader, decode_image_bytes, read_hf_parquet, read_pmcvqa, read_questions, read_slake,
)


def test_slake_keeps_english_questions_by_default(tmp_path):
    want = make_slake_layout(tmp_path)
    items, report = read_slake(tmp_path)
    # the record whose image is missing is read here; the suite leaves it out before running
    got = [(it.image, it.question, it.answer, it.extra["answer_type"]) for it in items]
    assert got[:4] == want["english"]
    assert got[4][0] == "xmlab9/source.jpg"
    assert all("这" not in it.question for it in items)
    assert (report["other_language"], report["empty_answers"], report["malformed"]) == (2, 1, 1)
    assert items[0].file == str(tmp_path / "Slake1.0" / "imgs" / "xmlab0" / "source.jpg")


@pytest.mark.parametrize("lang, n", [("zh", 2), ("all", 7)])
def test_slake_q_lang(tmp_path, lang, n):
    make_slake_layout(tmp_path)
    items, report = read_slake(tmp_path, q_lang=lang)
    assert len(items) == n
    if lang == "zh":
        assert {it.answer for it in items} == {"是"}


def test_slake_unknown_language_is_refused(tmp_path):
    make_slake_layout(tmp_path)
    with pytest.raises(ValueError, match="q_lang"):
        read_slake(tmp_path, q_lang="fr")


def _cmyk_jpeg(rgb):
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").convert("CMYK").save(buf, format="JPEG", quality=100)
    return buf.getvalue()


def test_cmyk_jpeg_bytes_decode_to_rgb_in_memory():
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[:, :8] = (200, 30, 30)
    img = decode_image_bytes(_cmyk_jpeg(rgb), "x.jpg")
    assert img.mode == "RGB" and img.size == (16, 16)
    left, right = np.asarray(img)[8, 2].astype(int), np.asarray(img)[8, 13].astype(int)
    assert abs(left[0] - 200) < 25 and left[1] < 60 and right.max() < 30


def test_unreadable_bytes_are_a_bad_sample():
    with pytest.raises(BadSample, match="corrupt image"):
        decode_image_bytes(b"not an image", "broken.jpg")
    with pytest.raises(BadSample, match="no image bytes"):
        decode_image_bytes(b"", "empty.jpg")


def test_parquet_rows_names_kinds_and_skips(tmp_path):
    want = make_hf_parquet_layout(tmp_path, "path-vqa")
    items, report, images = read_hf_parquet(tmp_path, "path-vqa", "pathvqa")
    assert [(it.image, it.question, it.answer, it.extra["answer_type"]) for it in items] == want["kept"]
    assert [it.key for it in items] == ["pathvqa:0", "pathvqa:1", "pathvqa:3", "pathvqa:5"]
    assert (report["missing_images"], report["empty_answers"], report["records"]) == (1, 1, 6)
    seen = []
    load = benchmark_loader(type("L", (), {"transform": staticmethod(lambda im: seen.append(im.mode) or im.size)})(),
                            images)
    assert load(items[0].file) == (36, 36) and seen == ["RGB"]  # a CMYK JPEG, decoded in memory
    with pytest.raises(BadSample):
        load(items[3].file)
    assert sorted(p.name for p in (tmp_path / "path-vqa" / "data").iterdir()) == [
        "test-00000-of-00002.parquet", "test-00001-of-00002.parquet"]


def test_parquet_missing_files_name_the_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="huggingface-cli download flaviagiammarino/vqa-rad"):
        read_hf_parquet(tmp_path, "vqa-rad", "vqaradhf")


def test_pmcvqa_choices_with_and_without_prefixes(tmp_path):
    want = make_pmcvqa_layout(tmp_path)
    items, report = read_pmcvqa(tmp_path)
    got = [(it.image, {L: it.extra[f"option_{L}"] for L in "ABCD"}, it.answer) for it in items]
    assert got == want["expected"]
    assert report["malformed"] == 1
    assert all(it.extra["answer_type"] == "choice" for it in items)


def test_pmcvqa_test_csv_and_figures_folder(tmp_path):
    make_pmcvqa_layout(tmp_path, clean=False)
    (tmp_path / "PMC-VQA" / "images").rename(tmp_path / "PMC-VQA" / "figures")
    items, report = read_pmcvqa(tmp_path)
    assert report["source"].endswith("test.csv")
    assert items[0].file == str(tmp_path / "PMC-VQA" / "figures" / "PMC0_fig.jpg")


def test_questions_file(tmp_path):
    want = make_questions_file(tmp_path)
    items, report = read_questions(want["path"])
    assert [it.extra["answer_type"] for it in items] == want["kinds"]
    assert items[2].answer == "right"  # the letter B names the second option
    assert items[0].file == str(tmp_path / "pics" / "q0.png")
    assert (report["malformed"], report["without_answer"]) == (1, 1)


def test_parquet_images_sharing_a_path_value_are_told_apart(tmp_path):
    """The image name keys the description cache: two different images under one `path`
    value get different names (the same image twice keeps its name)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def png(v):
        buf = io.BytesIO()
        Image.fromarray(np.full((8, 8, 3), v, np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    data = tmp_path / "path-vqa" / "data"
    data.mkdir(parents=True)
    rows = [({"bytes": png(10), "path": "dup.png"}, "q0?", "yes"), ({"bytes": png(200), "path": "dup.png"}, "q1?", "no"),
            ({"bytes": png(10), "path": "dup.png"}, "q2?", "yes")]
    pq.write_table(pa.table({"image": [r[0] for r in rows], "question": [r[1] for r in rows], "answer": [r[2] for r in rows]}),
                   data / "test-00000-of-00001.parquet")
    items, report, _ = read_hf_parquet(tmp_path, "path-vqa", "pathvqa")
    assert [it.image for it in items] == ["dup.png", "dup.png#row1", "dup.png"]
    assert report["renamed_duplicate_image_names"] == 1
