"""Readers for the evaluation sets, in the layouts the reference reads.

* captioning: a sharegpt JSON file (``test_metrics``);
* VQA-RAD: ``{source}/VQA_RAD/VQA_RAD Dataset Public.json``, images in
  ``{source}/VQA_RAD/VQA_RAD Image Folder/``; the closed test questions;
* OmniMedVQA: every ``*.json`` in ``{source}/OmniMedVQA/QA_information/Open-access/``,
  image paths relative to ``{source}/OmniMedVQA/``; 8 modalities kept by the
  dataset's own spellings, shuffled with ``random.Random(0)``, then chunked.

Each reader returns the items and a report (what was read, kept, excluded and
why); problems the reference crashed on are counted and reported instead.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from medcap.data import BadSample, parse_record, read_index
from medcap.eval._loop import OPTION_LETTERS, EvalItem

# The dataset's own spellings (sic): OmniMedVQA writes them exactly like this.
OMNIMEDVQA_MODALITIES: Tuple[str, ...] = (
    "CT(Computed Tomography)",
    "X-Ray",
    "Dermoscopy",
    "Fundus Photography",
    "OCT (Optical Coherence Tomography",
    "ultrasound",
    "MR (Mag-netic Resonance Imaging)",
    "Microscopy Images",
)
VQARAD_PHRASE_TYPES = ("test_freeform", "test_para")
MIN_CHUNK = 50


# One item type for every suite (see ``_loop.EvalItem``); the old names stay readable.
VQAItem = EvalItem
CaptionItem = EvalItem


def _s(v: Any) -> str:
    return "" if v is None else str(v)


def _unique_keys(items: List[VQAItem]) -> None:
    """Keys name a question in seeds, skip files and resume checks: make repeats unique."""
    seen: Counter = Counter()
    for it in items:
        seen[it.key] += 1
        if seen[it.key] > 1:
            it.key = f"{it.key}#{seen[it.key] - 1}"


def read_caption_set(source: str | Path) -> Tuple[List[CaptionItem], Dict[str, Any]]:
    """Sharegpt records -> prompts (the conversation with its first answer emptied,
    ending at the open assistant turn) and reference captions (that answer)."""
    source = Path(source)
    index = read_index(source)
    items: List[CaptionItem] = []
    bad: List[str] = []
    for i in range(len(index)):
        try:
            raw = index[i]
            rec = parse_record(raw, json_dir=index.file_of(i).parent)
        except BadSample as e:
            bad.append(f"{index.origin(i)}: {e.reason}")
            continue
        first = next(k for k, t in enumerate(rec.turns) if t.role == "assistant" and t.text.strip())
        msgs = [{"role": t.role, "content": t.text} for t in rec.turns[:first]]
        if not any(m["role"] == "user" for m in msgs):
            bad.append(f"{index.origin(i)}: no user turn before the first answer")
            continue
        own = raw.get("image") if isinstance(raw, dict) else None
        items.append(
            EvalItem(
                image="" if rec.image_path is None else str(own if own not in (None, "") else rec.image_path),
                path=None if rec.image_path is None else str(rec.image_path),
                has_image=rec.image_path is not None,
                question="",
                messages=msgs,
                answer=rec.turns[first].text,
                key=str(i),
            )
        )
    report = {"source": str(source), "records": len(index), "kept": len(items), "bad": len(bad), "bad_examples": bad[:20]}
    return items, report


def read_question_list(path: Path, name: str, dataset_source: str | Path) -> List[Any]:
    """A data set's question file: one JSON list (a BOM allowed), or a clear error."""
    if not path.is_file():
        raise FileNotFoundError(f"{name} questions not found: {str(path)!r} (dataset_source={str(dataset_source)!r})")
    records = json.loads(path.read_text(encoding="utf-8-sig"))
    if not isinstance(records, list):
        raise ValueError(f"{path} must hold a JSON list of questions")
    return records


def read_vqarad(dataset_source: str | Path) -> Tuple[List[VQAItem], Dict[str, Any]]:
    """The closed test questions of VQA-RAD (``phrase_type`` test_freeform or test_para,
    ``answer_type`` CLOSED), in file order."""
    root = Path(dataset_source) / "VQA_RAD"
    path = root / "VQA_RAD Dataset Public.json"
    records = read_question_list(path, "VQA-RAD", dataset_source)
    img_dir = root / "VQA_RAD Image Folder"
    items: List[VQAItem] = []
    answer_types: Counter = Counter()
    malformed = 0
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not all(k in r for k in ("question", "image_name", "answer")):
            malformed += 1
            continue
        answer_types[_s(r.get("answer_type"))] += 1
        if r.get("phrase_type") not in VQARAD_PHRASE_TYPES or r.get("answer_type") != "CLOSED":
            continue
        qid = _s(r.get("qid")) or str(i)
        items.append(EvalItem(image=_s(r["image_name"]), path=str(img_dir / _s(r["image_name"])),
                              question=_s(r["question"]), answer=_s(r["answer"]), key=f"vqarad:{qid}"))
    _unique_keys(items)
    report = {
        "source": str(path),
        "records": len(records),
        "kept": len(items),
        "malformed": malformed,
        "answer_types": dict(answer_types),
    }
    return items, report


FILE_ORDERS = ("sorted", "listdir")


