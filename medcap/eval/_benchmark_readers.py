"""Readers of the field's VQA benchmarks, in the layouts a download leaves.

=================  ======================================================  ==========
suite              layout under ``dataset_source``                         file prefix
=================  ======================================================  ==========
test_slake         ``Slake1.0/test.json`` + ``Slake1.0/imgs/<img_name>``      ``slake``
test_pathvqa       ``path-vqa/data/test-*.parquet`` (image bytes inside)   ``pathvqa``
test_vqarad_hf     ``vqa-rad/data/test-*.parquet``                         ``vqaradhf``
test_pmcvqa        ``PMC-VQA/test_2.csv`` (or ``test_clean.csv``, ``test.csv``)   ``pmcvqa``
                   + ``images/`` (or ``figures/``)
test_questions     ``dataset_source`` is the JSONL file itself             ``questions``
=================  ======================================================  ==========

In this file, in order: a report of what each reader kept and skipped, one reader
per layout (SLAKE; the Hugging Face parquet files, whose images are decoded in
memory, CMYK JPEGs included, and never written anywhere; PMC-VQA; your own JSONL
questions), then ``BENCHMARKS`` (each suite's prefix and title), ``read_benchmark``
(the reader of a suite) and ``benchmark_loader`` (how its images load). Missing
images, empty answers and malformed records are counted and reported, never fatal.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from medcap.data import BadSample, decode_image_bytes
from medcap.eval._benchmark_scores import answer_kind
from medcap.eval._run import OPTION_LETTERS, EvalItem, read_question_list, text_of, unique_keys

SLAKE_LANGUAGES = ("en", "zh", "all")
# PMC-VQA's question files, in the order pmcvqa_file=auto looks for them: MedEvalKit scores test_2.csv
PMCVQA_FILES = ("test_2.csv", "test_clean.csv", "test.csv")
MAX_EXAMPLES = 20

Report = Dict[str, Any]


def _new_report(source: Path) -> Report:
    return {"source": str(source), "records": 0, "kept": 0, "malformed": 0, "empty_answers": 0,
            "missing_images": 0, "skipped_examples": []}


def skip(report: Report, what: str, where: str) -> None:
    report[what] += 1
    if len(report["skipped_examples"]) < MAX_EXAMPLES:
        report["skipped_examples"].append(f"{where}: {what.replace('_', ' ')}")


def _extra(question: str, answer: str, kind: str, qid: str, options: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    extra = {"question": question, "answer": answer, "answer_type": kind, "question_id": qid}
    extra.update({f"option_{L}": (options or {}).get(L, "") for L in OPTION_LETTERS})
    return extra


# ---- SLAKE


def read_slake(dataset_source: str | Path, *, q_lang: str = "en") -> Tuple[List[EvalItem], Report]:
    """SLAKE's test questions in file order: ``q_lang`` en (the set LLaVA-Med's table
    scores), zh, or all (English and Chinese: MedEvalKit's, and the suite's default)."""
    if q_lang not in SLAKE_LANGUAGES:
        raise ValueError(f"q_lang must be one of {list(SLAKE_LANGUAGES)}, got {q_lang!r}")
    root = Path(dataset_source) / "Slake1.0"
    path = root / "test.json"
    records = read_question_list(path, "SLAKE", dataset_source)
    report = {**_new_report(path), "q_lang": q_lang, "other_language": 0}
    items: List[EvalItem] = []
    for i, r in enumerate(records):
        report["records"] += 1
        if not isinstance(r, dict) or not all(text_of(r.get(k)).strip() for k in ("img_name", "question")):
            skip(report, "malformed", f"record {i}")
            continue
        if q_lang != "all" and text_of(r.get("q_lang")) != q_lang:
            report["other_language"] += 1
            continue
        answer = text_of(r.get("answer")).strip()
        if answer == "":
            skip(report, "empty_answers", f"record {i} (qid {r.get('qid')})")
            continue
        kind = "closed" if text_of(r.get("answer_type")).upper() == "CLOSED" else "open"
        qid = text_of(r.get("qid")) or str(i)
        items.append(EvalItem(image=text_of(r["img_name"]), path=str(root / "imgs" / text_of(r["img_name"])),
                              question=text_of(r["question"]), answer=answer, key=f"slake:{qid}",
                              extra=_extra(text_of(r["question"]), answer, kind, qid)))
    report["kept"] = len(items)
    return unique_keys(items), report


# ---- Hugging Face parquet


class ParquetImages:
    """Images held as bytes inside parquet files, decoded in memory on demand."""

    PREFIX = "parquet://"

    def __init__(self):
        self._cells: Dict[str, Tuple[Any, int]] = {}

    def add(self, column, row: int) -> str:
        ref = f"{self.PREFIX}{len(self._cells)}"
        self._cells[ref] = (column, row)
        return ref

    def __contains__(self, ref: str) -> bool:
        return ref in self._cells

    def data(self, ref: str) -> bytes:
        column, row = self._cells[ref]
        cell = column[row].as_py() or {}
        return cell.get("bytes") or b""


def read_hf_parquet(dataset_source: str | Path, folder: str, prefix: str) -> Tuple[List[EvalItem], Report, ParquetImages]:
    """``{folder}/data/test-*.parquet`` (columns image{bytes, path}, question, answer), files
    in name order; closed questions are those answered yes or no."""
    from medcap.data import vqa_parquet_columns

    data_dir = Path(dataset_source) / folder / "data"
    files = sorted(data_dir.glob("test-*.parquet"))
    if not files:
        raise FileNotFoundError(f"no test-*.parquet files in {str(data_dir)!r} (dataset_source={str(dataset_source)!r}; "
                                f"download with: huggingface-cli download flaviagiammarino/{folder} --repo-type dataset "
                                f"--local-dir {Path(dataset_source) / folder})")
    report = {**_new_report(data_dir), "files": [f.name for f in files]}
    images = ParquetImages()
    items: List[EvalItem] = []
    seen: Dict[str, str] = {}  # image name -> sha256 of its bytes
    n = 0
    for f in files:
        questions, answers, image_col = vqa_parquet_columns(f)
        for row in range(len(questions)):
            n += 1
            report["records"] += 1
            where = f"{f.name} row {row}"
            cell = image_col[row].as_py()
            question, answer = text_of(questions[row]).strip(), text_of(answers[row]).strip()
            if not question:
                skip(report, "malformed", where)
                continue
            if answer == "":
                skip(report, "empty_answers", where)
                continue
            if not isinstance(cell, dict) or not cell.get("bytes"):
                skip(report, "missing_images", where)
                continue
            name = text_of(cell.get("path")) or f"row{n - 1}.png"
            # The name keys the per-image description cache: two different images under one
            # `path` value must not share a description, so a repeat with other bytes is told apart.
            digest = hashlib.sha256(cell["bytes"]).hexdigest()
            if seen.setdefault(name, digest) != digest:
                report["renamed_duplicate_image_names"] = report.get("renamed_duplicate_image_names", 0) + 1
                name = f"{name}#row{n - 1}"
            items.append(EvalItem(image=name, path=images.add(image_col, row), question=question, answer=answer,
                                  key=f"{prefix}:{n - 1}", extra=_extra(question, answer, answer_kind(answer), str(n - 1))))
    report["kept"] = len(items)
    return items, report, images


# ---- PMC-VQA


def _choice_text(value: str, letter: str) -> str:
    """``"A: text"`` or ``"A:text"`` -> ``"text"``; values without the prefix kept."""
    v = value.strip()
    for sep in (":", "."):
        if v[:2].upper() == f"{letter}{sep}":
            return v[2:].strip()
    return v


def pmcvqa_questions_file(dataset_source: str | Path, file: str = "auto") -> Path:
    """The PMC-VQA questions file: ``file`` under ``PMC-VQA/``, or with ``auto`` the first of
    ``PMCVQA_FILES`` there (``test_2.csv``: the set MedEvalKit's table scores)."""
    root = Path(dataset_source) / "PMC-VQA"
    names = PMCVQA_FILES if file == "auto" else (file,)
    path = next((root / n for n in names if (root / n).is_file()), None)
    if path is None:
        raise FileNotFoundError(f"PMC-VQA questions not found: {' or '.join(repr(str(root / n)) for n in names)} "
                                f"(pmcvqa_file={file}; test_clean.csv or test.csv also serve; "
                                f"dataset_source={str(dataset_source)!r})")
    return path


def read_pmcvqa(dataset_source: str | Path, *, file: str = "auto") -> Tuple[List[EvalItem], Report]:
    """PMC-VQA's test questions, multiple choice, from ``pmcvqa_questions_file``. The
    answer is ``Answer_label``'s option when given, else ``Answer`` (a letter or the
    option text)."""
    root = Path(dataset_source) / "PMC-VQA"
    path = pmcvqa_questions_file(dataset_source, file)
    image_dir = next((root / n for n in ("images", "figures") if (root / n).is_dir()), root / "images")
    report = {**_new_report(path), "image_dir": str(image_dir), "file": path.name,
              "comparable_with": "MedEvalKit's PMC-VQA" if path.name == "test_2.csv" else None}
    items: List[EvalItem] = []
    with open(path, encoding="utf-8-sig", newline="") as fh:
        for i, r in enumerate(csv.DictReader(fh)):
            report["records"] += 1
            figure, question = text_of(r.get("Figure_path")).strip(), text_of(r.get("Question")).strip()
            options = {L: _choice_text(text_of(r.get(f"Choice {L}")), L) for L in OPTION_LETTERS}
            if not figure or not question or not options["A"] or not options["B"]:
                skip(report, "malformed", f"line {i + 2}")
                continue
            answer = _pmc_answer(r, options)
            if answer == "":
                skip(report, "empty_answers", f"line {i + 2}")
                continue
            qid = text_of(r.get("index")) or str(i)
            items.append(EvalItem(image=figure, path=str(image_dir / figure), question=question, answer=answer,
                                  key=f"pmcvqa:{i}", extra=_extra(question, answer, "choice", qid, options)))
    report["kept"] = len(items)
    return unique_keys(items), report


def _pmc_answer(r: Dict[str, Any], options: Dict[str, str]) -> str:
    label = text_of(r.get("Answer_label")).strip().upper()
    if label in options and options[label]:
        return options[label]
    answer = text_of(r.get("Answer")).strip()
    letter = answer[:1].upper()
    if len(answer) == 1 or (len(answer) > 1 and answer[1] in ":."):
        if letter in options and options[letter]:
            return options[letter]
    return _choice_text(answer, letter) if answer else ""


# ---- your own questions


def read_questions(path: str | Path) -> Tuple[List[EvalItem], Report]:
    """A JSONL file: ``image`` (relative to the file), ``question``, optional ``options``
    (a list, or a mapping A-D) and ``answer``, optional ``id`` and ``answer_type``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"questions file not found: {str(path)!r}")
    report = {**_new_report(path), "without_answer": 0}
    items: List[EvalItem] = []
    for i, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines()):
        if not line.strip():
            continue
        report["records"] += 1
        try:
            r = json.loads(line)
        except ValueError:
            r = None
        if not isinstance(r, dict) or not text_of(r.get("image")).strip() or not text_of(r.get("question")).strip():
            skip(report, "malformed", f"line {i + 1}")
            continue
        options = _question_options(r.get("options"))
        if options is None:
            skip(report, "malformed", f"line {i + 1} (options must be a list or an A-D mapping of 2-4)")
            continue
        answer = text_of(r.get("answer")).strip()
        if options and len(answer) == 1 and answer.upper() in options:
            answer = options[answer.upper()]
        kind = "choice" if options else (text_of(r.get("answer_type")).lower() or answer_kind(answer))
        if kind not in ("closed", "open", "choice"):
            kind = answer_kind(answer)
        report["without_answer"] += answer == ""
        qid = text_of(r.get("id")) or str(i + 1)
        items.append(EvalItem(image=text_of(r["image"]), path=str(path.parent / text_of(r["image"])), question=text_of(r["question"]),
                              answer=answer, key=f"questions:{qid}",
                              extra=_extra(text_of(r["question"]), answer, kind if answer else "", qid, options)))
    report["kept"] = len(items)
    return unique_keys(items), report


def _question_options(value: Any) -> Optional[Dict[str, str]]:
    if value in (None, "", [], {}):
        return {}
    if isinstance(value, list) and 2 <= len(value) <= 4:
        return {L: text_of(v) for L, v in zip(OPTION_LETTERS, value)}
    if isinstance(value, dict) and set(value) <= set(OPTION_LETTERS) and len(value) >= 2:
        return {L: text_of(value[L]) for L in OPTION_LETTERS if L in value}
    return None


# ---- Which reader


@dataclass(frozen=True)
class Benchmark:
    name: str  # the config key
    prefix: str  # the file name prefix
    title: str


BENCHMARKS = {
    "test_slake": Benchmark("test_slake", "slake", "SLAKE"),
    "test_pathvqa": Benchmark("test_pathvqa", "pathvqa", "PathVQA"),
    "test_vqarad_hf": Benchmark("test_vqarad_hf", "vqaradhf", "VQA-RAD (HF)"),
    "test_pmcvqa": Benchmark("test_pmcvqa", "pmcvqa", "PMC-VQA"),
    "test_questions": Benchmark("test_questions", "questions", "questions"),
}
PREFIX_TITLES = {b.prefix: b.title for b in BENCHMARKS.values()}


def read_benchmark(suite: str, dataset_source: str | Path, *, q_lang: str = "en", pmcvqa_file: str = "auto"):
    """``(items, report, parquet images or None)`` of one suite."""
    if suite == "test_slake":
        return (*read_slake(dataset_source, q_lang=q_lang), None)
    if suite == "test_pathvqa":
        return read_hf_parquet(dataset_source, "path-vqa", "pathvqa")
    if suite == "test_vqarad_hf":
        return read_hf_parquet(dataset_source, "vqa-rad", "vqaradhf")
    if suite == "test_pmcvqa":
        return (*read_pmcvqa(dataset_source, file=pmcvqa_file), None)
    if suite == "test_questions":
        return (*read_questions(dataset_source), None)
    raise ValueError(f"unknown benchmark suite {suite!r}; one of {sorted(BENCHMARKS)}")


def benchmark_loader(image_loader: Callable[[str], torch.Tensor], images: Optional[ParquetImages]):
    """The loop's image loader: parquet references decoded in memory, files through ``image_loader``."""
    if images is None:
        return image_loader

    def load(ref: str) -> torch.Tensor:
        if ref in images:
            transform = getattr(image_loader, "transform", None)
            if transform is None:
                raise TypeError("images inside parquet files need an image_loader with a .transform (ImageLoader)")
            return transform(decode_image_bytes(images.data(ref), ref))
        return image_loader(ref)

    return load
