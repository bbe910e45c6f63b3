"""Every benchmark at Llama-3.1-8B + BiomedCLIP sizes (random bf16 weights) on one
GPU, in one command (``make bench-gpu``), with one JSON object as the last line:

* ``decode``: continuous-batching decode tokens/s at batch 1, 16 and 64 (prompts
  of the evaluation's shape: 50 image placeholders and a question; every slot
  decodes ``--decode-tokens`` tokens), eager and, at ``--compile-batches``, with
  the decode step compiled (CUDA graphs), each with its fraction of the bandwidth
  roofline: decode steps/s x bytes of weights read per step / the GPU's bandwidth
  (KV cache and activations not counted, so 1.0 is out of reach);
* ``omnimedvqa``: ``eval_omnimedvqa.py`` (questions/s of continuous vs static
  batching at batch 16 on drawn stop lengths, and the reference's protocol);
* ``training``: ``train_step.py`` (samples/s and its fraction of the dense bf16
  peak);
* ``vllm_peer``: ``vllm_peer.py``, the vLLM backend against medcap's engine on one model
  (decode tokens/s at batch 1 and 64 against the bandwidth roofline, a full OmniMedVQA
  projection, both backends; vLLM from ``.venv-vllm``, made by ``make vllm``; without it
  the section says why and the rest stands);
* ``training_8b_config``: the peak memory of single-device training with the
  reference's 8B config (``recipes/configs/llama3_1/8B_full_single_device.yaml``:
  batch 2, samples up to 1000 tokens, activation checkpointing), every sample at
  the longest length: ``torch.cuda.max_memory_allocated`` over the run, weights
  included; it must stay under 80 GB.

Budget: under 8 minutes on one H100/H200 (each part logs its time), and about 5 more for
the vLLM peer (its 8B folder written to disk, its server's start).

    python bench/gpu.py              # the GPU run
    python bench/gpu.py --short      # a few minutes less: batch 1 and 16, fewer questions (pytest -m gpu)
    python bench/gpu.py --dry-run    # CPU, tiny sizes, the same code path (the normal test run)
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

import eval_omnimedvqa
import train_step
import vllm_peer
from _common import (
    LLAMA3_1_8B,
    LlamaDims,
    bench_tokenizer,
    build_model,
    decode_weight_bytes,
    emit,
    gpu_limits,
    log,
    machine_info,
)

TINY = LlamaDims(vocab_size=4096, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=1, intermediate_dim=224)
LIMIT_BYTES = 80 * 10**9  # an 80 GB card


def parse(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, the same code path")
    p.add_argument("--short", action="store_true", help="batch 1 and 16 only, fewer questions and samples")
    p.add_argument("--decode-batches", default=None, help="comma-separated batch sizes (default 1,16,64)")
    p.add_argument("--compile-batches", default=None,
                   help="batch sizes also measured with the compiled decode step (default 16; none: '')")
    p.add_argument("--decode-tokens", type=int, default=None, help="tokens decoded per slot (default 64)")
    p.add_argument("--bandwidth-gbs", type=float, default=None)
    p.add_argument("--peak-tflops", type=float, default=None)
    return p.parse_args(argv)


def _ints(text: str) -> List[int]:
    return [int(x) for x in text.split(",") if x.strip()]


@torch.inference_mode()
def decode_rate(model, tokenizer, batch: int, new_tokens: int, compile_step, device) -> Dict:
    """Decode tokens/s of a full continuous batch (prefill and first step not timed)."""
    from medcap.generation import ContinuousBatcher, build_prompt

    n_img = model.num_image_tokens
    size = model.vision.visual.image_size
    prompt = build_prompt(tokenizer, "Describe the findings in this image.", num_image_tokens=n_img, has_image=True)
    batcher = ContinuousBatcher(model, [], slots=batch, cache_len=len(prompt) + new_tokens + 8, compile=compile_step)
    image = torch.randn(3, size, size, device=device)

    def fill():
        return [batcher.submit(prompt, image, new_tokens) for _ in range(batch)]

    t0 = time.perf_counter()
    fill()
    batcher.run_until_done()  # warm-up: the compile happens here
    warm = time.perf_counter() - t0
    reqs = fill()
    batcher.step()  # prefill, first token, first decode pass
    passes0 = batcher.stats["decode_passes"]
    _sync(device)
    t = time.perf_counter()
    batcher.run_until_done()
    _sync(device)
    dt = time.perf_counter() - t
    steps = batcher.stats["decode_passes"] - passes0
    assert all(len(r.tokens) == new_tokens for r in reqs)
    return {"tokens_per_s": batch * steps / dt, "decode_steps_per_s": steps / dt, "steps": steps,
            "warmup_s": round(warm, 1)}


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_decode(args, device, dtype, dims, lim) -> Dict:
    tmp = Path(tempfile.mkdtemp(prefix="medcap-bench-gpu-"))
    tokenizer = bench_tokenizer(tmp / "tok", dims.vocab_size)
    real = not args.dry_run
    model = build_model(dims, num_image_tokens=50 if real else 8, device=device, dtype=dtype, seed=0,
                        real_vision=real, max_seq_len=4096).eval()
    model.requires_grad_(False)
    batches = _ints(args.decode_batches or ("1,16" if args.short else "1,16,64"))
    compiled = _ints(args.compile_batches if args.compile_batches is not None else "16")
    # the dry run captures the same step with dynamo only (no code generation: seconds)
    backend = "aot_eager" if args.dry_run else True
    new_tokens = args.decode_tokens or (4 if args.dry_run else 64)
    wbytes = decode_weight_bytes(dims, torch.finfo(dtype).bits // 8)
    bw = lim["bandwidth_bytes_per_s"]
    out: Dict[str, Dict] = {}
    for b in batches:
        for name, comp in (("eager", False), ("compiled", backend)):
            if comp and b not in compiled:
                continue
            t = time.perf_counter()
            r = decode_rate(model, tokenizer, b, new_tokens, comp, device)
            if bw:
                r["fraction_of_bandwidth_roofline"] = round(r["decode_steps_per_s"] * wbytes / bw, 3)
            out[f"b{b}_{name}"] = r
            log(f"decode batch {b} {name}: {r['tokens_per_s']:.0f} tokens/s ({time.perf_counter() - t:.0f}s)")
    del model
    torch._dynamo.reset()  # compiled steps and their CUDA graph pools hold memory the next parts need
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"figures": out, "weight_bytes_per_step": wbytes, "new_tokens_per_slot": new_tokens}


def _sub_argv(args) -> List[str]:
    common = ["--quick"] if args.dry_run else ["--device", "cuda"]
    for flag, val in (("--bandwidth-gbs", args.bandwidth_gbs), ("--peak-tflops", args.peak_tflops)):
        if val:
            common += [flag, str(val)]
    return common


def run_training_8b_config(args, device) -> Dict:
    """Peak memory of training with the 8B single-device config's batch and lengths."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sub = _sub_argv(args) + ["--reps", "1", "--batch", "2", "--samples", "2"]
    if args.dry_run:
        sub += ["--min-len", "60", "--max-len", "60", "--median-len", "60"]
    else:  # 50 image tokens + the prompt + ~920 caption tokens: at the config's max_seq_len of 1000
        sub += ["--min-len", "920", "--max-len", "920", "--median-len", "920"]
    res = train_step.main(sub)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {
        "config": "recipes/configs/llama3_1/8B_full_single_device.yaml: batch_size 2, max_seq_len 1000, "
                  "activation checkpointing, LLM frozen",
        "sequence_lengths": res["settings"]["sequence_lengths"],
        "peak_memory_gb": None if peak is None else round(peak / 1e9, 2),
        "fits_80gb": None if peak is None else peak < LIMIT_BYTES,
        "note": "max_memory_allocated over both ways (ours and the reference's), weights included",
        "peak_above_start_mib": {k: v.get("peak_memory_mib") for k, v in res["figures"].items()},
    }


