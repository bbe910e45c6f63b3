"""The vLLM backend as a peer of medcap's engine: the same random-weight model, the same
prompts (the chat template around the image placeholders, one image each), greedy, in the
same run.

* ``decode``: per batch size, every row generates ``--new-tokens`` tokens with no stop
  id. Native: ``ContinuousBatcher`` (gpu.py's decode measurement); vLLM: ``VllmEngine``
  (medcap builds the embeddings, vLLM's server decodes, over HTTP). Figures: tokens/s of
  the whole call (embeddings and prefill included) and decode tokens/s, from the
  difference between a call of ``--new-tokens`` and one of a single token; on CUDA the
  decode rate's fraction of the bandwidth roofline (weights read per step / HBM bandwidth).
* ``omnimedvqa``: a full OmniMedVQA evaluation projected from rows of its three kinds
  (description, answer, letter reply), each stopping at its length in the measured workload
  (``_workloads``: where the trained demo model stopped), ``--proj-batch`` rows decoding together: seconds per question, hours for
  ``--omnimedvqa-questions`` questions (default: the open-access split as published).
* ``outputs_match``: both backends' tokens equal row by row (greedy).

The native engine runs first: ``VllmEngine.start`` drops medcap's decoder layers. vLLM
comes from ``--vllm-python`` (default ``.venv-vllm/bin/python`` when it exists, else this
Python); without vLLM the peer reports ``available: false`` and why.

    python bench/vllm_peer.py                  # CPU: generation.py's CPU model, batch 1 and 8
    python bench/vllm_peer.py --quick          # seconds of work (plus vLLM's start)
    python bench/vllm_peer.py --device cuda    # Llama-3.1-8B sizes, bf16: batch 1 and 64
"""

from __future__ import annotations

import gc
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from _common import (
    LLAMA3_1_8B,
    REPO_ROOT,
    LlamaDims,
    base_parser,
    bench_tokenizer,
    build_model,
    decode_weight_bytes,
    emit,
    gpu_limits,
    log,
    machine_info,
    median,
    real_sizes,
    setup,
    sync,
    to_hf_llama,
)

CPU_DIMS = LlamaDims(vocab_size=32_000, embed_dim=256, num_layers=4, num_heads=4, num_kv_heads=1, intermediate_dim=896)
QUICK_DIMS = LlamaDims(vocab_size=4096, embed_dim=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_dim=224)
OMNIMEDVQA_QUESTIONS = 88_996  # OmniMedVQA's open-access split as published; --omnimedvqa-questions for yours
QUESTIONS = ["Describe the image.", "What is the most likely diagnosis?", "Is there a fracture?",
             "Which organ is shown in this scan, and is there any abnormality visible?", "What modality was used?",
             "Where is the lesion located?", "Describe the findings in this chest radiograph in detail."]
KINDS = ("desc", "answer", "score")  # the evaluation's three calls per question


# ---- the workload


def prompts_for(tokenizer, n: int, n_img: int, image_size: int, device, dtype, seed: int, with_image=True):
    from medcap.generation import build_prompt

    g = torch.Generator().manual_seed(seed)
    prompts = [build_prompt(tokenizer, QUESTIONS[i % len(QUESTIONS)], num_image_tokens=n_img, has_image=with_image)
               for i in range(n)]
    images = [torch.randn(3, image_size, image_size, generator=g).to(device=device, dtype=dtype) if with_image
              else None for _ in range(n)]
    return prompts, images


def native_call(model, device, slots: Optional[int] = None):
    """Rows in, tokens out with medcap's continuous batcher (``slots`` rows at once, default all),
    no stop id: gpu.py's decode path."""
    from medcap.generation import ContinuousBatcher

    def call(prompts, images, budgets, keys):
        batcher = ContinuousBatcher(model, [], slots=min(len(prompts), slots or len(prompts)),
                                    cache_len=max(len(p) for p in prompts) + max(budgets))
        with torch.inference_mode():
            reqs = [batcher.submit(p, im, b) for p, im, b in zip(prompts, images, budgets)]
            batcher.run_until_done()
        sync(device)
        return [r.tokens for r in reqs]

    return call


def vllm_call(engine):
    def call(prompts, images, budgets, keys):
        return engine.generate_tokens(prompts, images, list(budgets), keys)

    return call


def timed(call, prompts, images, budgets, reps: int):
    """(median seconds, tokens of the last repetition), one untimed warm-up first."""
    keys = [f"row:{i}" for i in range(len(prompts))]
    call(prompts, images, budgets, keys)
    times, out = [], None
    for _ in range(reps):
        t = time.perf_counter()
        out = call(prompts, images, budgets, keys)
        times.append(time.perf_counter() - t)
    return median(times), out


# ---- the two measurements


