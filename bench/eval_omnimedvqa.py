"""OmniMedVQA evaluation end to end: ours (batched, KV-cached engine through
``medcap.eval``) against the reference's protocol run one question at a time
without a cache.

A small data set in OmniMedVQA's layout is made on the spot
(``medcap.testing.make_omnimedvqa_layout``: synthetic images, the 8 kept modalities,
2-4 options). Both sides run the same suite, ``run_test_omnimedvqa``: read,
shuffle, the two-step protocol (``vqa_type``, default ``no_cond_desc``: a
description per image, then the answer), the letter-mapping scoring step (a
second, text-only generation per question), the per-modality report. Only the
engine differs:

* ``ours``: ``GenerationEngine(batch_size=--batch)``: continuously batched
  prompts (a finished row's slot refilled at once), image prefill, KV cache;
* ``static``: the same engine with ``continuous=False`` (a batch runs until its
  longest row is done), at the same batch size;
* ``reference``: ``GenerationEngine(batch_size=1, use_cache=False)``: the
  reference's algorithm (one question at a time; the whole sequence, image
  included, recomputed for every new token; only the last position projected
  onto the vocabulary, which is cheaper than torchtune's all-position
  projection the reference ran: the ratio is a lower bound).

The model has random weights (CPU: a small Llama-3.1-architecture decoder with a
32k vocabulary, fp32; CUDA: Llama-3.1-8B sizes with BiomedCLIP's tower, bf16),
so answers are gibberish and rarely stop on their own. ``--lengths realistic``
(the default) makes every row stop at a length drawn for its key from
``_common.STOP_LENGTHS`` (descriptions log-normal 10-200 tokens, answers 1-50,
letter replies 1-3), the same for every engine; ``--lengths budget`` lets every
generation run to its budget, the worst case. Figures: questions per second over
the whole suite (generation + scoring + files), and for ours and static the
decode forward passes and idle slot-steps. The answers, letter replies,
predictions and accuracy of all runs must be identical (greedy).

    python bench/eval_omnimedvqa.py            # CPU, ~4 min on 2 cores (128 questions)
    python bench/eval_omnimedvqa.py --quick
    python bench/eval_omnimedvqa.py --device cuda
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from _common import (
    LLAMA3_1_8B,
    LlamaDims,
    base_parser,
    bench_tokenizer,
    build_model,
    emit,
    log,
    machine_info,
    median,
    real_sizes,
    setup,
    sync,
    STOP_LENGTHS,
    StopAtDrawnLengths,
)

CPU_DIMS = LlamaDims(vocab_size=32_000, embed_dim=192, num_layers=4, num_heads=3, num_kv_heads=1, intermediate_dim=672)
QUICK_DIMS = LlamaDims(vocab_size=4096, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=1, intermediate_dim=224)

COMPARED_RAW = ("image", "instruction", "output", "generated")
COMPARED_SCORED = ("predict_generated", "predict", "correct")


def run_suite(engine, root: Path, out_dir: Path, args, image_size: int) -> Dict:
    """One full ``test_omnimedvqa`` run into a fresh ``out_dir``; returns the rows and timing."""
    from medcap.eval import ImageLoader, SuiteRun, read_csv_rows, run_test_omnimedvqa

    if out_dir.exists():
        shutil.rmtree(out_dir)
    device = engine.device
    sync(device)
    t0 = time.perf_counter()
    summary = run_test_omnimedvqa(
        engine,
        SuiteRun(output_dir=out_dir, ckpt="bench", image_loader=ImageLoader(image_size), limit=args.limit, progress=False),
        dataset_source=str(root),
        vqa_type=args.vqa_type,
        max_seq_len=args.max_seq_len,
        max_new_tokens=args.max_new_tokens,
        scoring="letter",
    )
    sync(device)
    elapsed = time.perf_counter() - t0
    return {
        "seconds": elapsed,
        "raw": read_csv_rows(summary["raw_path"]),
        "scored": read_csv_rows(summary["scored_path"]),
        "accuracy": summary["accuracy"],
    }


def main(argv: Optional[List[str]] = None) -> Dict:
    p = base_parser("OmniMedVQA end to end: ours vs the reference's one-at-a-time protocol")
    p.add_argument("--per-modality", type=int, default=None, help="questions per modality (8 modalities; default 16)")
    p.add_argument("--batch", type=int, default=16, help="our engine's batch size (continuous and static)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="description budget (answers: min(50, this); letter replies: 20). Default 200 "
                        "(--lengths budget: 64)")
    p.add_argument("--lengths", choices=["realistic", "budget"], default="realistic",
                   help="realistic: rows stop at drawn lengths (see _common.STOP_LENGTHS); budget: at their budget")
    p.add_argument("--max-seq-len", type=int, default=500, help="dataset_max_seq_len of the reference's docs")
    p.add_argument("--vqa-type", default="no_cond_desc")
    p.add_argument("--limit", type=int, default=None, help="run only the first N questions (after the shuffle)")
    p.add_argument("--ref-limit", type=int, default=6,
                   help="questions the reference answers per run (the first ones of the same order; default 6)")
    args = p.parse_args(argv)
    device, dtype = setup(args)
    real = real_sizes(args)
    dims = LLAMA3_1_8B if real else (QUICK_DIMS if args.quick else CPU_DIMS)
    per_modality = args.per_modality or (1 if args.quick else 16)
    args.max_new_tokens = args.max_new_tokens or (4 if args.quick else 200 if args.lengths == "realistic" else 64)
    if args.quick and args.limit is None:
        args.limit = 3
    n_img = 8 if args.quick else 50
    reps = args.reps or (1 if args.quick else 2)
    logging.getLogger("medcap").setLevel(logging.WARNING)

    from medcap.testing import make_omnimedvqa_layout
    from medcap.generation import GenerationEngine

    tmp = Path(tempfile.mkdtemp(prefix="medcap-bench-eval-"))
    tokenizer = bench_tokenizer(tmp / "tok", dims.vocab_size)
    model = build_model(dims, num_image_tokens=n_img, device=device, dtype=dtype, seed=args.seed,
                        real_vision=real, max_seq_len=4096).eval()
    image_size = model.vision.visual.image_size
    layout = make_omnimedvqa_layout(tmp / "data", per_modality=per_modality, seed=args.seed, quirks=False,
                                    image_size=40)
    n_questions = layout["kept"] if args.limit is None else min(args.limit, layout["kept"])
    log(f"{n_questions} questions, model {dims}")

    cut = args.lengths == "realistic"
    engines = {
        "ours": GenerationEngine(model, tokenizer, batch_size=args.batch, temperature=0.0, use_cache=True,
                                 chunk_size=8 * args.batch),
        "static": GenerationEngine(model, tokenizer, batch_size=args.batch, temperature=0.0, continuous=False,
                                   chunk_size=8 * args.batch),
        "reference": GenerationEngine(model, tokenizer, batch_size=1, temperature=0.0, use_cache=False),
    }
    engines = {k: StopAtDrawnLengths(e, seed=args.seed, cut=cut) for k, e in engines.items()}
    ours = engines["ours"]

    # warm-up (not timed): our engine on a couple of questions
    warm = argparse_copy(args, limit=min(2, n_questions))
    run_suite(ours, Path(layout["root"]), tmp / "warm", warm, image_size)

    # alternate ours and the (long) reference runs so that both see the same machine
    # load; the reference answers the first --ref-limit questions of the same order
    # (its questions/s does not depend on how many: it takes them one at a time)
    ref_args = argparse_copy(args, limit=min(args.ref_limit, n_questions))
    n_ref = ref_args.limit
    runs: Dict[str, List[Dict]] = {"ours": [], "reference": [], "static": []}
    order = ["ours", "static"] + ["reference", "ours", "static"] * max(1, reps)
    for k, name in enumerate(order):
        engine, a = engines[name], (ref_args if name == "reference" else args)
        engine.stats = {}
        res = run_suite(engine, Path(layout["root"]), tmp / f"{name}-{k}", a, image_size)
        res["questions"] = len(res["raw"])
        res["work"] = engine.stats
        runs[name].append(res)
        log(f"{name}: {res['questions'] / res['seconds']:.3f} questions/s ({res['seconds']:.1f}s)")

    def qps(name: str) -> float:
        return median([r["questions"] / r["seconds"] for r in runs[name]])

    # identical outputs: every compared column of every row the runs share, raw and scored
    mismatches = []
    base = runs["reference"][0]
    for other in runs["ours"] + runs["static"] + runs["reference"][1:]:
        for kind, cols in (("raw", COMPARED_RAW), ("scored", COMPARED_SCORED)):
            if len(other[kind]) < len(base[kind]):
                mismatches.append({"file": kind, "rows": [len(other[kind]), len(base[kind])]})
                continue
            for i, (x, y) in enumerate(zip(other[kind], base[kind])):
                diff = [c for c in cols if x.get(c) != y.get(c)]
                if diff:
                    mismatches.append({"file": kind, "row": i, "columns": diff})
    result = {
        "bench": "eval_omnimedvqa",
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "machine": machine_info(device),
        "settings": {
            "model": dims.as_dict(),
            "num_image_tokens": n_img,
            "questions": n_questions,
            "reference_questions": n_ref,
            "vqa_type": args.vqa_type,
            "scoring": "letter",
            "max_new_tokens": args.max_new_tokens,
            "answer_max_new_tokens": min(50, args.max_new_tokens),
            "max_seq_len": args.max_seq_len,
            "batch": args.batch,
            "lengths": args.lengths,
            "stop_lengths": STOP_LENGTHS if cut else "none: every generation runs to its budget",
            "reference": "GenerationEngine(batch_size=1, use_cache=False): one question at a time, no cache",
            "runs": {k: len(v) for k, v in runs.items()},
            "compared_rows": n_ref,
        },
        "figures": {
            name: {
                "questions_per_s": qps(name),
                "questions_per_run": runs[name][0]["questions"],
                "times_s": [round(r["seconds"], 3) for r in runs[name]],
                "accuracy": runs[name][0]["accuracy"],
                **runs[name][0]["work"],
            }
            for name in runs
        },
        "ratios": {
            "ours_vs_reference": round(qps("ours") / qps("reference"), 3),
            "continuous_vs_static": round(qps("ours") / qps("static"), 3),
            "continuous_vs_static_decode_passes": round(
                runs["static"][0]["work"]["decode_passes"] / runs["ours"][0]["work"]["decode_passes"], 3),
        },
        "goals": {"ours_vs_reference": 10.0, "continuous_vs_static": 1.0, "continuous_vs_static_decode_passes": 1.5},
        "outputs_match": not mismatches,
        "output_mismatches": mismatches[:20],
        "generated_tokens_per_question_max": args.max_new_tokens + min(50, args.max_new_tokens) + 20,
        "mean_generated_length": {
            col: round(sum(len(tokenizer.encode(r[col], add_bos=False, add_eos=False)) for r in rows)
                       / max(1, len(rows)), 1)
            for col, rows in (("generated", runs["ours"][0]["raw"]), ("predict_generated", runs["ours"][0]["scored"]))
        },
    }
    result["goals_met"] = {k: result["ratios"][k] >= v for k, v in result["goals"].items()}
    shutil.rmtree(tmp, ignore_errors=True)
    emit(result)
    return result


def argparse_copy(args, **changes):
    import argparse

    ns = argparse.Namespace(**vars(args))
    for k, v in changes.items():
        setattr(ns, k, v)
    return ns


if __name__ == "__main__":
    main()
