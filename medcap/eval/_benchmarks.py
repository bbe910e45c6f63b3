"""The field's other VQA benchmarks: their scores, and the suites that read, answer and score them.

The field's VQA scores, per row and per file, computed from the rows on disk.

Every rule here follows a published evaluation so that our numbers sit in the
same tables (each one re-implemented from its description, checked by hand in
``tests/eval/test_benchmarks_scores.py``):

* **closed** questions (``answer_type=closed``): MedEvalKit's rule
  (``judge_judgement`` in its ``utils/utils.py``). The reply is lower-cased,
  cut after the last answer marker (``answer:``, ``answer is``, ...), its
  newlines and full stops removed; a yes/no answer is right when exactly one of
  "yes" and "no" occurs in the reply (as substrings, as there) and the answer
  does. Other closed answers (SLAKE's "Which is bigger, ...?") must equal the
  reply (``judge_close_end_vqa``).
* **open** questions: ``exact_match`` (the parsed reply equals the answer,
  lower-cased: MedEvalKit's ``em``), ``token_recall`` (the share of the answer's
  words found in the reply: LLaVA-Med's open-question metric) and
  ``token_f1``. Words are runs of letters and digits, lower-cased; repeated
  words count as often as they occur in both (clipped counts).
* **choice** questions (PMC-VQA, your own with options): the letter in
  ``predict`` (letter mapping or log-likelihood, as OmniMedVQA) against the
  option equal to the answer (``_scoring.is_correct``).

``correct`` is 1/0 per row: the closed rule, the open exact match, or the
choice letter. The suite's **overall** score is MedEvalKit's "total metrics"
accuracy: right answers over all scored questions, closed and open together
(open counted right by exact match), which is the number its results table
reports per benchmark. Rows without a reference answer are not scored.

The field's benchmarks: SLAKE, PathVQA, VQA-RAD (Hugging Face), PMC-VQA, your own
questions; read from the layouts a download leaves, answered with the reference's
two-step protocol (``run_vqa``), scored by the rules above.

=================  ======================================================  ==========
suite              layout under ``dataset_source``                         file prefix
=================  ======================================================  ==========
test_slake         ``Slake1.0/test.json`` + ``Slake1.0/imgs/<img_name>``      ``slake``
test_pathvqa       ``path-vqa/data/test-*.parquet`` (image bytes inside)   ``pathvqa``
test_vqarad_hf     ``vqa-rad/data/test-*.parquet``                         ``vqaradhf``
test_pmcvqa        ``PMC-VQA/test_clean.csv`` (or ``test.csv``) + ``images/``  ``pmcvqa``
                   (or ``figures/``)
test_questions     ``dataset_source`` is the JSONL file itself             ``questions``
=================  ======================================================  ==========

Each suite writes into ``output_dir``: ``{prefix}-{vqa_type}-raw-{ckpt}.csv``
(image, instruction, output, generated, question, answer, answer_type, options,
question_id; UTF-8 with BOM), the scored ``{raw}-{round(overall, 4)}.csv``
(adding predict_generated, predict, correct, exact_match, token_recall,
token_f1) and ``{raw}-summary.json`` (the scores, the counts, what was skipped
and why). Images inside parquet files are decoded in memory (CMYK JPEGs
included) and never written anywhere; the ``image`` column holds the file's
own ``path`` value, or ``row{N}.png`` (``N`` counting rows over the sorted
files) when it has none. Missing images, empty answers and malformed records
are counted and reported, never fatal.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from medcap._io import atomic_write_text
from medcap.data import BadSample
from medcap.eval._loop import (
    OPTION_LETTERS,
    CsvJournal,
    EvalItem,
    accuracy_name,
    read_csv_rows,
    results_lock,
    write_csv_atomic,
)
from medcap.eval._suites import check_vqa_type, read_question_list, run_vqa

# ---- Scores ----------------------------------------------------------------------

ANSWER_TYPES = ("closed", "open", "choice")
YES_NO = ("yes", "no")
# MedEvalKit's answer markers, in its order: the reply is cut after the last occurrence of each.
ANSWER_MARKERS = ("**answer**:", "**answer**", "*answer*:", "**answer:**", "answer is", "answer:",
                  "答案:", "final answer", "final answer is")
ROW_SCORE_COLUMNS = ("correct", "exact_match", "token_recall", "token_f1")
HEADLINE = "overall"
CONVENTION = ("overall = MedEvalKit's total accuracy (closed: yes/no read from the reply; open: exact match; "
              "choice: the mapped letter), micro over questions")


def answer_kind(answer: str) -> str:
    """``closed`` when the answer is yes or no (how PathVQA and VQA-RAD are split), else ``open``."""
    return "closed" if str(answer).strip().lower() in YES_NO else "open"


def parsed_reply(reply: str) -> str:
    text = str(reply or "").lower()
    for marker in ANSWER_MARKERS:
        if marker in text:
            text = text.split(marker)[-1]
    return text


def _flat(text: str) -> str:
    return text.replace("\n", "").replace(".", "").strip()


def closed_correct(answer: str, reply: str) -> int:
    a, r = _flat(str(answer).lower()), _flat(parsed_reply(reply))
    if a in YES_NO:
        return int((("yes" in r) != ("no" in r)) and a in r)
    return int(r == a)


def exact_match(answer: str, reply: str) -> int:
    return int(parsed_reply(reply).strip() == str(answer).lower().strip())


def words(text: str) -> Counter:
    return Counter(re.findall(r"[^\W_]+", str(text or "").lower()))


def token_scores(answer: str, reply: str) -> Dict[str, float]:
    """``recall`` (answer words found in the reply), ``precision`` and ``f1``; 0 when either is empty."""
    ref, hyp = words(answer), words(reply)
    common = sum((ref & hyp).values())
    recall = common / sum(ref.values()) if ref else 0.0
    precision = common / sum(hyp.values()) if hyp else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"recall": recall, "precision": precision, "f1": f1}


def row_scores(row: Mapping[str, str]) -> Optional[Dict[str, Any]]:
    """The per-row scores (``ROW_SCORE_COLUMNS``) of a raw or scored row; None when the
    row has no reference answer. A choice row needs its ``predict`` letter."""
    from medcap.eval._scoring import is_correct, row_options

    kind, answer, reply = row.get("answer_type", ""), row.get("output", ""), row.get("generated", "")
    if answer == "" or kind not in ANSWER_TYPES:
        return None
    tokens = token_scores(answer, reply)
    out: Dict[str, Any] = {"exact_match": exact_match(answer, reply), "token_recall": round(tokens["recall"], 6),
                           "token_f1": round(tokens["f1"], 6)}
    if kind == "closed":
        out["correct"] = closed_correct(answer, reply)
    elif kind == "open":
        out["correct"] = out["exact_match"]
    else:
        out["correct"] = is_correct(row.get("predict", ""), row_options(row), answer)
    return out


def _mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def summarize(rows: Sequence[Mapping[str, str]], correct: Optional[Sequence[Optional[int]]] = None) -> Dict[str, Any]:
    """Per question type and overall, from rows (scored or raw). ``correct`` overrides the
    rows' own rule per row (None: unscored)."""
    by_kind: Dict[str, List[Dict[str, Any]]] = {k: [] for k in ANSWER_TYPES}
    unscored = 0
    for i, r in enumerate(rows):
        s = row_scores(r)
        if s is None:
            unscored += 1
            continue
        if correct is not None and correct[i] is not None:
            s["correct"] = int(correct[i])
        by_kind[r["answer_type"]].append(s)
    out: Dict[str, Any] = {"rows": len(rows), "scored": sum(len(v) for v in by_kind.values()), "unscored": unscored}
    if by_kind["closed"]:
        out["closed"] = {"n": len(by_kind["closed"]), "accuracy": _mean([s["correct"] for s in by_kind["closed"]])}
    if by_kind["open"]:
        o = by_kind["open"]
        out["open"] = {"n": len(o), "exact_match": _mean([s["exact_match"] for s in o]),
                       "token_recall": _mean([s["token_recall"] for s in o]), "token_f1": _mean([s["token_f1"] for s in o])}
    if by_kind["choice"]:
        out["choice"] = {"n": len(by_kind["choice"]), "accuracy": _mean([s["correct"] for s in by_kind["choice"]])}
    every = [s["correct"] for v in by_kind.values() for s in v]
    out[HEADLINE] = _mean(every)
    return out