def read_omnimedvqa(
    dataset_source: str | Path, *, include_modality_key: bool = False, file_order: str = "sorted"
) -> Tuple[List[EvalItem], Dict[str, Any]]:
    """OmniMedVQA's open-access questions of the 8 modalities, shuffled with
    ``random.Random(0)`` (the reference's order); options C/D may be absent.

    Records that name their modality in ``modality`` instead of ``modality_type``
    are left out as the reference leaves them out (it reads ``modality_type`` only),
    and counted; ``include_modality_key=True`` brings them in.

    ``file_order``: the question files are read in sorted name order (the same on
    every machine). The reference read them in ``os.listdir`` order, which depends
    on the file system; ``"listdir"`` reproduces that on the machine at hand. The
    order matters because the shuffle runs over the concatenated files.
    """
    if file_order not in FILE_ORDERS:
        raise ValueError(f"omnimedvqa_file_order must be one of {list(FILE_ORDERS)}, got {file_order!r}")
    root = Path(dataset_source) / "OmniMedVQA"
    qa_dir = root / "QA_information" / "Open-access"
    if not qa_dir.is_dir():
        raise FileNotFoundError(f"OmniMedVQA questions not found: {str(qa_dir)!r} (dataset_source={str(dataset_source)!r})")
    if file_order == "sorted":
        files = sorted(qa_dir.glob("*.json"))
    else:
        files = [qa_dir / n for n in os.listdir(qa_dir) if n.endswith(".json")]
    if not files:
        raise FileNotFoundError(f"no *.json files in {str(qa_dir)!r}")
    items: List[VQAItem] = []
    excluded: Counter = Counter()
    stats: Counter = Counter()
    bad_files: List[str] = []
    for f in files:
        try:
            records = json.loads(f.read_text(encoding="utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            bad_files.append(f"{f.name}: {e}")
            continue
        if not isinstance(records, list):
            bad_files.append(f"{f.name}: not a JSON list")
            continue
        for r in records:
            stats["records"] += 1
            if not isinstance(r, dict) or not all(k in r for k in ("question", "gt_answer", "image_path")):
                stats["malformed"] += 1
                continue
            if "modality_type" in r:
                modality = _s(r["modality_type"])
            else:
                stats["modality_key_instead_of_modality_type"] += 1
                if not include_modality_key:
                    stats["left_out_modality_key"] += 1
                    continue
                modality = _s(r.get("modality"))
            if modality not in OMNIMEDVQA_MODALITIES:
                excluded[modality] += 1
                continue
            extra = {f"option_{L}": _s(r.get(f"option_{L}")) for L in OPTION_LETTERS}
            for L in ("C", "D"):
                if extra[f"option_{L}"] == "":
                    stats[f"no_option_{L}"] += 1
            extra["modality_type"] = modality
            extra["question_id"] = _s(r.get("question_id"))
            items.append(
                EvalItem(
                    image=_s(r["image_path"]),
                    path=str(root / _s(r["image_path"])),
                    question=_s(r["question"]),
                    answer=_s(r["gt_answer"]),
                    key=f"omnimedvqa:{extra['question_id'] or len(items)}",
                    extra=extra,
                )
            )
    _unique_keys(items)
    random.Random(0).shuffle(items)
    report = {
        "source": str(qa_dir),
        "files": len(files),
        "file_order": file_order,
        "include_modality_key": include_modality_key,
        "bad_files": bad_files,
        **dict(stats),
        "kept": len(items),
        "per_modality": dict(Counter(it.extra["modality_type"] for it in items)),
        "excluded_modalities": dict(excluded),
    }
    return items, report


def chunk_bounds(n: int, chunk_idx: int, num_chunks: int) -> Tuple[int, int]:
    """``[start, end)`` of chunk ``chunk_idx`` of ``num_chunks``: size ``max(n // num_chunks, 50)``,
    the last chunk running to the end (what the reference meant to do)."""
    if num_chunks < 1:
        raise ValueError(f"test_chunk must be >= 1, got {num_chunks}")
    if not 0 <= chunk_idx < num_chunks:
        raise ValueError(f"test_chunk_idx must be in [0, {num_chunks - 1}], got {chunk_idx}")
    size = max(n // num_chunks, MIN_CHUNK)
    start = min(n, chunk_idx * size)
    end = n if chunk_idx == num_chunks - 1 else min(n, start + size)
    return start, end


def select_chunk(items: Sequence[Any], chunk_idx: Optional[int], num_chunks: int) -> Tuple[List[Any], Tuple[int, int]]:
    """The items of one chunk, and the ``(idx, chunk)`` pair for file names.

    Chunking is asked for by giving ``test_chunk_idx``; without it every item is
    run. The names follow the reference's launch lines either way:
    ``test_chunk_idx`` (0 when not given) and ``test_chunk`` (50 by default), so a
    raw file the reference wrote for the same command is found. A full run and
    chunk 0 of 50 share that name; the record beside the file tells them apart.
    """
    if chunk_idx is None:
        return list(items), (0, int(num_chunks))
    start, end = chunk_bounds(len(items), int(chunk_idx), int(num_chunks))
    return list(items[start:end]), (int(chunk_idx), int(num_chunks))


def drop_missing_images(items: Sequence[VQAItem]) -> Tuple[List[VQAItem], List[str]]:
    """Items whose image file exists, and the paths of those that do not.

    Done after shuffling and chunking, so the split matches the reference's
    whatever is missing."""
    kept, missing = [], []
    for it in items:
        (kept if it.file is None or Path(it.file).is_file() else missing).append(it)
    return kept, [m.image for m in missing]