def decode_figures(call, prompts, images, batches: Sequence[int], new_tokens: int, reps: int,
                   weight_bytes: int, bandwidth: Optional[float]) -> Dict:
    out = {}
    for b in batches:
        t_full, tokens = timed(call, prompts[:b], images[:b], [new_tokens] * b, reps)
        t_one, _ = timed(call, prompts[:b], images[:b], [1] * b, reps)
        # the decode steps' share: a call of new_tokens less a call of one (None when noise hides it)
        steps_per_s = (new_tokens - 1) / (t_full - t_one) if new_tokens > 1 and t_full > t_one else None
        r = {"tokens_per_s": b * new_tokens / t_full, "decode_tokens_per_s": steps_per_s and b * steps_per_s,
             "seconds": round(t_full, 4), "seconds_one_token": round(t_one, 4), "tokens": tokens}
        if bandwidth and steps_per_s:
            r["fraction_of_bandwidth_roofline"] = round(steps_per_s * weight_bytes / bandwidth, 3)
        out[b] = r
        log(f"  batch {b}: {r['tokens_per_s']:.0f} tokens/s, decode {r['decode_tokens_per_s'] or 0:.0f} tokens/s")
    return out


def projection(call, tokenizer, n_img, image_size, device, dtype, batch: int, seed: int, questions: int,
               quick: bool) -> Dict:
    """Seconds per question from ``2 x batch`` rows of each kind, and the full run's hours."""
    from _workloads import StopLengths, load_stop_lengths

    per_kind, tokens, lengths = {}, {}, StopLengths(load_stop_lengths(), seed=seed)
    for kind in KINDS:
        prompts, images = prompts_for(tokenizer, 2 * batch, n_img, image_size, device, dtype, seed + len(kind),
                                      with_image=kind != "score")  # letter replies are text only
        budgets = [min(6, lengths.length(f"{kind}:{i}")) if quick else lengths.length(f"{kind}:{i}")
                   for i in range(len(prompts))]
        t = time.perf_counter()
        tokens[kind] = call(prompts, images, budgets, [f"{kind}:{i}" for i in range(len(prompts))])
        per_kind[kind] = (time.perf_counter() - t) / len(prompts)
    s_per_q = sum(per_kind.values())
    return {"seconds_per_question": round(s_per_q, 5), "seconds_per_row": {k: round(v, 5) for k, v in per_kind.items()},
            "questions": questions, "projected_hours": round(questions * s_per_q / 3600, 2), "batch": batch,
            "tokens": tokens}


def _match(a: Dict, b: Dict) -> bool:
    return all(a[k]["tokens"] == b[k]["tokens"] for k in a) if set(a) == set(b) else False


def _strip(d: Dict) -> Dict:
    return {str(k): {kk: vv for kk, vv in v.items() if kk != "tokens"} for k, v in d.items()}


# ---- the run


