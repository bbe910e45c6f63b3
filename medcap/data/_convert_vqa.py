"""SLAKE's and PathVQA's training splits -> sharegpt question/answer records, for
fine-tuning per benchmark (as LLaVA-Med did). Part of ``tools/convert_to_sharegpt.py``.

In order: ``vqa_parquet_columns`` (a Hugging Face VQA parquet file, also read by the
evaluation's benchmark readers) and ``qa_record`` (a human turn of 50 ``①``, a newline
and the question; a gpt turn with the answer); then ``convert_slake``
(``Slake1.0/{train,validate}.json`` + ``imgs/`` -> ``slake_{split}.json``; either split may
be absent, not both) and ``convert_pathvqa`` (``path-vqa/data/{train,validation}-*.parquet``
-> ``pathvqa_{split}.json``; the images live inside the parquet files, so each distinct
one is written once to ``{save_dir}/pathvqa_images/``, named by a digest of its bytes).

Skipped and counted per split, like the other sources: no image name, an empty question
or answer, text holding a lone surrogate (named), a missing image, image bytes absent or
not an image, and SLAKE questions in another language than ``--q-lang``.
"""

from __future__ import annotations

import hashlib
import io
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional

from medcap._io import progress
from medcap.data._converter import (
    NUM_PLACEHOLDERS,
    Converter,
    MissingInput,
    clean_text,
    read_json_list,
    require_fields,
    write_records,
)
from medcap.data._records import PLACEHOLDER_CHAR

SLAKE_SPLITS = ("train", "validate")
PATHVQA_SPLITS = ("train", "validation")


# ---- Records

def vqa_parquet_columns(path, source: str = ""):
    """A Hugging Face VQA parquet file (PathVQA, VQA-RAD): its ``question`` and ``answer``
    values and its ``image`` column (structs of ``bytes`` and ``path``, read on demand)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    missing = [c for c in ("image", "question", "answer") if c not in table.column_names]
    if missing:
        where = f"{source}: " if source else ""
        raise ValueError(f"{where}{path} has no column {missing[0]!r} (its columns: {table.column_names})")
    return table.column("question").to_pylist(), table.column("answer").to_pylist(), table.column("image")


def qa_record(question: str, answer: str, image: str, image_dir: Path) -> Dict[str, Any]:
    return {
        "conversations": [{"from": "human", "value": PLACEHOLDER_CHAR * NUM_PLACEHOLDERS + "\n" + question},
                          {"from": "gpt", "value": answer}],
        "image": image,
        "meta": f"dir={image_dir.resolve()}",
    }


def _report(source: str, n: int, skipped: Counter) -> None:
    if skipped:
        print(f"{source}: {n} records, skipped " + ", ".join(f"{c} {k}" for k, c in skipped.items()), file=sys.stderr)


def _text(v: Any) -> Optional[str]:
    return None if v is None else str(v)


# ---- SLAKE

def convert_slake(data_dir, save_dir, conv: Converter, q_lang: str = "en") -> Dict[str, int]:
    root = Path(data_dir) / "Slake1.0"
    images = root / "imgs"
    out: Dict[str, int] = {}
    for split in SLAKE_SPLITS:
        path = root / f"{split}.json"
        if not path.exists():
            conv.warn(f"SLAKE {split}: {path} not found; slake_{split}.json not written")
            continue
        if not images.is_dir():
            raise MissingInput(f"SLAKE: image folder not found: {images}")
        source = f"SLAKE {split}"
        items = read_json_list(path)
        require_fields(source, path, items, ("img_name", "question", "answer"))
        skipped = conv.skipped.setdefault(source, Counter())
        recs = []
        with progress(len(items), source, "rec", enabled=conv.progress) as bar:
            for k, r in enumerate(items):
                r = r if isinstance(r, dict) else {}
                image, question, answer = r.get("img_name"), clean_text(r.get("question")), clean_text(_text(r.get("answer")))
                if q_lang != "all" and r.get("q_lang") != q_lang:
                    skipped[f"other language than {q_lang}"] += 1
                elif not isinstance(image, str) or not image:
                    skipped["no image name"] += 1
                elif question is None or answer is None:
                    skipped["empty text"] += 1
                elif conv.unstorable(source, f"{path} item {k}", image=image, question=question, answer=answer):
                    pass
                elif not (images / image).is_file():
                    skipped["missing image"] += 1
                else:
                    recs.append(qa_record(question, answer, image, images))
                bar.update(1)
        _report(source, len(recs), skipped)
        write_records(Path(save_dir) / f"slake_{split}.json", recs)
        out[f"slake_{split}.json"] = len(recs)
    if not out:
        raise MissingInput(f"SLAKE: neither train.json nor validate.json found in {root}")
    return out


# ---- PathVQA

def _image_suffix(data: bytes) -> Optional[str]:
    """The file suffix of readable image bytes; None when Pillow cannot open them."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
            fmt = (img.format or "").lower()
    except Exception:  # Pillow raises many types for broken data
        return None
    return {"jpeg": ".jpg"}.get(fmt, f".{fmt or 'img'}")


