"""The evaluation suites of ``recipes/generate.py``, with the reference's file names.

=================  =============================================================
suite              files in ``output_dir``
=================  =============================================================
test_metrics       ``metrics-raw-{ckpt}.csv`` (image, instruction, output,
                   generated; UTF-8 with BOM), ``metrics-{ckpt}.csv``
                   (``metric,score`` lines)
test_vqarad        ``vqarad-{vqa_type}-raw-{ckpt}.csv`` (judged later by
                   ``tools/judge.py``)
test_omnimedvqa    ``omnimedvqa-{vqa_type}-raw-{ckpt}-{idx}_{chunk}.csv`` (+
                   options, modality_type, question_id), then the scored
                   ``...-{accuracy:.4f}.csv`` and its per-modality CSV/JSON/PNG
=================  =============================================================

A raw file that already exists is not generated again (OmniMedVQA's is
re-scored). An unfinished one (``*.partial.csv``) is continued.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from tqdm import tqdm

from medcap.data import image_transform, load_image
from medcap.eval._datasets import (
    drop_missing_images,
    read_caption_set,
    read_omnimedvqa,
    read_vqarad,
    select_chunk,
)
from medcap.eval._journal import CsvJournal, read_csv_rows
from medcap.eval._metrics import caption_metrics, check_java, write_metrics_csv
from medcap.eval._protocol import RAW_COLUMNS, check_vqa_type, load_batch_images, run_vqa
from medcap.eval._scoring import score_file
from medcap.generation import prompt_text

log = logging.getLogger(__name__)

OMNIMEDVQA_EXTRA_COLUMNS = ("option_A", "option_B", "option_C", "option_D", "modality_type", "question_id")


class ImageLoader:
    """Image file -> the model's input tensor ``[3, S, S]`` (raises ``BadSample``)."""

    def __init__(self, image_size: int):
        self.transform = image_transform(image_size)

    def __call__(self, path: str) -> torch.Tensor:
        return self.transform(load_image(path))


def _write_report(path: Path, report: Dict[str, Any]) -> None:
    path.write_text(json.dumps(report, indent=1, ensure_ascii=False, default=str), encoding="utf-8")


