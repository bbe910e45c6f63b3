"""Small copies of the benchmarks' download layouts, for tests and trials (synthetic
images, made-up questions): SLAKE, PathVQA / VQA-RAD parquet, PMC-VQA, a questions file.
Each builder returns what a reader must find, so tests check against it."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
from PIL import Image

from medcap.testing import make_image


def _jpeg_bytes(seed: int, size: int, mode: str) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    img = Image.fromarray(rgb, "RGB").convert(mode)  # CMYK stays CMYK inside the JPEG
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def make_slake_layout(root: str | Path, *, image_size: int = 36) -> Dict[str, Any]:
    """``Slake1.0/test.json`` + ``imgs/``: per image an English closed and open question
    and a Chinese one; plus an empty answer, a malformed record and a missing image."""
    base = Path(root) / "Slake1.0"
    records: List[Dict[str, Any]] = []
    english = []
    for i in range(2):
        name = f"xmlab{i}/source.jpg"
        make_image(base / "imgs" / name, image_size, seed=40 + i)
        rows = [("en", "CLOSED", "Is this a CT image?", "Yes" if i == 0 else "No"),
                ("en", "OPEN", "Which organ is abnormal?", "left lung"),
                ("zh", "CLOSED", "这是CT图像吗?", "是")]
        for lang, kind, q, a in rows:
            qid = len(records)
            records.append({"img_id": i, "img_name": name, "question": q, "answer": a, "q_lang": lang,
                            "answer_type": kind, "modality": "CT", "qid": qid, "location": "Lung"})
            if lang == "en":
                english.append((name, q, a, kind.lower()))
    records.append({"img_name": "xmlab0/source.jpg", "question": "What is empty?", "answer": "", "q_lang": "en",
                    "answer_type": "OPEN", "qid": 100})
    records.append({"question": "no image named", "answer": "yes", "q_lang": "en", "qid": 101})
    records.append({"img_name": "xmlab9/source.jpg", "question": "Is it there?", "answer": "no", "q_lang": "en",
                    "answer_type": "CLOSED", "qid": 102})
    base.mkdir(parents=True, exist_ok=True)
    (base / "test.json").write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return {"root": str(root), "english": english, "chinese": 2, "empty_answers": 1, "malformed": 1, "missing_images": 1}


def make_hf_parquet_layout(root: str | Path, folder: str, *, image_size: int = 36) -> Dict[str, Any]:
    """``{folder}/data/test-0000{0,1}-of-00002.parquet`` (columns image{bytes, path},
    question, answer) with CMYK and RGB JPEGs, rows with and without ``path``; plus a
    row with no image bytes, one with an empty answer and one whose bytes are no image."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = Path(root) / folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    shards = [
        [({"bytes": _jpeg_bytes(1, image_size, "CMYK"), "path": "img_a.jpg"}, "is there a tumor?", "yes"),
         ({"bytes": _jpeg_bytes(2, image_size, "RGB"), "path": None}, "what organ is shown?", "liver"),
         ({"bytes": None, "path": "gone.jpg"}, "is it gone?", "no")],
        [({"bytes": _jpeg_bytes(3, image_size, "CMYK"), "path": None}, "is the image normal?", "no"),
         ({"bytes": _jpeg_bytes(4, image_size, "RGB"), "path": "img_e.jpg"}, "what is empty?", ""),
         ({"bytes": b"not an image at all", "path": "broken.jpg"}, "is it broken?", "yes")],
    ]
    for k, rows in enumerate(shards):
        table = pa.table({"image": [r[0] for r in rows], "question": [r[1] for r in rows], "answer": [r[2] for r in rows]})
        pq.write_table(table, data / f"test-{k:05d}-of-00002.parquet")
    kept = [("img_a.jpg", "is there a tumor?", "yes", "closed"), ("row1.png", "what organ is shown?", "liver", "open"),
            ("row3.png", "is the image normal?", "no", "closed"), ("broken.jpg", "is it broken?", "yes", "closed")]
    return {"root": str(root), "kept": kept, "unreadable": ["broken.jpg"], "missing_images": 1, "empty_answers": 1,
            "cmyk": ["img_a.jpg", "row3.png"]}


def make_pmcvqa_layout(root: str | Path, *, image_size: int = 36, clean: bool = True) -> Dict[str, Any]:
    """``PMC-VQA/test_clean.csv`` (or ``test.csv``) + ``images/``: choices with ``A:`` prefixes
    and without, answers as ``Answer_label`` or as text; plus a malformed row."""
    base = Path(root) / "PMC-VQA"
    for i in range(3):
        make_image(base / "images" / f"PMC{i}_fig.jpg", image_size, seed=60 + i)
    header = ["index", "Figure_path", "Question", "Answer", "Choice A", "Choice B", "Choice C", "Choice D", "Answer_label"]
    rows = [
        ["0", "PMC0_fig.jpg", "Which modality is used?", "CT", "A:MRI", "B:CT", "C:X-ray", "D:PET", "B"],
        ["1", "PMC1_fig.jpg", "Where is the lesion?", "Liver", " A: Kidney", " B: Spleen", " C: Liver", " D: Lung", ""],
        ["2", "PMC2_fig.jpg", "What color is the stain?", "B", "Blue", "Red", "", "", ""],
        ["3", "", "No figure here?", "A", "x", "y", "z", "w", "A"],
    ]
    base.mkdir(parents=True, exist_ok=True)
    with open(base / ("test_clean.csv" if clean else "test.csv"), "w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows([header] + rows)
    expected = [("PMC0_fig.jpg", {"A": "MRI", "B": "CT", "C": "X-ray", "D": "PET"}, "CT"),
                ("PMC1_fig.jpg", {"A": "Kidney", "B": "Spleen", "C": "Liver", "D": "Lung"}, "Liver"),
                ("PMC2_fig.jpg", {"A": "Blue", "B": "Red", "C": "", "D": ""}, "Red")]
    return {"root": str(root), "expected": expected, "malformed": 1}


def make_questions_file(root: str | Path, *, image_size: int = 36) -> Dict[str, Any]:
    """``questions.jsonl`` beside ``pics/``: a closed, an open, a choice question, one with
    no answer, a malformed line."""
    root = Path(root)
    for i in range(2):
        make_image(root / "pics" / f"q{i}.png", image_size, seed=80 + i)
    lines = [
        {"image": "pics/q0.png", "question": "Is there an effusion?", "answer": "no"},
        {"image": "pics/q0.png", "question": "What is the finding?", "answer": "pleural effusion"},
        {"image": "pics/q1.png", "question": "Which side?", "options": ["left", "right"], "answer": "B"},
        {"image": "pics/q1.png", "question": "Describe it."},
    ]
    path = root / "questions.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n", encoding="utf-8")
    return {"path": str(path), "kinds": ["closed", "open", "choice", ""], "malformed": 1}
