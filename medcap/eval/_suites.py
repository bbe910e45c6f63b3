"""The evaluation suites of ``recipes/generate.py``, with the reference's file names.

=================  =============================================================
suite              files in ``output_dir`` (CSV files UTF-8 with BOM)
=================  =============================================================
test_metrics       ``metrics-raw-{ckpt}.csv`` (image, instruction, output,
                   generated), ``metrics-{ckpt}.csv`` (``metric,score`` lines)
test_vqarad        ``vqarad-{vqa_type}-raw-{ckpt}.csv`` (judged later by
                   ``tools/judge.py``)
test_omnimedvqa    ``omnimedvqa-{vqa_type}-raw-{ckpt}-{idx}_{chunk}.csv`` (+
                   options, modality_type, question_id; ``{idx}_{chunk}`` are
                   ``test_chunk_idx``/``test_chunk``, 0 and 50 when not given, as
                   in the reference), then the scored ``...-{round(acc, 4)}.csv``
                   and its per-modality CSV/JSON/PNG
=================  =============================================================

``ckpt`` is the vision checkpoint's file name up to its first dot (the
reference's ``basename.split('.')[0]``). Each suite holds a lock on its results
file while it runs, and every file runs through the one loop of ``_loop``: a
file made by the same model and settings is continued or reused, one made by
another is refused (``overwrite=True`` starts afresh), and a file the reference
wrote (no ``.run.json`` beside it) is taken as it is and re-scored.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from medcap._fs import atomic_write_text
from medcap.data import image_transform, load_image
from medcap.eval._datasets import drop_missing_images, read_caption_set, read_omnimedvqa, read_vqarad, select_chunk
from medcap.eval._loop import ONE_PROCESS, EvalItem, Ranks, results_lock, run_items
from medcap.eval._metrics import caption_metrics, check_java, write_metrics_csv
from medcap.eval._protocol import RAW_COLUMNS, check_vqa_type, instruction_text, run_vqa
from medcap.eval._scoring import score_file

log = logging.getLogger(__name__)

OMNIMEDVQA_EXTRA_COLUMNS = ("option_A", "option_B", "option_C", "option_D", "modality_type", "question_id")


class ImageLoader:
    """Image file -> the model's input tensor ``[3, S, S]`` (raises ``BadSample``)."""

    def __init__(self, image_size: int):
        self.transform = image_transform(image_size)

    def __call__(self, path: str) -> torch.Tensor:
        return self.transform(load_image(path))


def checkpoint_name(vision_checkpoint: Optional[str]) -> str:
    """``ckpt`` of the file names: the file name up to its first dot, as the reference
    (``meta_model_4.pt`` -> ``meta_model_4``); ``untrained`` without a checkpoint."""
    if not vision_checkpoint:
        return "untrained"
    return Path(str(vision_checkpoint)).name.split(".")[0]


def _write_report(path: Path, report: Dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(report, indent=1, ensure_ascii=False, default=str))


def caption_rows(max_new_tokens: int):
    """The captioning suite's step for the loop: the conversation before the first
    answer, generated; one row per item."""

    def make_rows(engine, items: Sequence[EvalItem], images: Sequence[Optional[torch.Tensor]]) -> List[Dict[str, Any]]:
        prompts = [engine.prompt(it.messages, has_image=it.has_image) for it in items]
        texts = engine.generate_texts(prompts, images, max_new_tokens, [f"caption:{it.key}" for it in items])
        return [
            {"image": it.image, "instruction": instruction_text(engine.tokenizer, p), "output": it.answer, "generated": t}
            for it, p, t in zip(items, prompts, texts)
        ]

    return make_rows


