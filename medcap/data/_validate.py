"""``medcap validate-data``: check every record of a dataset before a long run.

Every record goes through exactly the code a training run uses (parse, tokenize,
truncate, load and transform the image), in parallel DataLoader workers, so "good"
here means "a training run will use it" and each bad row comes with the reason a run
would log. In order: ``_Checks`` (``dataset.check`` as a map-style dataset, for the
workers), ``byte_level_tokenizer`` (the stand-in without ``--tokenizer``),
``validate_data`` and its steps (check every record, with progress through
``medcap._io.progress``; the report), ``format_report``, then the command line.

Exit status: 0 when the check ran, whatever it found (bad rows are the report,
not a failure of the command; ``--fail-on-bad`` turns them into exit status 3);
1 when the dataset file cannot be read at all; 2 for wrong arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

from medcap._io import progress as progress_bar
from medcap.data._bad_samples import reason_kind
from medcap.data._image import DEFAULT_MAX_IMAGE_PIXELS

# numpy, torch and the dataset are imported where used, so `--help` answers at once.
if TYPE_CHECKING:
    from medcap.data._dataset import ImageChatDataset

BYTE_FALLBACK_NOTE = (
    "byte-level fallback (no --tokenizer given): lengths count UTF-8 bytes plus special tokens, "
    "about 3-4x what the Llama 3 tokenizer gives for English text; pass --tokenizer for real lengths"
)


# ---- The check

class _Checks:
    """``dataset.check`` as a map-style dataset (``__len__`` and ``__getitem__`` are all a
    DataLoader needs), so DataLoader workers do the work."""

    def __init__(self, ds: ImageChatDataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        try:
            return self.ds.check(i)
        except Exception as e:  # validation must report, never die, whatever a record does
            return {"index": i, "ok": False, "reason": f"unexpected error: {type(e).__name__}: {e}"}


def _as_list(batch):
    return batch


def byte_level_tokenizer():
    """A Llama 3 tokenizer over the 256 bytes (no merges), made in a temporary folder."""
    from medcap.models import llama3_tokenizer, write_tiktoken_tokenizer

    d = tempfile.mkdtemp(prefix="medcap-bytetok-")
    paths = write_tiktoken_tokenizer(d)
    return llama3_tokenizer(str(paths["path"]), str(paths["special_tokens_path"]))


def _stats(lengths: List[int]) -> Optional[Dict[str, float]]:
    if not lengths:
        return None
    import numpy as np

    a = np.asarray(lengths, dtype=np.float64)
    return {
        "min": int(a.min()),
        "mean": round(float(a.mean()), 2),
        "median": float(np.median(a)),
        "p95": float(np.percentile(a, 95)),
        "max": int(a.max()),
    }


def validate_data(
    path,
    tokenizer=None,
    *,
    num_image_tokens: int = 50,
    image_size: int = 224,
    max_seq_len: Optional[int] = None,
    workers: Optional[int] = None,
    image_dir: Optional[str] = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    train_on_input: bool = False,
    progress: bool = True,
) -> Dict[str, Any]:
    """Check every record of ``path``; returns the report (see ``validate_main --json``).

    ``tokenizer=None`` uses a byte-level stand-in (clearly labelled in the report's
    ``tokenizer`` field): every check still runs, lengths are upper bounds.
    """
    from medcap.data._dataset import ImageChatDataset

    tokenizer_note = "given"
    if tokenizer is None:
        tokenizer = byte_level_tokenizer()
        tokenizer_note = BYTE_FALLBACK_NOTE
    ds = ImageChatDataset(
        tokenizer,
        source=path,
        num_image_tokens=num_image_tokens,
        image_size=image_size,
        max_seq_len=max_seq_len,
        train_on_input=train_on_input,
        image_dir=image_dir,
        bad_samples="raise",
        max_image_pixels=max_image_pixels,
    )
    results = _check_every_record(ds, workers, f"validate {Path(str(path)).name}", progress)
    report = _report(path, ds, results)
    report.update(num_image_tokens=num_image_tokens, image_size=image_size, tokenizer=tokenizer_note)
    return report


def _check_every_record(ds: ImageChatDataset, workers: Optional[int], desc: str, show: bool) -> List[Dict[str, Any]]:
    """``ds.check(i)`` for every record, in DataLoader workers, reported through ``medcap._io.progress``."""
    import torch
    from torch.utils.data import DataLoader

    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    n = len(ds)
    workers = max(0, min(int(workers), n))
    loader = DataLoader(
        _Checks(ds),
        batch_size=max(1, min(64, n // max(1, workers * 4) or 1)),
        shuffle=False,
        num_workers=workers,
        collate_fn=_as_list,
    )
    results: List[Dict[str, Any]] = []
    # Workers decode images; keep the parent from competing for the cores with torch threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with progress_bar(n, desc, "rec", enabled=show) as bar:
            for chunk in loader:
                results.extend(chunk)
                bar.update(len(chunk))
    finally:
        torch.set_num_threads(threads)
    return results


def _report(path, ds: ImageChatDataset, results: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The counts of a check, its bad rows (with where they sit) and the length statistics."""
    good = [r for r in results if r["ok"]]
    bad = [{"index": r["index"], "reason": r["reason"], "where": ds.origin(r["index"])} for r in results if not r["ok"]]
    lengths = [r["length"] for r in good]
    return {
        "path": str(path),
        "total": len(ds),
        "good": len(good),
        "bad": bad,
        "bad_by_kind": dict(Counter(reason_kind(b["reason"]) for b in bad).most_common()),
        "with_image": sum(1 for r in good if r["has_image"]),
        "text_only": sum(1 for r in good if not r["has_image"]),
        "max_seq_len": ds.max_seq_len,
        "truncated": sum(1 for r in good if r["truncated"]),
        "lengths": _stats(lengths),
    }


