"""OmniMedVQA end to end, our engine and its peers side by side: the same model, prompts
and questions, interleaved round by round in one run.

Every engine runs the same suite, ``run_test_omnimedvqa`` (read, shuffle, ``no_cond_desc``:
a description per image, then the answer, then the letter-mapping chat, the per-modality
report and the files); only the engine differs (see ``_peers`` and ``_vllm_cell``):

* ``ours``: ``GenerationEngine``: continuous batching (a finished row's slot refilled at once);
* ``static``: the same engine with ``continuous=False`` (a batch runs to its longest row);
* ``hf_static``: ``LlamaForCausalLM.generate``, ``batch`` left-padded prompts at a time;
* ``hf_cb``: transformers' own continuous batching;
* ``vllm``: medcap's vLLM backend (``VllmEngine``: vLLM's server decodes our prompt
  embeddings; one server per model, see ``_vllm_cell``) where ``.venv-vllm`` exists;
* ``reference``: the reference's algorithm (one question at a time, no cache), on the
  first ``--ref-limit`` questions, once per model and workload.

Cells: models (``tiny``: width 256, 4 layers; ``d1024``: width 1024, 2 layers, where the
matrix products dominate; both a 32k vocabulary, grouped KV heads, 50 image tokens, fp32,
random weights) x workloads (``measured``: rows stop where the trained demo model stopped,
``bench/workloads/demo_stop_lengths.json``; ``budget``: every row runs to its budget) x
batch sizes (1, 8, 16, 32, 64; batch 1 answers the first ``--b1-questions``). Each engine
is handed ``8 x batch`` rows per call. Figures per engine: questions/s end to end (files
included), and generation alone: tokens/s and rows/s over the time spent inside the
engine; decode passes where counted. ``outputs_match``: every engine's answers, letter
replies, predictions and scores equal ours, row for row. The last stdout line is one JSON
object (see bench/README.md).

    python bench/eval_omnimedvqa.py            # every cell (about 25 min on an idle 2-core machine)
    python bench/eval_omnimedvqa.py --models tiny --batches 16 --workloads measured
    python bench/eval_omnimedvqa.py --quick    # seconds; checks that it runs
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from _common import (LLAMA3_1_8B, LlamaDims, base_parser, bench_tokenizer, build_model, emit, log, machine_info,
                     median, real_sizes, setup, sync, to_hf_llama)
from _goals import GOAL_BATCH, eval_goals
from _vllm_cell import set_batch
from _workloads import StopAtLengths, StopLengths, WORKLOADS, load_stop_lengths

MODELS = {
    "tiny": LlamaDims(vocab_size=32_000, embed_dim=256, num_layers=4, num_heads=4, num_kv_heads=1, intermediate_dim=896),
    "d1024": LlamaDims(vocab_size=32_000, embed_dim=1024, num_layers=2, num_heads=16, num_kv_heads=4,
                       intermediate_dim=3584),
}
QUICK = LlamaDims(vocab_size=4096, embed_dim=128, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_dim=256)
DEFAULT_GRID = "tiny:measured:16;tiny:budget:16;d1024:measured:16;tiny:measured:1,8,32,64;d1024:measured:1,64"
QUICK_GRID = "quick:measured:1,3;quick:budget:3"
ENGINES = ("ours", "static", "hf_static", "hf_cb", "vllm", "reference")
COMPARED_RAW = ("image", "instruction", "output", "generated")
COMPARED_SCORED = ("predict_generated", "predict", "correct")


def parse(argv):
    p = base_parser("OmniMedVQA end to end: our engine and its peers, side by side")
    p.add_argument("--grid", default=DEFAULT_GRID,
                   help=f"the cells, MODEL:WORKLOAD:BATCH,BATCH;... (models {list(MODELS)}, workloads "
                        f"{list(WORKLOADS)}; default {DEFAULT_GRID})")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, of {list(ENGINES)}")
    p.add_argument("--per-modality", type=int, default=None, help="questions per modality (8 modalities; default 8)")
    p.add_argument("--b1-questions", type=int, default=16, help="questions answered at batch 1 (default 16)")
    p.add_argument("--ref-limit", type=int, default=4, help="questions the reference answers (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=40,
                   help="description budget (answers min(50, this), letter replies 20); default 40, the demo's")
    p.add_argument("--max-seq-len", type=int, default=500, help="dataset_max_seq_len of the reference's docs")
    p.add_argument("--vqa-type", default="no_cond_desc")
    p.add_argument("--limit", type=int, default=None, help="run only the first N questions (after the shuffle)")
    p.add_argument("--time-limit", type=float, default=3600, help="cells not started after this many seconds are "
                   "reported as not run (default 3600)")
    p.add_argument("--vllm-python", default=None, help="the interpreter that has vLLM (default .venv-vllm/bin/python)")
    p.add_argument("--batch", type=int, default=None, help="one batch size for every cell of the grid")
    p.add_argument("--side-reps", type=int, default=1,
                   help=f"timed runs of the cells off the goals' batch ({GOAL_BATCH}; those run --reps); default 1")
    args = p.parse_args(argv)
    args.engines = args.engines.split(",")
    if args.quick:
        args.per_modality, args.max_new_tokens, args.b1_questions, args.ref_limit = 1, 6, 2, 1
        args.grid = QUICK_GRID if args.grid == DEFAULT_GRID else args.grid
    try:
        args.grid = [(m, w, [args.batch] if args.batch else [int(b) for b in bs.split(",")])
                     for m, w, bs in (cell.split(":") for cell in args.grid.split(";"))]
    except ValueError:
        p.error(f"--grid {args.grid!r}: write MODEL:WORKLOAD:BATCH,BATCH;...")
    args.models = list(dict.fromkeys(m for m, _, _ in args.grid))
    args.workloads = list(dict.fromkeys(w for _, w, _ in args.grid))
    args.batches = sorted({b for _, _, bs in args.grid for b in bs})
    bad = [x for x in args.engines if x not in ENGINES] + [x for x in args.workloads if x not in WORKLOADS]
    bad += [x for x in args.models if x not in MODELS and x != "quick"]
    if bad:
        p.error(f"unknown {bad}")
    args.per_modality = args.per_modality or 8
    args.reps = args.reps or (1 if args.quick else 2)
    return args


def settings(args) -> Dict:
    """Everything the figures depend on (the JSON's ``settings``; the docs test compares
    them with the defaults)."""
    return {
        "models": {m: (QUICK if m == "quick" else MODELS[m]).as_dict() for m in args.models},
        "grid": [[m, w, bs] for m, w, bs in args.grid], "batches": args.batches, "workloads": args.workloads,
        "engines": args.engines, "measured_means": StopLengths(load_stop_lengths()).means(),
        "questions": 8 * args.per_modality, "b1_questions": args.b1_questions, "ref_limit": args.ref_limit,
        "rows_per_call": "8 x batch", "num_image_tokens": 8 if args.quick else 50, "vqa_type": args.vqa_type,
        "scoring": "letter", "max_new_tokens": args.max_new_tokens,
        "answer_max_new_tokens": min(50, args.max_new_tokens), "letter_max_new_tokens": 20,
        "max_seq_len": args.max_seq_len, "reps": args.reps, "side_reps": args.side_reps, "greedy": True,
        "device": args.device,
        "seed": args.seed,
    }


# ---- one run of the suite


def run_suite(engine, root: Path, out_dir: Path, args, image_size: int, limit: Optional[int]) -> Dict:
    """One full ``test_omnimedvqa`` run into a fresh ``out_dir``; returns rows, timing, work."""
    from medcap.eval import ImageLoader, SuiteRun, read_csv_rows, run_test_omnimedvqa

    if out_dir.exists():
        shutil.rmtree(out_dir)
    engine.reset()
    sync(engine.device)
    t0 = time.perf_counter()
    summary = run_test_omnimedvqa(
        engine, SuiteRun(output_dir=out_dir, ckpt="bench", image_loader=ImageLoader(image_size), limit=limit,
                         progress=False),
        dataset_source=str(root), vqa_type=args.vqa_type, max_seq_len=args.max_seq_len,
        max_new_tokens=args.max_new_tokens, scoring="letter")
    sync(engine.device)
    elapsed = time.perf_counter() - t0
    raw, scored = read_csv_rows(summary["raw_path"]), read_csv_rows(summary["scored_path"])
    shutil.rmtree(out_dir, ignore_errors=True)
    return {"seconds": elapsed, "generate_s": engine.generate_s, "rows": engine.rows, "tokens": engine.tokens,
            "questions": len(raw), "raw": raw, "scored": scored, "accuracy": summary["accuracy"],
            "work": dict(engine.stats)}


def mismatches(base: Dict, other: Dict) -> List[Dict]:
    """Rows where ``other`` differs from ``base`` in a compared column (shared rows only)."""
    out = []
    for kind, cols in (("raw", COMPARED_RAW), ("scored", COMPARED_SCORED)):
        for i, (x, y) in enumerate(zip(other[kind], base[kind])):
            diff = [c for c in cols if x.get(c) != y.get(c)]
            if diff:
                out.append({"file": kind, "row": i, "columns": diff})
    return out


def figures(runs: List[Dict]) -> Dict:
    gen = [r["generate_s"] for r in runs]
    return {
        "questions": runs[0]["questions"],
        "questions_per_s": median([r["questions"] / r["seconds"] for r in runs]),
        "generation_tokens_per_s": median([r["tokens"] / max(r["generate_s"], 1e-9) for r in runs]),
        "generation_rows_per_s": median([r["rows"] / max(r["generate_s"], 1e-9) for r in runs]),
        "generation_share": round(median(gen) / median([r["seconds"] for r in runs]), 3),
        "times_s": [round(r["seconds"], 3) for r in runs], "generated_tokens": runs[0]["tokens"],
        "rows": runs[0]["rows"], "accuracy": runs[0]["accuracy"],
        **{k: v for k, v in runs[0]["work"].items() if k in ("decode_passes", "prefill_positions", "engine_s")},
    }


# ---- the engines of one cell


class Cell:
    """The engines of one (model, workload, batch) cell, made on demand and closed after."""

    def __init__(self, ctx, names: List[str], batch: int, lengths):
        from _peers import HFContinuousEngine, HFStaticEngine
        from medcap.generation import GenerationEngine

        self.closers, self.engines, self.not_run = [], {}, {}
        m, tok, chunk = ctx["model"], ctx["tokenizer"], 8 * batch
        for name in names:
            if name == "ours":
                e = GenerationEngine(m, tok, batch_size=batch, chunk_size=chunk)
            elif name == "static":
                e = GenerationEngine(m, tok, batch_size=batch, continuous=False, chunk_size=chunk)
            elif name == "hf_static":
                e = HFStaticEngine(m, tok, ctx["hf"](), batch_size=batch, chunk_size=chunk)
            elif name == "hf_cb":
                e = HFContinuousEngine(m, tok, ctx["hf"](), batch_size=batch, chunk_size=chunk, max_rows=chunk)
                self.closers.append(e.close)
            elif name == "vllm":
                if ctx["vllm"] is None:
                    self.not_run[name] = ctx["vllm_why"]
                    continue
                e = ctx["vllm"]
                set_batch(e, batch, chunk)
            else:
                continue
            self.engines[name] = StopAtLengths(e, lengths)

    def close(self) -> None:
        for c in self.closers:
            c()


def run_cell(ctx, args, model_name: str, workload: str, batch: int) -> Dict:
    lengths = StopLengths(ctx["stop_lengths"], seed=args.seed) if workload == "measured" else None
    names = [n for n in args.engines if n != "reference"]
    limit = args.b1_questions if batch == 1 else args.limit
    cell = Cell(ctx, names, batch, lengths)
    try:
        for e in cell.engines.values():  # warm-up, not timed: allocators, HF's manager, vLLM's compile
            run_suite(e, ctx["root"], ctx["tmp"] / "warm", args, ctx["image_size"], 2)
        runs: Dict[str, List[Dict]] = {n: [] for n in cell.engines}
        reps = args.reps if batch == GOAL_BATCH else args.side_reps
        for r in range(reps):
            order = list(cell.engines)[r % len(cell.engines):] + list(cell.engines)[: r % len(cell.engines)]
            for name in order:
                runs[name].append(run_suite(cell.engines[name], ctx["root"], ctx["tmp"] / name, args,
                                            ctx["image_size"], limit))
                log(f"{model_name} {workload} b{batch} {name}: {runs[name][-1]['questions'] / runs[name][-1]['seconds']:.3f} q/s")
    finally:
        cell.close()
    base = runs.get("ours", next(iter(runs.values())))[0]
    ctx.setdefault("ours_rows", {}).setdefault(workload, base)  # the reference is checked against these
    diffs = {n: mismatches(base, rs[0]) for n, rs in runs.items()}
    return {"model": model_name, "workload": workload, "batch": batch,
            "figures": {n: figures(rs) for n, rs in runs.items()}, "not_run": cell.not_run,
            "outputs_match": {n: not d for n, d in diffs.items()},
            "output_mismatches": {n: d[:5] for n, d in diffs.items() if d}}


def run_reference(ctx, args, workload: str) -> Dict:
    from _peers import reference_engine

    lengths = StopLengths(ctx["stop_lengths"], seed=args.seed) if workload == "measured" else None
    e = StopAtLengths(reference_engine(ctx["model"], ctx["tokenizer"]), lengths)
    runs = [run_suite(e, ctx["root"], ctx["tmp"] / "ref", args, ctx["image_size"], args.ref_limit)]
    ours = ctx.get("ours_rows", {}).get(workload)
    return {**figures(runs), "outputs_match": None if ours is None else not mismatches(ours, runs[0])}


# ---- main


def model_context(args, name: str, tmp: Path, root: Path, device, dtype) -> Dict:
    from _vllm_cell import start_vllm, vllm_python

    dims = QUICK if name == "quick" else (LLAMA3_1_8B if real_sizes(args) else MODELS[name])
    tokenizer = bench_tokenizer(tmp / f"tok-{name}", dims.vocab_size)
    model = build_model(dims, num_image_tokens=8 if args.quick else 50, device=device, dtype=dtype,
                        seed=args.seed, real_vision=real_sizes(args), max_seq_len=4096).eval()
    ctx = {"model": model, "tokenizer": tokenizer, "root": root, "tmp": tmp, "dims": dims,
           "image_size": model.vision.visual.image_size, "stop_lengths": load_stop_lengths(),
           "hf": lambda: to_hf_llama(model, dims, device, dtype, max_seq_len=131072), "vllm": None}
    py, ctx["vllm_why"] = vllm_python(args.vllm_python)
    if py and "vllm" in args.engines:
        folder = tmp / f"hf-{name}"
        ctx["hf"]().save_pretrained(folder)
        ctx["vllm"], ctx["vllm_start_s"], why = start_vllm(model, tokenizer, folder, py, max_batch=max(b for m, _, bs in args.grid if m == name for b in bs),
                                                           threads=torch.get_num_threads(), max_model_len=1024)
        ctx["vllm_why"] = why or ctx["vllm_why"]
    return ctx


def close_context(ctx: Dict) -> None:
    if ctx["vllm"] is not None:
        ctx["vllm"].close()
        ctx["vllm"] = None


def main(argv: Optional[List[str]] = None) -> Dict:
    args = parse(argv)
    device, dtype = setup(args)
    logging.getLogger("medcap").setLevel(logging.WARNING)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from medcap.testing import make_omnimedvqa_layout

    tmp = Path(tempfile.mkdtemp(prefix="medcap-bench-eval-"))
    layout = make_omnimedvqa_layout(tmp / "data", per_modality=args.per_modality, seed=args.seed, quirks=False,
                                    image_size=40)
    t0, cells, reference, skipped, ctxs = time.perf_counter(), [], {}, [], {}
    left = {m: sum(1 for x, _, _ in args.grid if x == m) for m in args.models}  # grid entries to come per model
    try:
        for name, workload, batches in args.grid:  # in the grid's order: the goal cells first
            for batch in batches:
                if time.perf_counter() - t0 > args.time_limit:
                    skipped.append(f"{name} {workload} b{batch}")
                    continue
                if name not in ctxs:
                    ctxs[name] = model_context(args, name, tmp, Path(layout["root"]), device, dtype)
                cells.append(run_cell(ctxs[name], args, name, workload, batch))
            if "reference" in args.engines and name in ctxs and workload not in reference.get(name, {}):
                reference.setdefault(name, {})[workload] = run_reference(ctxs[name], args, workload)
            left[name] -= 1
            if not left[name] and name in ctxs:  # this model's last entry: its vLLM server stops
                close_context(ctxs.pop(name))
    finally:
        for ctx in ctxs.values():
            close_context(ctx)
        shutil.rmtree(tmp, ignore_errors=True)
    result = assemble(args, device, cells, reference, skipped, time.perf_counter() - t0)
    emit(result)
    return result


def assemble(args, device, cells: List[Dict], reference: Dict, skipped: List[str], seconds: float) -> Dict:
    """The JSON: cells, the reference's figures (its rows checked against ours), goals."""
    result = {"bench": "eval_omnimedvqa", "device": str(device), "machine": machine_info(device),
              "settings": settings(args), "seconds": round(seconds, 1), "cells": cells, "reference": reference,
              "not_run": skipped}
    result["outputs_match"] = all(all(c["outputs_match"].values()) for c in cells) and all(
        r["outputs_match"] is not False for v in reference.values() for r in v.values())
    result.update(eval_goals(result))
    return result


if __name__ == "__main__":
    main()