def run_vllm_peer(args, device, dtype, lim) -> Dict:
    """vllm_peer.py at this run's sizes (the dry run: its quick model, whose head size vLLM's CPU build takes)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # vLLM asks for most of the GPU's memory at its start
    dry = args.dry_run
    return vllm_peer.run_peer(vllm_peer.QUICK_DIMS if dry else LLAMA3_1_8B, device=device, dtype=dtype,
                              batches=[1, 2] if dry else [1, 64], new_tokens=4 if dry else 64, reps=1 if dry else 2,
                              n_img=8 if dry else 50, real_vision=not dry, proj_batch=2 if dry else 64,
                              questions=vllm_peer.OMNIMEDVQA_QUESTIONS, quick=dry,
                              bandwidth=lim["bandwidth_bytes_per_s"])


def main(argv: Optional[List[str]] = None) -> Dict:
    args = parse(argv)
    if args.dry_run:
        device, dtype, dims = torch.device("cpu"), torch.float32, TINY
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --dry-run for the CPU code path")
        device, dtype, dims = torch.device("cuda"), torch.bfloat16, LLAMA3_1_8B
    lim = gpu_limits(args, device)
    result: Dict = {"bench": "gpu", "device": str(device), "dtype": str(dtype).replace("torch.", ""),
                    "dry_run": args.dry_run, "short": args.short, "machine": machine_info(device),
                    "model": dims.as_dict(), "limits": lim, "seconds": {}}
    t0 = time.perf_counter()

    def timed(name, fn):
        t = time.perf_counter()
        result[name] = fn()
        result["seconds"][name] = round(time.perf_counter() - t, 1)
        log(f"{name}: {result['seconds'][name]}s (total {time.perf_counter() - t0:.0f}s)")

    timed("decode", lambda: run_decode(args, device, dtype, dims, lim))
    eval_argv = _sub_argv(args) + ["--batch", "16", "--reps", "1", "--ref-limit", "2", "--engines", "ours,static,reference"]
    if not args.dry_run:  # one model (the 8B sizes), the measured workload
        eval_argv += ["--grid", "tiny:measured:16"]
    if not args.dry_run:
        eval_argv += ["--per-modality", "2" if args.short else "6"]
    timed("omnimedvqa", lambda: _pick(eval_omnimedvqa.main(eval_argv), "figures", "ratios", "outputs_match", "settings"))
    train_argv = _sub_argv(args) + ["--reps", "1" if args.short else "2"]
    timed("training", lambda: _pick(train_step.main(train_argv), "figures", "ratios", "outputs_match",
                                    "fraction_of_flop_limit", "samples_per_s_limit"))
    timed("training_8b_config", lambda: run_training_8b_config(args, device))
    timed("vllm_peer", lambda: run_vllm_peer(args, device, dtype, lim))
    result["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    result["summary"] = summary(result)
    emit(result)
    return result


def _pick(d: Dict, *keys: str) -> Dict:
    return {k: d[k] for k in keys if k in d}


def summary(r: Dict) -> Dict:
    """The headline figures in one place."""
    dec = r["decode"]["figures"]
    om = r["omnimedvqa"]["figures"]
    tr = r["training"]
    return {
        "decode_tokens_per_s": {k: round(v["tokens_per_s"], 1) for k, v in dec.items()},
        "decode_fraction_of_bandwidth_roofline": {k: v.get("fraction_of_bandwidth_roofline") for k, v in dec.items()},
        "omnimedvqa_questions_per_s": {k: round(v["questions_per_s"], 3) for k, v in om.items()},
        "omnimedvqa_continuous_vs_static_decode_passes": r["omnimedvqa"]["ratios"].get(
            "continuous_vs_static_decode_passes"),
        "training_samples_per_s": {k: round(v["samples_per_s"], 2) for k, v in tr["figures"].items()
                                   if "samples_per_s" in v},
        "training_fraction_of_bf16_peak": tr.get("fraction_of_flop_limit"),
        "training_8b_config_peak_memory_gb": r["training_8b_config"]["peak_memory_gb"],
        "training_8b_config_fits_80gb": r["training_8b_config"]["fits_80gb"],
        "outputs_match": bool(r["omnimedvqa"].get("outputs_match")) and bool(tr.get("outputs_match")),
        "vllm_peer": vllm_peer.summary(r["vllm_peer"]),
    }


if __name__ == "__main__":
    main()
