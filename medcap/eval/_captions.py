"""Captioning (``test_metrics``): the sharegpt records' captions generated and scored.

In this file, in the order of a run:

* the caption set: a sharegpt JSON file; each record's prompt is its conversation
  before the first answer, its reference caption that answer;
* ``CaptionSuite``: what ``recipes/generate.py`` calls, step by step: ``read``,
  ``make_rows``, ``score``, ``report``; ``run_test_metrics`` runs it whole;
* the metrics, through pycocoevalcap's own scorers after its PTB tokenizer:
  BLEU-1..4, METEOR, ROUGE-L and CIDEr (SPICE left out, as in the reference).
  Its tokenizer and METEOR run ``java``, checked before any generation.

Files: ``metrics-raw-{ckpt}.csv`` (image, instruction, output, generated; UTF-8 with
BOM) and ``metrics-{ckpt}.csv`` (``metric,score`` lines).
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from medcap._io import atomic_write_text, quiet_stderr_fd
from medcap.data import BadSample, parse_record, read_index
from medcap.eval._run import RAW_COLUMNS, EvalItem, SuiteRun, instruction_text, run_suite

log = logging.getLogger(__name__)

# ---- The caption set


def read_caption_set(source: str | Path) -> Tuple[List[EvalItem], Dict[str, Any]]:
    """Sharegpt records -> prompts (the conversation with its first answer emptied,
    ending at the open assistant turn) and reference captions (that answer)."""
    source = Path(source)
    index = read_index(source)
    items: List[EvalItem] = []
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


# ---- The suite


class CaptionSuite:
    """``test_metrics``: caption every sample of a sharegpt file, score the captions on rank 0."""

    unit = "img"
    columns = RAW_COLUMNS

    def __init__(self, run: SuiteRun, *, dataset_source: str, max_new_tokens: int):
        check_java()  # before hours of generation, not after
        self.run, self.dataset_source, self.max_new_tokens = run, dataset_source, int(max_new_tokens)
        self.raw_path = run.results_path(f"metrics-raw-{run.ckpt}.csv")
        self.metrics_path = run.output_dir / f"metrics-{run.ckpt}.csv"
        self.identity = {**run.identity, "suite": "test_metrics", "max_new_tokens": self.max_new_tokens}

    def read(self) -> List[EvalItem]:
        """The records, cut to ``run.limit``; those that cannot be used are counted and logged."""
        items, report = read_caption_set(self.dataset_source)
        if self.run.limit is not None:
            items = items[: self.run.limit]
        if report["bad"]:
            log.warning("%d of %d records of %s cannot be used, e.g. %s", report["bad"], report["records"],
                        self.dataset_source, report["bad_examples"][:3])
        return items

    def make_rows(self, engine, items: Sequence[EvalItem], images: Sequence[Optional[torch.Tensor]]) -> List[Dict[str, Any]]:
        """The conversation before the first answer, generated: one row per item."""
        prompts = [engine.prompt(it.messages, has_image=it.has_image) for it in items]
        texts = engine.generate_texts(prompts, images, self.max_new_tokens, [f"caption:{it.key}" for it in items])
        return [
            {"image": it.image, "instruction": instruction_text(engine.tokenizer, p), "output": it.answer, "generated": t}
            for it, p, t in zip(items, prompts, texts)
        ]

    def score(self, engine, rows: Sequence[Dict[str, str]], left_out: Dict[str, str]) -> Dict[str, Any]:
        """The seven metrics over the raw file's rows, written to ``metrics-{ckpt}.csv``."""
        if not rows:
            raise ValueError(f"no captions were generated from {self.dataset_source}: nothing to score")
        scores = caption_metrics([r["output"] for r in rows], [r["generated"] for r in rows])
        write_metrics_csv(self.metrics_path, scores)
        return {"raw_path": str(self.raw_path), "metrics_path": str(self.metrics_path), "scores": scores,
                "rows": len(rows), "left_out": left_out}

    def report(self, result: Dict[str, Any]) -> None:
        print("\n".join(f"{k}: {v:.6f}" for k, v in result["scores"].items()), flush=True)


def run_test_metrics(engine, run: SuiteRun, **settings) -> Dict[str, Any]:
    """Caption and score: ``CaptionSuite(run, **settings)``, whole."""
    return run_suite(engine, CaptionSuite(run, **settings), run)


# ---- The metrics

METRIC_NAMES = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


class JavaNotFoundError(RuntimeError):
    """pycocoevalcap's PTB tokenizer and METEOR run ``java``, which is not on PATH."""


def check_java() -> str:
    """Path of ``java``, or a :class:`JavaNotFoundError` saying what to install."""
    java = shutil.which("java")
    if java is None:
        raise JavaNotFoundError(
            "captioning metrics need Java: pycocoevalcap's PTB tokenizer and METEOR run `java`, "
            "which is not on PATH. Install a Java runtime (e.g. `sudo apt-get install default-jre-headless`, "
            "or `conda install -c conda-forge openjdk`, or run scripts/ensure_java.sh) and run again."
        )
    return java


_METEOR = None
_METEOR_LOCK = threading.Lock()


def _meteor():
    """One METEOR JVM per process: starting it (loading its paraphrase tables)
    costs seconds, and the scorer can be reused."""
    global _METEOR
    with _METEOR_LOCK:
        if _METEOR is None or _METEOR.meteor_p.poll() is not None:
            from pycocoevalcap.meteor.meteor import Meteor

            _METEOR = Meteor()
        return _METEOR


def caption_metrics(references: Sequence[str], candidates: Sequence[str]) -> Dict[str, float]:
    """Corpus scores of ``candidates`` against one reference each, in
    :data:`METRIC_NAMES` order."""
    if len(references) != len(candidates):
        raise ValueError(f"{len(references)} references but {len(candidates)} candidates")
    if not references:
        raise ValueError("no captions to score")
    check_java()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = {i: [{"caption": str(r)}] for i, r in enumerate(references)}
    res = {i: [{"caption": str(c)}] for i, c in enumerate(candidates)}
    tok = PTBTokenizer()
    with quiet_stderr_fd():  # the Java tokenizer's "PTBTokenizer tokenized N tokens" chatter
        gts_t, res_t = tok.tokenize(gts), tok.tokenize(res)
    # The PTB tokenizer drops trailing empty lines, so empty captions can go missing.
    for d in (gts_t, res_t):
        for i in range(len(references)):
            d.setdefault(i, [""])
    scores: Dict[str, float] = OrderedDict()
    for scorer, names in ((Bleu(4), METRIC_NAMES[:4]), (_meteor(), ("METEOR",)), (Rouge(), ("ROUGE_L",)), (Cider(), ("CIDEr",))):
        with contextlib.redirect_stdout(io.StringIO()), quiet_stderr_fd():  # BLEU's internals, METEOR's JVM
            value, _ = scorer.compute_score(gts_t, res_t)
        if isinstance(value, (list, tuple)):
            for n, v in zip(names, value):
                scores[n] = float(v)
        else:
            scores[names[0]] = float(value)
    return scores


def write_metrics_csv(path: str | Path, scores: Dict[str, float]) -> Path:
    """One ``metric,score`` line per metric, scores with 6 decimals (the reference's file)."""
    return atomic_write_text(Path(path), "".join(f"{k},{v:.6f}\n" for k, v in scores.items()))