def run_test_metrics(
    engine,
    *,
    dataset_source: str,
    output_dir: str | Path,
    ckpt: str,
    max_new_tokens: int,
    image_loader: Callable[[str], torch.Tensor],
    identity: Optional[Dict[str, Any]] = None,
    overwrite: bool = False,
    limit: Optional[int] = None,
    progress: bool = True,
    on_batch: Optional[Callable[[int], None]] = None,
    ranks: Ranks = ONE_PROCESS,
) -> Dict[str, Any]:
    """Caption every sample of a sharegpt file and score the captions (on rank 0)."""
    check_java()  # before hours of generation, not after
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw_path = out / f"metrics-raw-{ckpt}.csv"
    metrics_path = out / f"metrics-{ckpt}.csv"
    items, report = read_caption_set(dataset_source)
    if limit is not None:
        items = items[:limit]
    if report["bad"]:
        log.warning("%d of %d records of %s cannot be used, e.g. %s", report["bad"], report["records"],
                    dataset_source, report["bad_examples"][:3])
    identity = {**(identity or {}), "suite": "test_metrics", "max_new_tokens": int(max_new_tokens)}
    with results_lock(raw_path, ranks):
        rows, left_out = run_items(
            engine, items, caption_rows(int(max_new_tokens)), raw_path=raw_path, columns=RAW_COLUMNS,
            identity=identity, image_loader=image_loader, overwrite=overwrite, progress=progress and ranks.rank == 0,
            on_batch=on_batch, unit="img", ranks=ranks,
        )
        if ranks.rank != 0:
            return {"raw_path": str(raw_path), "rows": len(rows), "left_out": left_out}
        if not rows:
            raise ValueError(f"no captions were generated from {dataset_source}: nothing to score")
        scores = caption_metrics([r["output"] for r in rows], [r["generated"] for r in rows])
        write_metrics_csv(metrics_path, scores)
    print("\n".join(f"{k}: {v:.6f}" for k, v in scores.items()), flush=True)
    return {"raw_path": str(raw_path), "metrics_path": str(metrics_path), "scores": scores, "rows": len(rows),
            "left_out": left_out}


def run_test_vqarad(
    engine,
    *,
    dataset_source: str,
    output_dir: str | Path,
    ckpt: str,
    vqa_type: str,
    max_seq_len: int,
    max_new_tokens: int,
    image_loader: Callable[[str], torch.Tensor],
    identity: Optional[Dict[str, Any]] = None,
    overwrite: bool = False,
    limit: Optional[int] = None,
    progress: bool = True,
    on_batch: Optional[Callable[[int], None]] = None,
    ranks: Ranks = ONE_PROCESS,
) -> Dict[str, Any]:
    """Answer VQA-RAD's closed test questions; the judge scores the file."""
    check_vqa_type(vqa_type)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw_path = out / f"vqarad-{vqa_type}-raw-{ckpt}.csv"
    items, report = read_vqarad(dataset_source)
    items = _prepare("VQA-RAD", items, report, raw_path, limit=limit, write=ranks.rank == 0)
    with results_lock(raw_path, ranks):
        rows = run_vqa(
            engine, items, vqa_type=vqa_type, raw_path=raw_path, image_loader=image_loader, max_seq_len=max_seq_len,
            max_new_tokens=max_new_tokens, identity={**(identity or {}), "suite": "test_vqarad"}, overwrite=overwrite,
            progress=progress, on_batch=on_batch, ranks=ranks,
        )
    if ranks.rank == 0:
        print(f"wrote {raw_path} ({len(rows)} rows); judge it with: python tools/judge.py --exp eval_vqa --csv-path {raw_path}")
    return {"raw_path": str(raw_path), "rows": len(rows), "report": report}