# ------------------------------------------------------------------ medcap rescore

_SUMMARY_KEYS = (("closed", "accuracy"), ("open", "exact_match"), ("open", "token_recall"), ("open", "token_f1"),
                 ("choice", "accuracy"))


def _summary_beside(path) -> Dict[str, Any]:
    """The ``-summary.json`` of a raw file or of its scored file (``{raw}-{acc}.csv``)."""
    import json
    from pathlib import Path

    path = Path(path)
    stem = re.sub(r"-(\d+(\.\d+)?(e-?\d+)?|nan)$", "", path.stem)
    p = path.with_name(stem + "-summary.json")
    try:
        return json.loads(p.read_text(encoding="utf-8")).get("scores", {}) if p.is_file() else {}
    except ValueError:
        return {}


def rescore_benchmark(path, rows: List[Dict[str, str]], stated_overall: Optional[float]) -> Dict[str, Any]:
    """``medcap rescore`` of a benchmark file (rows with ``answer_type``): every score
    recomputed from the rows, next to what the file's name, its ``correct`` column and
    its summary state. A raw file's choice rows are read by the nearest option (no model)."""
    from medcap.eval._rescore import _options, nearest_option

    scored = "correct" in rows[0]
    if scored:
        mine = summarize(rows)
        column = [int(r["correct"]) for r in rows if r.get("correct", "") != ""]
    else:
        letters = [nearest_option(r.get("generated", ""), _options(r)) if r.get("answer_type") == "choice" else ""
                   for r in rows]
        mine = summarize([{**r, "predict": L} for r, L in zip(rows, letters)])
    stated = _summary_beside(path)
    scores: Dict[str, Any] = {}
    if scored:
        scores[HEADLINE] = {"file": stated_overall if stated_overall is not None else stated.get(HEADLINE),
                            "recomputed": mine[HEADLINE]}
        scores["correct_column_agrees"] = {"file": sum(column), "recomputed": sum(
            s["correct"] for s in (row_scores(r) for r in rows) if s is not None)}
    else:
        scores[f"{HEADLINE} (nearest option)" if any(r.get("answer_type") == "choice" for r in rows) else HEADLINE] = {
            "file": None, "recomputed": mine[HEADLINE]}
    for kind, name in _SUMMARY_KEYS:
        if kind in mine:
            scores[f"{kind}_{name}"] = {"file": stated.get(kind, {}).get(name) if scored else None,
                                        "recomputed": mine[kind][name]}
    return {"file": str(path), "kind": "benchmark" + ("" if scored else " (raw)"), "rows": len(rows), "scores": scores}