def convert_pathvqa(data_dir, save_dir, conv: Converter) -> Dict[str, int]:
    data = Path(data_dir) / "path-vqa" / "data"
    image_dir = Path(save_dir) / "pathvqa_images"
    out: Dict[str, int] = {}
    for split in PATHVQA_SPLITS:
        files = sorted(data.glob(f"{split}-*.parquet"))
        if not files:
            conv.warn(f"PathVQA {split}: no {split}-*.parquet in {data}; pathvqa_{split}.json not written")
            continue
        source = f"PathVQA {split}"
        skipped = conv.skipped.setdefault(source, Counter())
        written: Dict[str, str] = {}  # digest -> file name
        recs: List[Dict[str, Any]] = []
        with progress(None, source, "rec", enabled=conv.progress) as bar:
            for f in files:
                recs.extend(_parquet_records(f, source, image_dir, conv, written, bar))
        _report(source, len(recs), skipped)
        write_records(Path(save_dir) / f"pathvqa_{split}.json", recs)
        out[f"pathvqa_{split}.json"] = len(recs)
    if not out:
        raise MissingInput(f"PathVQA: no train-*.parquet or validation-*.parquet in {data}")
    return out


def _parquet_records(path: Path, source: str, image_dir: Path, conv: Converter, written: Dict[str, str],
                     bar) -> List[Dict[str, Any]]:
    """The records of one PathVQA parquet file, each image stored once (``written``: digest -> name)."""
    questions, answers, column = vqa_parquet_columns(path, source)
    skipped = conv.skipped.setdefault(source, Counter())
    recs: List[Dict[str, Any]] = []
    for row in range(len(questions)):
        bar.update(1)
        question, answer = clean_text(_text(questions[row])), clean_text(_text(answers[row]))
        cell = column[row].as_py()
        blob = cell.get("bytes") if isinstance(cell, dict) else None
        if question is None or answer is None:
            skipped["empty text"] += 1
            continue
        if conv.unstorable(source, f"{path} row {row}", question=question, answer=answer):
            continue
        if not blob:
            skipped["missing image"] += 1
            continue
        name = _store(blob, image_dir, written)
        if name is None:
            skipped["corrupt image"] += 1
            continue
        recs.append(qa_record(question, answer, name, image_dir))
    return recs


def _store(blob: bytes, image_dir: Path, written: Dict[str, str]) -> Optional[str]:
    """Write ``blob`` once under a name from its digest; None when it is no image."""
    digest = hashlib.sha256(blob).hexdigest()[:20]
    if digest not in written:
        suffix = _image_suffix(blob)
        if suffix is None:
            return None
        image_dir.mkdir(parents=True, exist_ok=True)
        path = image_dir / f"{digest}{suffix}"
        if not path.exists():
            from medcap._io import atomic_write_bytes

            atomic_write_bytes(path, blob)
        written[digest] = path.name
    return written[digest]
