"""OmniMedVQA (``test_omnimedvqa``): its questions, the suite, and its scores.

In this file, in the order of a run:

* the questions: every ``*.json`` in ``{source}/OmniMedVQA/QA_information/Open-access/``,
  image paths relative to ``{source}/OmniMedVQA/``; the 8 modalities kept by the data
  set's own spellings, shuffled with ``random.Random(0)`` (the reference's order),
  then chunked (``test_chunk_idx``/``test_chunk``);
* ``OmniMedVQASuite``: what ``recipes/generate.py`` calls, step by step: ``read``,
  ``make_rows`` (the two-step protocol, ``_protocol``), ``score``, ``report``;
  ``run_test_omnimedvqa`` runs it whole;
* the scores: each answer mapped to an option letter (``_choices``), macro accuracy
  over modalities, the scored ``{raw}-{np.round(acc, 4)}.csv`` (``{raw}-loglik-...`` for
  ``vqa_scoring=loglik``; the peers' cells of ``_conventions`` beside medcap's) and its
  per-modality breakdown: ``modality-{scored}.csv``, ``{scored}-modality.json`` and ``.png``.

Files: ``omnimedvqa-{vqa_type}-raw-{ckpt}-{idx}_{chunk}.csv`` (image, instruction,
output, generated, options, modality_type, question_id; UTF-8 with BOM; ``{idx}_{chunk}``
are 0 and 50 when no chunk is asked for, as in the reference's launch lines).
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from medcap._io import atomic_write, atomic_write_text
from medcap.eval._choices import SCORING_METHODS, open_scoring, score_choices
from medcap.eval._conventions import CHOICE_COLUMNS, headlines, row_cells
from medcap.eval._protocol import TwoStepVQA, check_vqa_type
from medcap.eval._results import accuracy_name, read_csv_rows, write_csv_atomic
from medcap.eval._run import (
    OPTION_LETTERS,
    EvalItem,
    SuiteRun,
    loader_by_image,
    ready_items,
    run_suite,
    text_of,
    unique_keys,
)

log = logging.getLogger(__name__)

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
OMNIMEDVQA_EXTRA_COLUMNS = ("option_A", "option_B", "option_C", "option_D", "modality_type", "question_id")
FILE_ORDERS = ("sorted", "listdir")
MODALITY_PREFIX = "modality-"  # the per-modality breakdown CSV: modality-{scored file name}
MIN_CHUNK = 50

# ---- The questions


def read_omnimedvqa(
    dataset_source: str | Path, *, include_modality_key: bool = False, file_order: str = "sorted"
) -> Tuple[List[EvalItem], Dict[str, Any]]:
    """OmniMedVQA's open-access questions of the 8 modalities, shuffled with
    ``random.Random(0)`` (the reference's order); options C/D may be absent.
    Returns the items and a report (what was read, kept, excluded and why).

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
    files = _question_files(qa_dir, file_order, dataset_source)
    items: List[EvalItem] = []
    stats: Counter = Counter()
    excluded: Counter = Counter()
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
            item = _item(r, root, len(items), include_modality_key, stats, excluded)
            if item is not None:
                items.append(item)
    unique_keys(items)
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


def _question_files(qa_dir: Path, file_order: str, dataset_source: str | Path) -> List[Path]:
    if not qa_dir.is_dir():
        raise FileNotFoundError(f"OmniMedVQA questions not found: {str(qa_dir)!r} (dataset_source={str(dataset_source)!r})")
    if file_order == "sorted":
        files = sorted(qa_dir.glob("*.json"))
    else:
        files = [qa_dir / n for n in os.listdir(qa_dir) if n.endswith(".json")]
    if not files:
        raise FileNotFoundError(f"no *.json files in {str(qa_dir)!r}")
    return files


def _item(r: Any, root: Path, n: int, include_modality_key: bool, stats: Counter, excluded: Counter) -> Optional[EvalItem]:
    """One record as an item, or None (counted in ``stats`` / ``excluded``: why not)."""
    stats["records"] += 1
    if not isinstance(r, dict) or not all(k in r for k in ("question", "gt_answer", "image_path")):
        stats["malformed"] += 1
        return None
    if "modality_type" in r:
        modality = text_of(r["modality_type"])
    else:
        stats["modality_key_instead_of_modality_type"] += 1
        if not include_modality_key:
            stats["left_out_modality_key"] += 1
            return None
        modality = text_of(r.get("modality"))
    if modality not in OMNIMEDVQA_MODALITIES:
        excluded[modality] += 1
        return None
    extra = {f"option_{L}": text_of(r.get(f"option_{L}")) for L in OPTION_LETTERS}
    for L in ("C", "D"):
        if extra[f"option_{L}"] == "":
            stats[f"no_option_{L}"] += 1
    extra["modality_type"] = modality
    extra["question_id"] = text_of(r.get("question_id"))
    return EvalItem(image=text_of(r["image_path"]), path=str(root / text_of(r["image_path"])),
                    question=text_of(r["question"]), answer=text_of(r["gt_answer"]),
                    key=f"omnimedvqa:{extra['question_id'] or n}", extra=extra)


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


# ---- The suite


class OmniMedVQASuite:
    """``test_omnimedvqa``: the questions (one chunk when ``test_chunk_idx`` is given),
    answered in two steps, scored on rank 0 once every rank's answers are on disk."""

    def __init__(self, run: SuiteRun, *, dataset_source: str, vqa_type: str, max_seq_len: int, max_new_tokens: int,
                 test_chunk_idx: Optional[int] = None, test_chunk: int = 50, scoring: str = "letter",
                 include_modality_key: bool = False, file_order: str = "sorted"):
        check_vqa_type(vqa_type)
        self.run, self.dataset_source, self.scoring = run, dataset_source, scoring
        self.chunk = (test_chunk_idx, test_chunk)
        self.read_options = dict(include_modality_key=include_modality_key, file_order=file_order)
        idx = 0 if test_chunk_idx is None else int(test_chunk_idx)
        self.raw_path = run.results_path(f"omnimedvqa-{vqa_type}-raw-{run.ckpt}-{idx}_{int(test_chunk)}.csv")
        self.protocol = TwoStepVQA(vqa_type, raw_path=self.raw_path, identity={**run.identity, "suite": "test_omnimedvqa"},
                                   max_seq_len=max_seq_len, max_new_tokens=max_new_tokens,
                                   extra_columns=OMNIMEDVQA_EXTRA_COLUMNS, ranks=run.ranks)
        self.columns, self.identity, self.unit = self.protocol.columns, self.protocol.identity, self.protocol.unit
        self.items: List[EvalItem] = []
        self.data_report: Dict[str, Any] = {}

    def read(self) -> List[EvalItem]:
        """The questions of this run: read, chunked, those whose image exists (the report
        saved beside the raw file), cut to ``run.limit``."""
        items, self.data_report = read_omnimedvqa(self.dataset_source, **self.read_options)
        items, _ = select_chunk(items, *self.chunk)
        self.items = ready_items("OmniMedVQA", items, self.data_report, self.raw_path, self.run, chunk=self.chunk)
        report = self.data_report
        if self.run.ranks.rank == 0 and report.get("left_out_modality_key"):
            print(f"OmniMedVQA: {report['left_out_modality_key']} question(s) name their modality under 'modality' "
                  "instead of 'modality_type' and are left out, as the reference leaves them out "
                  "(omnimedvqa_include_modality_key=True brings them in)", flush=True)
        if self.run.ranks.rank == 0 and report.get("excluded_modalities"):
            print(f"OmniMedVQA: questions of other modalities left out: {report['excluded_modalities']}", flush=True)
        return self.items

    def make_rows(self, engine, items: Sequence[EvalItem], images: Sequence[Optional[torch.Tensor]]) -> List[Dict[str, Any]]:
        """Each question asked in the protocol's two steps (``TwoStepVQA.make_rows``)."""
        return self.protocol.make_rows(engine, items, images)

    def score(self, engine, rows: Sequence[Dict[str, str]], left_out: Dict[str, str]) -> Dict[str, Any]:
        """The raw file on disk, scored (``score_omnimedvqa``)."""
        _warn_if_other_selection(self.raw_path, rows, self.items)
        questions = {it.extra.get("question_id", ""): it.question for it in self.items}
        summary = score_omnimedvqa(engine, self.raw_path, method=self.scoring, progress=self.run.progress,
                                   image_loader=loader_by_image(self.items, self.run.image_loader), questions=questions)
        return {"raw_path": str(self.raw_path), "report": self.data_report, **summary}

    def report(self, result: Dict[str, Any]) -> None:
        """The accuracy per modality, printed."""
        if "scored_path" in result:
            print_modality_report(result["accuracy"], result["per_modality"], title=Path(result["scored_path"]).name)
            peers = result["conventions"]
            parts = [f"{name} {peers[name]['overall' if name == 'medevalkit' else 'accuracy']:.4f}"
                     for name in ("medevalkit", "huatuo") if name in peers and peers[name].get("n")]
            if parts:
                print("OmniMedVQA [peers, micro, on the free answer]: " + "; ".join(parts), flush=True)


def run_test_omnimedvqa(engine, run: SuiteRun, **settings) -> Dict[str, Any]:
    """Answer OmniMedVQA's questions and score them: ``OmniMedVQASuite(run, **settings)``, whole."""
    return run_suite(engine, OmniMedVQASuite(run, **settings), run)


def _warn_if_other_selection(raw_path: Path, rows: Sequence[Dict[str, str]], items: Sequence[EvalItem]) -> None:
    """A raw file taken as it is (e.g. the reference's, which ran every question whatever
    the chunk) may hold other questions than this run selects: say so before scoring it."""
    ids = [r.get("question_id", "") for r in rows]
    want = [it.extra.get("question_id", "") for it in items]
    if ids != want:
        log.warning("%s holds %d rows, this run selects %d questions (%d in common): it is scored as it is. "
                    "(The reference ran every question whatever test_chunk_idx said.)",
                    raw_path, len(ids), len(want), len(set(ids) & set(want)))


# ---- The scores


def score_omnimedvqa(engine, raw_path: str | Path, *, method: str = "letter",
                     image_loader: Optional[Callable[[str], torch.Tensor]] = None, progress: bool = True,
                     questions: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """Score a raw OmniMedVQA file; writes ``{raw}-{np.round(acc, 4)}.csv`` (``{raw}-loglik-...``
    for ``loglik``) and the per-modality breakdown (CSV, JSON, PNG) beside it. Resumable
    through ``{raw}-scored.partial.csv``. ``questions`` maps question ids to the
    questions the rows were made from. Returns a summary dict."""
    if method not in SCORING_METHODS:
        raise ValueError(f"vqa_scoring must be one of {list(SCORING_METHODS)}, got {method!r}")
    raw_path = Path(raw_path)
    rows = read_csv_rows(raw_path)
    if not rows:
        log.warning("%s holds no rows: nothing to score", raw_path)
        return {"accuracy": float("nan"), "per_modality": {}, "rows": 0}
    tag = "" if method == "letter" else "-loglik"
    journal = open_scoring(raw_path.with_name(f"{raw_path.stem}{tag}-scored.partial.csv"), rows, raw_path,
                           compare=("instruction", "generated", "output"))
    if method == "loglik" and image_loader is None:
        raise ValueError("loglik scoring needs an image_loader")
    score_choices(engine, rows, journal, method, progress=progress, questions=questions, image_loader=image_loader)
    scored = [{**r, **{c: v for c, v in row_cells(r, "omnimedvqa").items() if c in CHOICE_COLUMNS}} for r in journal.rows()]
    acc, per = accuracy_by_modality(scored)
    final = raw_path.with_name(f"{raw_path.stem}{tag}-{accuracy_name(acc)}.csv")
    write_csv_atomic(final, list(journal.rows()[0]) + list(CHOICE_COLUMNS), scored, bom=True)
    journal.path.unlink()
    outputs = save_modality_report(final, acc, per, method=method)
    conventions = {"medcap": {"macro": acc}, **headlines(scored, "omnimedvqa")}
    return {"accuracy": acc, "per_modality": per, "rows": len(scored), "scored_path": str(final),
            "conventions": conventions, **outputs}


def score_file(engine, raw_path: str | Path, *, method: str = "letter",
               image_loader: Optional[Callable[[str], torch.Tensor]] = None, progress: bool = True,
               questions: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """``score_omnimedvqa``, then the accuracy per modality printed."""
    summary = score_omnimedvqa(engine, raw_path, method=method, image_loader=image_loader, progress=progress,
                               questions=questions)
    if "scored_path" in summary:
        print_modality_report(summary["accuracy"], summary["per_modality"], title=Path(summary["scored_path"]).name)
    return summary


def accuracy_by_modality(rows: Sequence[Dict[str, str]], group: str = "modality_type") -> Tuple[float, Dict[str, Dict[str, float]]]:
    """Macro accuracy (mean of per-modality accuracies) and the per-modality table."""
    groups: Dict[str, List[int]] = OrderedDict()
    for r in rows:
        groups.setdefault(r.get(group, "") or "all", []).append(int(r["correct"]))
    per = {
        g: {"n": len(v), "correct": int(sum(v)), "accuracy": sum(v) / len(v)}
        for g, v in sorted(groups.items())
    }
    macro = sum(p["accuracy"] for p in per.values()) / len(per) if per else float("nan")
    return macro, per




def print_modality_report(acc: float, per: Dict[str, Dict[str, float]], title: str = "") -> None:
    lines = [f"accuracy per modality{(' (' + title + ')') if title else ''}:"]
    for g, p in per.items():
        lines.append(f"  {g:<40s} {p['accuracy']:.4f}  ({p['correct']}/{p['n']})")
    lines.append(f"  {'macro accuracy':<40s} {acc:.4f}")
    odd = [g for g in per if g in ("MR (Mag-netic Resonance Imaging)", "OCT (Optical Coherence Tomography")]
    if odd:
        lines.append("  (modality names are OmniMedVQA's own spellings, kept so that results match the data set: "
                     + ", ".join(repr(g) for g in odd) + ")")
    print("\n".join(lines), flush=True)


def modality_csv_path(scored_path: Path) -> Path:
    """The per-modality breakdown of a scored file: ``modality-{scored}.csv``, named so that a
    glob for scored files (``omnimedvqa-*-raw-CKPT-0_1-*.csv``) never picks it up."""
    return scored_path.with_name(f"{MODALITY_PREFIX}{scored_path.name}")


def save_modality_report(scored_path: Path, acc: float, per: Dict[str, Dict[str, float]], *, method: str) -> Dict[str, str]:
    """``modality-{scored}.csv`` and ``{scored}-modality.json`` / ``.png`` next to the scored file."""
    # Built by name: with_suffix would take ".4567-modality" for the suffix.
    stem = scored_path.stem + "-modality"
    csv_path = write_csv_atomic(
        modality_csv_path(scored_path),
        ["modality_type", "n", "correct", "accuracy"],
        [{"modality_type": g, "n": p["n"], "correct": p["correct"], "accuracy": f"{p['accuracy']:.6f}"} for g, p in per.items()],
    )
    json_path = scored_path.with_name(stem + ".json")
    atomic_write_text(json_path, json.dumps({"scoring": method, "macro_accuracy": acc, "per_modality": per},
                                            indent=1, ensure_ascii=False))
    png_path = scored_path.with_name(stem + ".png")
    draw_modality_chart(png_path, acc, per, title=scored_path.stem)
    return {"modality_csv": str(csv_path), "modality_json": str(json_path), "modality_png": str(png_path)}


def draw_modality_chart(path: Path, acc: float, per: Dict[str, Dict[str, float]], title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    names = list(per)
    vals = [per[n]["accuracy"] for n in names]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(names) + 2), 4.5))
    bars = ax.bar(range(len(names)), vals, color="#4C72B0")
    for b, n in zip(bars, names):
        ax.text(b.get_x() + b.get_width() / 2, b.get_height() + 0.01, f"{per[n]['accuracy']:.2f}\nn={per[n]['n']}",
                ha="center", va="bottom", fontsize=8)
    ax.axhline(acc, color="#C44E52", linestyle="--", label=f"macro accuracy {acc:.4f}")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))  # a full disk: one line
    finally:
        plt.close(fig)
    return path