# ---- The command line

def format_report(rep: Dict[str, Any], max_bad: int = 20) -> str:
    lines = [
        f"{rep['path']}: {rep['total']} records, {rep['good']} good "
        f"({rep['with_image']} with image, {rep['text_only']} text-only), {len(rep['bad'])} bad",
    ]
    if rep["bad_by_kind"]:
        lines.append("bad by kind: " + ", ".join(f"{c} {k}" for k, c in rep["bad_by_kind"].items()))
    for b in rep["bad"][:max_bad]:
        lines.append(f"  #{b['index']} ({b['where']}): {b['reason']}")
    if len(rep["bad"]) > max_bad:
        lines.append(f"  ... and {len(rep['bad']) - max_bad} more (use --json for all)")
    s = rep["lengths"]
    if s:
        lines.append(
            f"tokens per sample (before truncation): min {s['min']}, mean {s['mean']}, median {s['median']:g}, "
            f"p95 {s['p95']:g}, max {s['max']}"
        )
    if rep["max_seq_len"]:
        lines.append(f"would be truncated at max_seq_len={rep['max_seq_len']}: {rep['truncated']}")
    if rep["tokenizer"] != "given":
        lines.append("note: " + rep["tokenizer"])
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medcap validate-data",
        description="Check a sharegpt image-chat dataset: bad rows with reasons, token lengths, truncation. "
        "Exit status 0 when the check ran (even with bad rows), 1 when the file cannot be read, "
        "3 with --fail-on-bad and bad rows.",
    )
    p.add_argument("file", help="dataset: .json list, .jsonl, or a folder of them")
    p.add_argument("--tokenizer", help="tiktoken tokenizer.model (Llama 3: <model>/original/tokenizer.model); "
                   "without it a byte-level stand-in gives upper-bound lengths")
    p.add_argument("--special-tokens", help="special tokens JSON (HF tokenizer.json layout) for small tokenizers")
    p.add_argument("--max-seq-len", type=int, default=None, help="count samples longer than this (truncated in training)")
    p.add_argument("--num-image-tokens", type=int, default=50)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--image-dir", default=None, help="where relative image paths are looked for")
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS)
    p.add_argument("--train-on-input", action="store_true")
    p.add_argument("--workers", type=int, default=None, help="parallel worker processes (default: min(8, CPUs))")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object on stdout")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--fail-on-bad", action="store_true", help="exit with status 3 when any record is bad")
    return p


def validate_main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``medcap validate-data``; returns the exit status."""
    args = _parser().parse_args(argv)
    tokenizer = None
    try:
        if args.tokenizer:
            from medcap.models import llama3_tokenizer

            tokenizer = llama3_tokenizer(args.tokenizer, special_tokens_path=args.special_tokens)
        rep = validate_data(
            args.file,
            tokenizer,
            num_image_tokens=args.num_image_tokens,
            image_size=args.image_size,
            max_seq_len=args.max_seq_len,
            workers=args.workers,
            image_dir=args.image_dir,
            max_image_pixels=args.max_image_pixels,
            train_on_input=args.train_on_input,
            progress=not args.no_progress,
        )
    except (FileNotFoundError, ValueError, TypeError) as e:
        if args.json:
            print(json.dumps({"path": args.file, "error": str(e)}))
        print(f"medcap validate-data: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rep, ensure_ascii=False))
    else:
        print(format_report(rep))
    return 3 if (args.fail_on_bad and rep["bad"]) else 0