def run_peer(dims: LlamaDims, *, device, dtype, batches: Sequence[int], new_tokens: int, reps: int,
             n_img: int, real_vision: bool, proj_batch: int, questions: int, seed: int = 0, quick: bool = False,
             vllm_python: Optional[str] = None, bandwidth: Optional[float] = None) -> Dict:
    """Both backends on one model; what gpu.py calls too. The model's decoder is dropped at the end."""
    from medcap.generation import VllmEngine, VllmError

    tmp = Path(tempfile.mkdtemp(prefix="medcap-bench-vllm-"))
    tokenizer = bench_tokenizer(tmp / "tok", dims.vocab_size)
    model = build_model(dims, num_image_tokens=n_img, device=device, dtype=dtype, seed=seed,
                        real_vision=real_vision, max_seq_len=4096).eval().requires_grad_(False)
    image_size = model.vision.visual.image_size
    prompts, images = prompts_for(tokenizer, max(batches), n_img, image_size, device, dtype, seed)
    wbytes = decode_weight_bytes(dims, torch.finfo(dtype).bits // 8)
    args = dict(batches=batches, new_tokens=new_tokens, reps=reps, weight_bytes=wbytes, bandwidth=bandwidth)
    proj = dict(tokenizer=tokenizer, n_img=n_img, image_size=image_size, device=device, dtype=dtype, batch=proj_batch,
                seed=seed, questions=questions, quick=quick)
    log("native engine ...")
    native = {"decode": decode_figures(native_call(model, device), prompts, images, **args),
              "omnimedvqa": projection(native_call(model, device, slots=proj_batch), **proj)}
    to_hf_llama(model, dims, device, dtype).save_pretrained(tmp / "llm")  # the folder vLLM loads
    gc.collect()
    python = vllm_python or _default_vllm_python()
    log(f"vLLM from {python} ...")
    t = time.perf_counter()
    try:
        engine = VllmEngine.start(model, tokenizer, str(tmp / "llm"), python=python, batch_size=max(*batches, proj_batch),
                                  dtype={torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype])
    except VllmError as e:
        log(f"vLLM peer skipped: {e}")
        return {"vllm": {"available": False, "reason": str(e), "python": python}, "native": _strip_all(native)}
    try:
        start_s = time.perf_counter() - t
        engine.stop_tokens = None  # the decode rows run to their budget, as the native batcher's
        vllm = {"decode": decode_figures(vllm_call(engine), prompts, images, **args)}
        engine.stop_tokens = list(tokenizer.stop_tokens)
        vllm["omnimedvqa"] = projection(vllm_call(engine), **proj)
    finally:
        engine.close()
    match = _match(native["decode"], vllm["decode"]) and native["omnimedvqa"]["tokens"] == vllm["omnimedvqa"]["tokens"]
    return {"vllm": {"available": True, "python": python, "server_start_s": round(start_s, 1)},
            "native": _strip_all(native), "vllm_figures": _strip_all(vllm), "outputs_match": match,
            "settings": {"model": dims.as_dict(), "num_image_tokens": n_img, "batches": list(batches),
                         "new_tokens": new_tokens, "reps": reps, "prompt_lengths": [len(p) for p in prompts],
                         "weight_bytes_per_step": wbytes, "greedy": True}}


def _strip_all(r: Dict) -> Dict:
    return {"decode": _strip(r["decode"]), "omnimedvqa": {k: v for k, v in r["omnimedvqa"].items() if k != "tokens"}}


def summary(res: Dict) -> Dict:
    """The headline figures of ``run_peer``'s result, per backend (for gpu.py's summary)."""
    out: Dict = {"vllm_available": res["vllm"]["available"], "outputs_match": res.get("outputs_match")}
    for side, key in (("native", "native"), ("vllm", "vllm_figures")):
        if key in res:
            dec = res[key]["decode"]
            out[side] = {"decode_tokens_per_s": {b: f["decode_tokens_per_s"] and round(f["decode_tokens_per_s"], 1)
                                                 for b, f in dec.items()},
                         "fraction_of_bandwidth_roofline": {b: f.get("fraction_of_bandwidth_roofline")
                                                            for b, f in dec.items()},
                         "omnimedvqa_projected_hours": res[key]["omnimedvqa"]["projected_hours"]}
    return out


def _default_vllm_python() -> str:
    import sys

    venv = REPO_ROOT / ".venv-vllm" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def main(argv: Optional[List[str]] = None) -> Dict:
    p = base_parser("the vLLM backend against medcap's engine: same model, same prompts, greedy")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens per row in the decode figures (default 64)")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8; CUDA 1,64)")
    p.add_argument("--proj-batch", type=int, default=None, help="rows decoding together in the projection (8; CUDA 64)")
    p.add_argument("--omnimedvqa-questions", type=int, default=OMNIMEDVQA_QUESTIONS)
    p.add_argument("--vllm-python", default=None, help="the Python with vLLM (default .venv-vllm/bin/python)")
    args = p.parse_args(argv)
    device, dtype = setup(args)
    real = real_sizes(args)
    dims = LLAMA3_1_8B if real else (QUICK_DIMS if args.quick else CPU_DIMS)
    batches = [int(x) for x in (args.batches or ("1,2" if args.quick else "1,64" if real else "1,8")).split(",")]
    lim = gpu_limits(args, device) if device.type == "cuda" else {"bandwidth_bytes_per_s": None}
    res = run_peer(dims, device=device, dtype=dtype, batches=batches, reps=args.reps or (1 if args.quick else 3),
                   new_tokens=args.new_tokens or (4 if args.quick else 64), n_img=8 if args.quick else 50, real_vision=real,
                   proj_batch=args.proj_batch or (2 if args.quick else 64 if real else 8), seed=args.seed,
                   questions=args.omnimedvqa_questions, quick=args.quick, vllm_python=args.vllm_python,
                   bandwidth=lim["bandwidth_bytes_per_s"])
    figures = {f"{side}_b{b}": f for side, key in (("native", "native"), ("vllm", "vllm_figures")) if key in res
               for b, f in res[key]["decode"].items()}
    result = {"bench": "vllm_peer", "device": str(device), "dtype": str(dtype).replace("torch.", ""),
              "machine": machine_info(device), "limits": lim, "figures": figures, **res}
    if "vllm_figures" in res:
        result["ratios"] = {f"vllm_vs_native_b{b}": round(res["vllm_figures"]["decode"][str(b)]["tokens_per_s"]
                                                          / res["native"]["decode"][str(b)]["tokens_per_s"], 3)
                            for b in batches}
    emit(result)
    return result


if __name__ == "__main__":
    main()