def run_test_metrics(
    engine,
    *,
    dataset_source: str,
    output_dir: str | Path,
    ckpt: str,
    max_new_tokens: int,
    image_loader: Callable[[str], torch.Tensor],
    limit: Optional[int] = None,
    progress: bool = True,
    on_batch: Optional[Callable[[int], None]] = None,
) -> Dict[str, Any]:
    """Caption every sample of a sharegpt file and score the captions."""
    check_java()  # before hours of generation, not after
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw_path = out / f"metrics-raw-{ckpt}.csv"
    metrics_path = out / f"metrics-{ckpt}.csv"
    if raw_path.exists():
        log.info("%s exists: generation skipped, metrics recomputed", raw_path)
        rows = read_csv_rows(raw_path)
    else:
        items, report = read_caption_set(dataset_source)
        if limit is not None:
            items = items[:limit]
        if report["bad"]:
            log.warning("%d of %d records of %s cannot be used, e.g. %s", report["bad"], report["records"],
                        dataset_source, report["bad_examples"][:3])
        journal = CsvJournal(raw_path, RAW_COLUMNS, bom=True)
        skipped_path = raw_path.with_name(raw_path.stem + ".skipped.jsonl")
        from medcap.eval._journal import JsonlCache

        skipped = JsonlCache(skipped_path)
        todo = [it for it in items if it.key not in skipped]
        done = journal.rows()
        for i, (row, it) in enumerate(zip(done, todo)):
            if row["output"] != it.reference:
                raise ValueError(f"{journal.path} does not belong to this run (row {i} differs); move it away to start over")
        if done:
            log.info("%s: resuming after %d of %d rows", journal.path, len(done), len(todo))
        bar = tqdm(total=len(todo), initial=len(done), desc=raw_path.stem, disable=not progress, unit="img")
        pending = todo[len(done) :]
        for lo in range(0, len(pending), engine.batch_size):
            batch = pending[lo : lo + engine.batch_size]
            kept, images = load_batch_images(batch, lambda it: it.image, image_loader, skipped, "sample(s)", log)
            prompts = [engine.prompt(it.messages, has_image=it.image is not None) for it in kept]
            texts = engine.generate_texts(prompts, images, max_new_tokens, [f"caption:{it.key}" for it in kept])
            journal.append(
                {"image": it.image or "", "instruction": prompt_text(engine.tokenizer, p), "output": it.reference, "generated": t}
                for it, p, t in zip(kept, prompts, texts)
            )
            bar.update(len(batch))
            if on_batch is not None:
                on_batch(len(journal))
        bar.close()
        rows = journal.rows()
        journal.finish()
    if not rows:
        raise ValueError(f"no captions were generated from {dataset_source}: nothing to score")
    scores = caption_metrics([r["output"] for r in rows], [r["generated"] for r in rows])
    write_metrics_csv(metrics_path, scores)
    print("\n".join(f"{k}: {v:.6f}" for k, v in scores.items()), flush=True)
    return {"raw_path": str(raw_path), "metrics_path": str(metrics_path), "scores": scores, "rows": len(rows)}


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
    limit: Optional[int] = None,
    progress: bool = True,
    on_batch: Optional[Callable[[int], None]] = None,
) -> Dict[str, Any]:
    """Answer VQA-RAD's closed test questions; the judge scores the file."""
    check_vqa_type(vqa_type)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw_path = out / f"vqarad-{vqa_type}-raw-{ckpt}.csv"
    if raw_path.exists():
        log.info("%s exists: generation skipped", raw_path)
        return {"raw_path": str(raw_path), "rows": len(read_csv_rows(raw_path)), "skipped_generation": True}
    items, report = read_vqarad(dataset_source)
    rows = _answer_items(
        engine, "VQA-RAD", items, report, raw_path, limit=limit, vqa_type=vqa_type, image_loader=image_loader,
        max_seq_len=max_seq_len, max_new_tokens=max_new_tokens, progress=progress, on_batch=on_batch,
    )
    print(f"wrote {raw_path} ({len(rows)} rows); judge it with: python tools/judge.py --exp eval_vqa --csv_path {raw_path}")
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
    limit: Optional[int] = None,
    progress: bool = True,
    on_batch: Optional[Callable[[int], None]] = None,
) -> Dict[str, Any]:
    """Answer OmniMedVQA's questions (one chunk when ``test_chunk_idx`` is given) and score them."""
    check_vqa_type(vqa_type)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    items, report = read_omnimedvqa(dataset_source)
    items, (idx, chunk) = select_chunk(items, test_chunk_idx, test_chunk)
    raw_path = out / f"omnimedvqa-{vqa_type}-raw-{ckpt}-{idx}_{chunk}.csv"
    if raw_path.exists():
        log.info("%s exists: generation skipped, re-scored", raw_path)
    else:
        _answer_items(
            engine, "OmniMedVQA", items, report, raw_path, limit=limit, chunk=(idx, chunk), vqa_type=vqa_type,
            image_loader=image_loader, max_seq_len=max_seq_len, max_new_tokens=max_new_tokens,
            extra_columns=OMNIMEDVQA_EXTRA_COLUMNS, progress=progress, on_batch=on_batch,
        )
    summary = score_file(engine, raw_path, method=scoring, image_loader=image_loader, progress=progress)
    return {"raw_path": str(raw_path), "report": report, **summary}


def _answer_items(engine, name: str, items, report: Dict[str, Any], raw_path: Path, *, limit: Optional[int],
                  chunk: Optional[Tuple[int, int]] = None, **run_kwargs) -> List[Dict[str, Any]]:
    """What both VQA suites do once their questions are read: leave out questions whose
    image is missing (reported), cut to ``limit``, log and save the report beside the raw
    file, then run the VQA protocol into ``raw_path``."""
    items, missing = drop_missing_images(items)
    if limit is not None:
        items = items[:limit]
    if chunk is not None:
        report.update(chunk=list(chunk), in_chunk=len(items) + len(missing))
    report.update(missing_images=len(missing), missing_image_examples=missing[:20])
    _log_report(name, report)
    _write_report(raw_path.with_name(raw_path.stem + ".report.json"), report)
    return run_vqa(engine, items, raw_path=raw_path, **run_kwargs)


def _log_report(name: str, report: Dict[str, Any]) -> None:
    parts = [f"{k}={v}" for k, v in report.items() if not k.endswith("examples") and k != "source"]
    log.info("%s: %s", name, ", ".join(parts))
    odd = {k: report[k] for k in ("modality_key_instead_of_modality_type", "no_option_C", "no_option_D", "missing_images", "malformed")
           if report.get(k)}
    if odd:
        print(f"{name}: handled records: {odd}" + (
            f" (missing images, e.g. {report['missing_image_examples'][:3]})" if report.get("missing_images") else ""), flush=True)
    if report.get("excluded_modalities"):
        print(f"{name}: questions of other modalities left out: {report['excluded_modalities']}", flush=True)