# ---- The benchmark suites --------------------------------------------------------

log = logging.getLogger(__name__)

EXTRA_COLUMNS = ("question", "answer", "answer_type", "option_A", "option_B", "option_C", "option_D", "question_id")
CHOICE_COLUMNS = ("predict_generated", "predict")
SLAKE_LANGUAGES = ("en", "zh", "all")
MAX_EXAMPLES = 20

Report = Dict[str, Any]


def _s(v: Any) -> str:
    return "" if v is None else str(v)


def _new_report(source: Path) -> Report:
    return {"source": str(source), "records": 0, "kept": 0, "malformed": 0, "empty_answers": 0,
            "missing_images": 0, "skipped_examples": []}


def _skip(report: Report, what: str, where: str) -> None:
    report[what] += 1
    if len(report["skipped_examples"]) < MAX_EXAMPLES:
        report["skipped_examples"].append(f"{where}: {what.replace('_', ' ')}")


def _extra(question: str, answer: str, kind: str, qid: str, options: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    extra = {"question": question, "answer": answer, "answer_type": kind, "question_id": qid}
    extra.update({f"option_{L}": (options or {}).get(L, "") for L in OPTION_LETTERS})
    return extra


def _unique(items: List[EvalItem]) -> List[EvalItem]:
    seen: Counter = Counter()
    for it in items:
        seen[it.key] += 1
        if seen[it.key] > 1:
            it.key = f"{it.key}#{seen[it.key] - 1}"
    return items


# ------------------------------------------------------------------ SLAKE


def read_slake(dataset_source: str | Path, *, q_lang: str = "en") -> Tuple[List[EvalItem], Report]:
    """SLAKE's test questions in file order: ``q_lang`` en (default), zh or all."""
    if q_lang not in SLAKE_LANGUAGES:
        raise ValueError(f"q_lang must be one of {list(SLAKE_LANGUAGES)}, got {q_lang!r}")
    root = Path(dataset_source) / "Slake1.0"
    path = root / "test.json"
    records = read_question_list(path, "SLAKE", dataset_source)
    report = {**_new_report(path), "q_lang": q_lang, "other_language": 0}
    items: List[EvalItem] = []
    for i, r in enumerate(records):
        report["records"] += 1
        if not isinstance(r, dict) or not all(_s(r.get(k)).strip() for k in ("img_name", "question")):
            _skip(report, "malformed", f"record {i}")
            continue
        if q_lang != "all" and _s(r.get("q_lang")) != q_lang:
            report["other_language"] += 1
            continue
        answer = _s(r.get("answer")).strip()
        if answer == "":
            _skip(report, "empty_answers", f"record {i} (qid {r.get('qid')})")
            continue
        kind = "closed" if _s(r.get("answer_type")).upper() == "CLOSED" else "open"
        qid = _s(r.get("qid")) or str(i)
        items.append(EvalItem(image=_s(r["img_name"]), path=str(root / "imgs" / _s(r["img_name"])),
                              question=_s(r["question"]), answer=answer, key=f"slake:{qid}",
                              extra=_extra(_s(r["question"]), answer, kind, qid)))
    report["kept"] = len(items)
    return _unique(items), report


# ------------------------------------------------------------------ Hugging Face parquet


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


def decode_image_bytes(data: bytes, name: str):
    """Image bytes -> 8-bit RGB ``PIL.Image`` with ``load_image``'s conventions (EXIF
    orientation, CMYK/alpha/16-bit conversions); ``BadSample`` when unreadable."""
    from PIL import Image, ImageOps

    from medcap.data._image import DEFAULT_MAX_IMAGE_PIXELS, to_rgb

    if not data:
        raise BadSample(f"image not found: {name} holds no image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        if img.size[0] * img.size[1] > DEFAULT_MAX_IMAGE_PIXELS:
            raise BadSample(f"image too large: {name} is {img.size[0]}x{img.size[1]}")
        img.load()
        return to_rgb(ImageOps.exif_transpose(img))
    except BadSample:
        raise
    except Exception as e:  # Pillow raises many types for broken data
        raise BadSample(f"corrupt image: {name}: {type(e).__name__}: {e}") from e


def read_hf_parquet(dataset_source: str | Path, folder: str, prefix: str) -> Tuple[List[EvalItem], Report, ParquetImages]:
    """``{folder}/data/test-*.parquet`` (columns image{bytes, path}, question, answer), files
    in name order; closed questions are those answered yes or no."""
    from medcap.data._convert_vqa import vqa_parquet_columns

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
            question, answer = _s(questions[row]).strip(), _s(answers[row]).strip()
            if not question:
                _skip(report, "malformed", where)
                continue
            if answer == "":
                _skip(report, "empty_answers", where)
                continue
            if not isinstance(cell, dict) or not cell.get("bytes"):
                _skip(report, "missing_images", where)
                continue
            name = _s(cell.get("path")) or f"row{n - 1}.png"
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


# ------------------------------------------------------------------ PMC-VQA


def _choice_text(value: str, letter: str) -> str:
    """``"A: text"`` or ``"A:text"`` -> ``"text"``; values without the prefix kept."""
    v = value.strip()
    for sep in (":", "."):
        if v[:2].upper() == f"{letter}{sep}":
            return v[2:].strip()
    return v


def read_pmcvqa(dataset_source: str | Path) -> Tuple[List[EvalItem], Report]:
    """PMC-VQA's test questions: ``test_clean.csv`` (else ``test.csv``), multiple choice.
    The answer is ``Answer_label``'s option when given, else ``Answer`` (a letter or the
    option text)."""
    root = Path(dataset_source) / "PMC-VQA"
    path = next((root / n for n in ("test_clean.csv", "test.csv") if (root / n).is_file()), None)
    if path is None:
        raise FileNotFoundError(f"PMC-VQA questions not found: {str(root / 'test_clean.csv')!r} or test.csv "
                                f"(dataset_source={str(dataset_source)!r})")
    image_dir = next((root / n for n in ("images", "figures") if (root / n).is_dir()), root / "images")
    report = {**_new_report(path), "image_dir": str(image_dir)}
    items: List[EvalItem] = []
    with open(path, encoding="utf-8-sig", newline="") as fh:
        for i, r in enumerate(csv.DictReader(fh)):
            report["records"] += 1
            figure, question = _s(r.get("Figure_path")).strip(), _s(r.get("Question")).strip()
            options = {L: _choice_text(_s(r.get(f"Choice {L}")), L) for L in OPTION_LETTERS}
            if not figure or not question or not options["A"] or not options["B"]:
                _skip(report, "malformed", f"line {i + 2}")
                continue
            answer = _pmc_answer(r, options)
            if answer == "":
                _skip(report, "empty_answers", f"line {i + 2}")
                continue
            qid = _s(r.get("index")) or str(i)
            items.append(EvalItem(image=figure, path=str(image_dir / figure), question=question, answer=answer,
                                  key=f"pmcvqa:{i}", extra=_extra(question, answer, "choice", qid, options)))
    report["kept"] = len(items)
    return _unique(items), report


def _pmc_answer(r: Dict[str, Any], options: Dict[str, str]) -> str:
    label = _s(r.get("Answer_label")).strip().upper()
    if label in options and options[label]:
        return options[label]
    answer = _s(r.get("Answer")).strip()
    letter = answer[:1].upper()
    if len(answer) == 1 or (len(answer) > 1 and answer[1] in ":."):
        if letter in options and options[letter]:
            return options[letter]
    return _choice_text(answer, letter) if answer else ""


# ------------------------------------------------------------------ your own questions


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
        if not isinstance(r, dict) or not _s(r.get("image")).strip() or not _s(r.get("question")).strip():
            _skip(report, "malformed", f"line {i + 1}")
            continue
        options = _question_options(r.get("options"))
        if options is None:
            _skip(report, "malformed", f"line {i + 1} (options must be a list or an A-D mapping of 2-4)")
            continue
        answer = _s(r.get("answer")).strip()
        if options and len(answer) == 1 and answer.upper() in options:
            answer = options[answer.upper()]
        kind = "choice" if options else (_s(r.get("answer_type")).lower() or answer_kind(answer))
        if kind not in ("closed", "open", "choice"):
            kind = answer_kind(answer)
        report["without_answer"] += answer == ""
        qid = _s(r.get("id")) or str(i + 1)
        items.append(EvalItem(image=_s(r["image"]), path=str(path.parent / _s(r["image"])), question=_s(r["question"]),
                              answer=answer, key=f"questions:{qid}",
                              extra=_extra(_s(r["question"]), answer, kind if answer else "", qid, options)))
    report["kept"] = len(items)
    return _unique(items), report


def _question_options(value: Any) -> Optional[Dict[str, str]]:
    if value in (None, "", [], {}):
        return {}
    if isinstance(value, list) and 2 <= len(value) <= 4:
        return {L: _s(v) for L, v in zip(OPTION_LETTERS, value)}
    if isinstance(value, dict) and set(value) <= set(OPTION_LETTERS) and len(value) >= 2:
        return {L: _s(value[L]) for L in OPTION_LETTERS if L in value}
    return None


# ------------------------------------------------------------------ the suites


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


def read_benchmark(suite: str, dataset_source: str | Path, *, q_lang: str = "en"):
    """``(items, report, parquet images or None)`` of one suite."""
    if suite == "test_slake":
        return (*read_slake(dataset_source, q_lang=q_lang), None)
    if suite == "test_pathvqa":
        return read_hf_parquet(dataset_source, "path-vqa", "pathvqa")
    if suite == "test_vqarad_hf":
        return read_hf_parquet(dataset_source, "vqa-rad", "vqaradhf")
    if suite == "test_pmcvqa":
        return (*read_pmcvqa(dataset_source), None)
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


def _drop_missing_files(items: List[EvalItem], images: Optional[ParquetImages], report: Report) -> List[EvalItem]:
    kept = []
    for it in items:
        if images is not None and it.file in images or it.file is None or Path(it.file).is_file():
            kept.append(it)
        else:
            _skip(report, "missing_images", it.image)
    report["kept"] = len(kept)
    return kept


def run_benchmark(
    engine,
    suite: str,
    *,
    dataset_source: str,
    output_dir: str | Path,
    ckpt: str,
    vqa_type: str,
    max_seq_len: int,
    max_new_tokens: int,
    image_loader: Callable[[str], torch.Tensor],
    scoring: str = "letter",
    q_lang: str = "en",
    identity: Optional[Dict[str, Any]] = None,
    overwrite: bool = False,
    limit: Optional[int] = None,
    progress: bool = True,
    on_batch: Optional[Callable[[int], None]] = None,
    ranks=None,
) -> Dict[str, Any]:
    """Read, answer (two-step protocol), score and summarise one suite (module docstring).
    With ``ranks`` (several processes), each answers its share and rank 0 scores."""
    check_vqa_type(vqa_type)
    bench = BENCHMARKS[suite]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw_path = out / f"{bench.prefix}-{vqa_type}-raw-{ckpt}.csv"
    items, report, images = read_benchmark(suite, dataset_source, q_lang=q_lang)
    items = _drop_missing_files(items, images, report)
    if limit is not None:
        items = items[:limit]
    _print_skipped(bench.title, report)
    loader = benchmark_loader(image_loader, images)
    ident = {**(identity or {}), "suite": suite}
    if suite == "test_slake":
        ident["q_lang"] = q_lang
    shared = {} if ranks is None else {"ranks": ranks}
    with results_lock(raw_path, **shared):
        rows = run_vqa(engine, items, vqa_type=vqa_type, raw_path=raw_path, image_loader=loader, max_seq_len=max_seq_len,
                       max_new_tokens=max_new_tokens, extra_columns=EXTRA_COLUMNS, identity=ident,
                       overwrite=overwrite, progress=progress, on_batch=on_batch, **shared)
        if ranks is not None and ranks.rank != 0:
            return {"raw_path": str(raw_path), "rows": len(rows)}
        left_out = _left_out(raw_path)
        files = {it.image: it.file for it in items}
        summary = score_benchmark(engine, raw_path, scoring=scoring, progress=progress,
                                  image_loader=lambda image: loader(files.get(image) or image))
        summary.update(suite=suite, benchmark=bench.title, ckpt=ckpt, vqa_type=vqa_type, scoring=scoring,
                       report=report, left_out_unreadable_images=left_out)
        summary_path = summary_path_of(raw_path)
        atomic_write_text(summary_path, json.dumps(summary, indent=1, ensure_ascii=False, default=str))
    _print_summary(bench.title, summary)
    return {"raw_path": str(raw_path), "summary_path": str(summary_path), "rows": len(rows), **summary}


def summary_path_of(raw_path: Path) -> Path:
    return raw_path.with_name(raw_path.stem + "-summary.json")


def _left_out(raw_path: Path) -> Dict[str, str]:
    from medcap.eval._loop import run_record_path

    p = run_record_path(raw_path)
    try:
        return dict(json.loads(p.read_text(encoding="utf-8")).get("left_out", {}))
    except (OSError, ValueError):
        return {}


def score_benchmark(engine, raw_path: str | Path, *, scoring: str = "letter", progress: bool = True,
                    image_loader: Optional[Callable[[str], torch.Tensor]] = None) -> Dict[str, Any]:
    """Score a raw benchmark file: choice rows get a letter (``scoring``: letter mapping or
    log-likelihood, resumable through ``{raw}-scored.partial.csv``), every row its scores;
    writes ``{raw}-{round(overall, 4)}.csv``. Returns the summary's scores."""
    from medcap.eval._scoring import SCORING_METHODS, score_letter, score_loglik

    if scoring not in SCORING_METHODS:
        raise ValueError(f"vqa_scoring must be one of {list(SCORING_METHODS)}, got {scoring!r}")
    raw_path = Path(raw_path)
    rows = read_csv_rows(raw_path)
    choice = [r for r in rows if r.get("answer_type") == "choice" and r.get("output", "") != ""]
    letters: List[Dict[str, str]] = []
    if choice:
        partial = raw_path.with_name(f"{raw_path.stem}-scored.partial.csv")
        journal = CsvJournal(None, list(rows[0]) + list(CHOICE_COLUMNS) + ["correct"], partial=partial, bom=True)
        if len(journal) > len(choice) or any(a.get("generated") != b.get("generated") for a, b in zip(journal.rows(), choice)):
            raise ValueError(f"{partial} does not match {raw_path}; move it away to score again")
        if scoring == "letter":
            score_letter(engine, choice, journal, progress=progress,
                         questions={r.get("question_id", ""): r.get("question", "") for r in choice})
        else:
            score_loglik(engine, choice, journal, image_loader, progress=progress)
        letters = journal.rows()
        journal.path.unlink()
    by_row = iter(letters)
    scored = []
    for r in rows:
        row = dict(r)
        if r.get("answer_type") == "choice" and r.get("output", "") != "":
            got = next(by_row)
            row.update({c: got[c] for c in CHOICE_COLUMNS})
        else:
            row.update({c: "" for c in CHOICE_COLUMNS})
        s = row_scores(row)
        row.update({c: ("" if s is None else s[c]) for c in ROW_SCORE_COLUMNS})
        scored.append(row)
    scores = summarize(scored)
    columns = (list(rows[0]) if rows else []) + list(CHOICE_COLUMNS) + list(ROW_SCORE_COLUMNS)
    overall = scores[HEADLINE]
    for old in raw_path.parent.glob(f"{raw_path.stem}-*.csv"):
        if _is_scoring_of(old, raw_path):
            old.unlink()  # an earlier scoring of the same rows: one scored file per raw file
    scored_path = raw_path.with_name(f"{raw_path.stem}-{accuracy_name(overall if overall is not None else float('nan'))}.csv")
    write_csv_atomic(scored_path, columns, scored, bom=True)
    return {"scored_path": str(scored_path), "convention": CONVENTION, "headline": HEADLINE, "scores": scores}


def _is_scoring_of(path: Path, raw_path: Path) -> bool:
    """``{raw}-{acc}.csv`` holding scored rows (not the raw file of a checkpoint named ``{ckpt}-2``)."""
    import re

    if not re.fullmatch(re.escape(raw_path.stem) + r"-(\d+(\.\d+)?(e-?\d+)?|nan)\.csv", path.name):
        return False
    with open(path, encoding="utf-8-sig") as fh:
        return "token_recall" in fh.readline()


def _print_skipped(title: str, report: Report) -> None:
    counts = {k: report[k] for k in ("malformed", "empty_answers", "missing_images", "other_language", "without_answer")
              if report.get(k)}
    line = f"{title}: {report['records']} records, {report['kept']} questions kept"
    if counts:
        line += f"; skipped: {counts}, e.g. {report['skipped_examples'][:3]}"
    print(line, flush=True)


def _print_summary(title: str, summary: Dict[str, Any]) -> None:
    s = summary["scores"]
    parts = [f"overall {s[HEADLINE]:.4f}" if s.get(HEADLINE) is not None else "overall -"]
    if "closed" in s:
        parts.append(f"closed acc {s['closed']['accuracy']:.4f} (n={s['closed']['n']})")
    if "open" in s:
        o = s["open"]
        parts.append(f"open exact {o['exact_match']:.4f} recall {o['token_recall']:.4f} f1 {o['token_f1']:.4f} (n={o['n']})")
    if "choice" in s:
        parts.append(f"choice acc {s['choice']['accuracy']:.4f} (n={s['choice']['n']})")
    if summary.get("left_out_unreadable_images"):
        parts.append(f"{len(summary['left_out_unreadable_images'])} unreadable image(s) left out (retried next run)")
    print(f"{title}: " + "; ".join(parts) + f"  [{Path(summary['scored_path']).name}]", flush=True)