def run_test_omnimedvqa(
    engine,
    *,
    dataset_source: str,
    output_dir: str | Path,
    ckpt: str,
    vqa_type: str,
    max_seq_len: int,
    max_new_tokens: int,
    image_loader: Callable[[str], torch.Tensor],
    test_chunk_idx: Optional[int] = None,
    test_chunk: int = 50,
    scoring: str = "letter",
    include_modality_key: bool = False,
    file_order: str = "sorted",
    identity: Optional[Dict[str, Any]] = None,
    overwrite: bool = False,
    limit: Optional[int] = None,
    progress: bool = True,
    on_batch: Optional[Callable[[int], None]] = None,
    ranks: Ranks = ONE_PROCESS,
) -> Dict[str, Any]:
    """Answer OmniMedVQA's questions (one chunk when ``test_chunk_idx`` is given) and score
    them (scoring on rank 0, once every rank's answers are in the raw file)."""
    check_vqa_type(vqa_type)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    items, report = read_omnimedvqa(dataset_source, include_modality_key=include_modality_key, file_order=file_order)
    items, (idx, chunk) = select_chunk(items, test_chunk_idx, test_chunk)
    raw_path = out / f"omnimedvqa-{vqa_type}-raw-{ckpt}-{idx}_{chunk}.csv"
    items = _prepare("OmniMedVQA", items, report, raw_path, limit=limit, chunk=(test_chunk_idx, test_chunk),
                     write=ranks.rank == 0)
    with results_lock(raw_path, ranks):
        rows = run_vqa(
            engine, items, vqa_type=vqa_type, raw_path=raw_path, image_loader=image_loader, max_seq_len=max_seq_len,
            max_new_tokens=max_new_tokens, extra_columns=OMNIMEDVQA_EXTRA_COLUMNS,
            identity={**(identity or {}), "suite": "test_omnimedvqa"}, overwrite=overwrite, progress=progress,
            on_batch=on_batch, ranks=ranks,
        )
        if ranks.rank != 0:
            return {"raw_path": str(raw_path), "report": report, "rows": len(rows)}
        _warn_if_other_selection(raw_path, rows, items)
        questions = {it.extra.get("question_id", ""): it.question for it in items}
        summary = score_file(engine, raw_path, method=scoring, image_loader=_by_image(items, image_loader),
                             progress=progress, questions=questions)
    return {"raw_path": str(raw_path), "report": report, **summary}


def _by_image(items: Sequence[EvalItem], image_loader: Callable[[str], torch.Tensor]) -> Callable[[str], torch.Tensor]:
    """Rows name images by the data set's own value; load the file it resolves to."""
    files = {it.image: it.file for it in items}
    return lambda image: image_loader(files.get(image) or image)


def _warn_if_other_selection(raw_path: Path, rows: Sequence[Dict[str, str]], items: Sequence[EvalItem]) -> None:
    """A raw file taken as it is (e.g. the reference's, which ran every question whatever
    the chunk) may hold other questions than this run selects: say so before scoring it."""
    ids = [r.get("question_id", "") for r in rows]
    want = [it.extra.get("question_id", "") for it in items]
    if ids != want:
        log.warning("%s holds %d rows, this run selects %d questions (%d in common): it is scored as it is. "
                    "(The reference ran every question whatever test_chunk_idx said.)",
                    raw_path, len(ids), len(want), len(set(ids) & set(want)))


def _prepare(name: str, items: List[EvalItem], report: Dict[str, Any], raw_path: Path, *, limit: Optional[int],
             chunk: Optional[tuple] = None, write: bool = True) -> List[EvalItem]:
    """What both VQA suites do once their questions are read: leave out questions whose
    image is missing (reported), cut to ``limit``, log and save the report beside the raw file."""
    items, missing = drop_missing_images(items)
    if limit is not None:
        items = items[:limit]
    if chunk is not None and chunk[0] is not None:
        report.update(chunk=list(chunk), in_chunk=len(items) + len(missing))
    report.update(missing_images=len(missing), missing_image_examples=missing[:20])
    if write:  # one process reports (rank 0)
        _log_report(name, report)
        _write_report(raw_path.with_name(raw_path.stem + ".report.json"), report)
    return items


def _log_report(name: str, report: Dict[str, Any]) -> None:
    parts = [f"{k}={v}" for k, v in report.items() if not k.endswith("examples") and k != "source"]
    log.info("%s: %s", name, ", ".join(parts))
    odd = {k: report[k] for k in ("left_out_modality_key", "no_option_C", "no_option_D", "missing_images", "malformed")
           if report.get(k)}
    if odd:
        print(f"{name}: handled records: {odd}" + (
            f" (missing images, e.g. {report['missing_image_examples'][:3]})" if report.get("missing_images") else ""), flush=True)
    if report.get("left_out_modality_key"):
        print(f"{name}: {report['left_out_modality_key']} question(s) name their modality under 'modality' instead of "
              "'modality_type' and are left out, as the reference leaves them out "
              "(omnimedvqa_include_modality_key=True brings them in)", flush=True)
    if report.get("excluded_modalities"):
        print(f"{name}: questions of other modalities left out: {report['excluded_modalities']}", flush=True)
