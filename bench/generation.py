"""Generation speed: our batched, KV-cached engine against the reference's algorithm
and against Hugging Face transformers' ``generate`` on the same weights.

One Llama-3.1-architecture MedcapModel with random weights (CPU: a few layers,
width in the hundreds, a 32k vocabulary, fp32; CUDA: Llama-3.1-8B's sizes, bf16),
prompts built with the chat template around 50 image placeholders, one image each,
greedy decoding of ``--new-tokens`` tokens with no stop token (every row generates
all of them, so every variant does the same work):

* ``reference``: the reference's algorithm, one sample at a time and the whole
  sequence (image included) recomputed for every new token, no cache. By default
  only the last position is projected onto the vocabulary (``--reference-logits
  last``), which is cheaper than what the reference runs (torchtune's decoder
  projects every position, ``all``): the ratio against it is a lower bound.
* ``ours_b1`` / ``ours_bN``: ``medcap.generation.generate`` at batch 1 and batch N.
* ``hf_b1`` / ``hf_bN``: ``LlamaForCausalLM.generate`` with the same decoder
  weights (converted with torchtune's ``tune_to_hf``; logits checked first), fed
  the fused embeddings from ``MedcapModel.embed`` (computed inside the timed call),
  left padded with an attention mask.

Throughput is generated tokens per second of wall time, prefill included. The
variants alternate round by round; medians are reported.

A second workload (``--workload realistic``, on by default) compares continuous
batching against static batching at the same batch size (``--cont-batch``,
default 16) on rows that stop where the trained demo model stopped (the measured
workload, ``_workloads``: descriptions, answers and letter replies drawn from
``bench/workloads/demo_stop_lengths.json``), run as the evaluation runs them: one
call per kind. Beside
wall time it reports the counts that decide GPU time: decode forward passes and
slot-steps spent on idle (finished or empty) rows. ``--compile`` adds the
continuous engine with its decode step compiled.

The last stdout line is one JSON object (see bench/README.md).

    python bench/generation.py                # CPU, 3-5 min on 2 cores (both workloads)
    python bench/generation.py --quick        # seconds; checks that it runs
    python bench/generation.py --device cuda  # Llama-3.1-8B sizes, bf16, vs the memory-bandwidth limit
"""

from __future__ import annotations

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
    decode_weight_bytes,
    emit,
    gpu_limits,
    wants_limits,
    log,
    machine_info,
    median,
    real_sizes,
    setup,
    sync,
    to_hf_llama,
)

CPU_DIMS = LlamaDims(vocab_size=32_000, embed_dim=256, num_layers=4, num_heads=4, num_kv_heads=1, intermediate_dim=896)
QUICK_DIMS = LlamaDims(vocab_size=4096, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=1, intermediate_dim=224)

QUESTIONS = [
    "Describe the image.",
    "What is the most likely diagnosis?",
    "Which organ is shown in this scan, and is there any abnormality visible?",
    "Is there a fracture?",
    "Describe the findings in this chest radiograph in detail, including the lungs, heart and bones.",
    "What modality was used?",
    "Where is the lesion located?",
    "Are the margins of the mass smooth or irregular, and what does that suggest?",
    "Caption this figure.",
    "Is this image normal?",
    "What abnormality is seen in the left lower lobe?",
    "Summarise the image in one sentence.",
    "What is shown?",
    "Which stain was used for this microscopy image, and what cells are visible?",
    "Is there evidence of pleural effusion?",
    "Describe the skin lesion.",
]


# ---- the variants


@torch.inference_mode()
def reference_generate(model, prompt: List[int], image: torch.Tensor, new_tokens: int, logits: str) -> List[int]:
    """The reference's algorithm for one sample: no cache; every step embeds the whole
    sequence again (vision encoder included) and runs every layer over it."""
    device = image.device
    tokens = torch.tensor([prompt], device=device)  # [1, s]
    out: List[int] = []
    for _ in range(new_tokens):
        if logits == "all":
            step_logits = model(tokens, images=image)[:, -1]  # [1, V], all positions projected
        else:
            h = model.hidden_states(tokens, images=image)  # [1, s, d]
            step_logits = model.logits(h[:, -1])  # [1, V]
        nxt = step_logits.argmax(dim=-1, keepdim=True)  # [1, 1]
        out.append(int(nxt))
        tokens = torch.cat([tokens, nxt], dim=1)
    return out


def ours_generate(model, tokenizer, prompts, images, new_tokens: int) -> List[List[int]]:
    from medcap.generation import generate

    with torch.inference_mode():
        return generate(
            model, tokenizer, prompts, images, max_new_tokens=new_tokens, temperature=0, stop_tokens=[]
        )


@torch.inference_mode()
def hf_generate(model, hf, prompts: List[List[int]], images: torch.Tensor, new_tokens: int, pad_id: int):
    """HF generate on the fused embeddings of left-padded prompts."""
    device = images.device
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)  # [b, L]
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)  # [b, L]
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = torch.tensor(p, device=device)
        mask[i, width - len(p):] = 1
    embeds = model.embed(tokens, images)  # [b, L, d]
    out = hf.generate(
        inputs_embeds=embeds,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=None,
        pad_token_id=pad_id,
    )  # [b, new_tokens]: with inputs_embeds only, HF returns just the new tokens
    return out[:, -new_tokens:].tolist()


# ---- realistic lengths


KINDS = ("desc", "answer", "score")  # one call per kind, as the evaluation makes them


def realistic_rows(tokenizer, n_img: int, rows: int, seed: int, image_size: int, device, dtype):
    """Per kind: prompts, images, keys and budgets (the drawn stop lengths) of ``rows`` rows."""
    from medcap.generation import build_prompt

    from _workloads import StopLengths, load_stop_lengths

    g = torch.Generator().manual_seed(seed + 1)
    work, lengths = {}, StopLengths(load_stop_lengths(), seed=seed)
    for kind in KINDS:
        with_image = kind != "score"  # letter replies are text only
        prompts = [build_prompt(tokenizer, QUESTIONS[i % len(QUESTIONS)], num_image_tokens=n_img, has_image=with_image)
                   for i in range(rows)]
        images = [torch.randn(3, image_size, image_size, generator=g).to(device=device, dtype=dtype)
                  if with_image else None for _ in range(rows)]
        keys = [f"{kind}:{i}" for i in range(rows)]
        work[kind] = (prompts, images, keys, [lengths.length(k) for k in keys])
    return work


def compare_continuous_static(model, tokenizer, work, batch: int, reps: int, device, compile_step: bool) -> Dict:
    """Continuous vs static batching (and optionally compiled) on the same rows."""
    from medcap.generation import GenerationEngine

    engines = {
        "static": GenerationEngine(model, tokenizer, batch_size=batch, continuous=False),
        "continuous": GenerationEngine(model, tokenizer, batch_size=batch),
    }
    if compile_step:
        engines["continuous_compiled"] = GenerationEngine(model, tokenizer, batch_size=batch, compile=True)
    outputs: Dict[str, Dict[str, List[List[int]]]] = {}
    stats: Dict[str, Dict[str, int]] = {}

    def run(name: str, rows=None) -> None:
        eng, total = engines[name], {}
        for kind, (prompts, images, keys, budgets) in work.items():
            idx = rows(budgets) if rows else range(len(prompts))
            got = eng.generate_tokens([prompts[i] for i in idx], [images[i] for i in idx],
                                      [budgets[i] for i in idx], [keys[i] for i in idx])
            for k, v in eng.last_stats.items():
                total[k] = total.get(k, 0) + v
            if rows is None:
                outputs.setdefault(name, {})[kind] = got
        if rows is None:
            stats[name] = total

    def longest_two(budgets):  # the same cache length as the full run: a compiled step is kept
        return sorted(range(len(budgets)), key=lambda i: -budgets[i])[:2]

    warm_s = {}
    for name in engines:  # warm-up: allocators, and the compile for the compiled step
        sync(device)
        t = time.perf_counter()
        run(name, longest_two)
        sync(device)
        warm_s[name] = time.perf_counter() - t
    times = {n: [] for n in engines}
    for r in range(reps):
        order = list(engines)[r % len(engines):] + list(engines)[: r % len(engines)]
        for name in order:
            sync(device)
            t = time.perf_counter()
            run(name)
            sync(device)
            times[name].append(time.perf_counter() - t)
            log(f"  {name}: {times[name][-1]:.2f}s")
    tokens = sum(len(t) for rows in outputs["static"].values() for t in rows)
    figures = {
        n: {"median_s": median(ts), "times_s": [round(x, 3) for x in ts], "tokens_per_s": tokens / median(ts),
            "warmup_s": round(warm_s[n], 2), **stats[n]}
        for n, ts in times.items()
    }
    st, co = figures["static"], figures["continuous"]
    ratios = {
        "continuous_vs_static_decode_passes": round(st["decode_passes"] / co["decode_passes"], 3),
        "continuous_vs_static_wall": round(st["median_s"] / co["median_s"], 3),
    }
    if compile_step:
        ratios["compiled_vs_eager_continuous_wall"] = round(co["median_s"] / figures["continuous_compiled"]["median_s"], 3)
    lengths = {k: [len(t) for t in rows] for k, rows in outputs["static"].items()}
    return {
        "figures": figures,
        "ratios": ratios,
        "outputs_match": all(outputs[n] == outputs["static"] for n in outputs),
        "settings": {
            "batch": batch, "rows_per_kind": len(work["desc"][0]), "stop_lengths": "measured: bench/workloads/demo_stop_lengths.json",
            "generated_tokens": tokens,
            "mean_length": {k: round(sum(v) / len(v), 1) for k, v in lengths.items()},
            "max_length": {k: max(v) for k, v in lengths.items()},
        },
    }


# ---- main


def main(argv: Optional[List[str]] = None) -> Dict:
    p = base_parser("generation throughput: ours vs the reference's algorithm vs HF transformers")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per prompt (default 128)")
    p.add_argument("--batch", type=int, default=None, help="the large batch size (default 8)")
    p.add_argument("--b1-prompts", type=int, default=None,
                   help="prompts generated one at a time by ours_b1 and hf_b1 per round (default 4)")
    p.add_argument("--ref-prompts", type=int, default=None,
                   help="prompts the reference algorithm generates, one per round (default 2; its tokens/s "
                        "does not depend on the batch it would serve)")
    p.add_argument("--reference-logits", choices=["last", "all"], default="last",
                   help="positions the reference projects onto the vocabulary each step (torchtune: all)")
    p.add_argument("--num-image-tokens", type=int, default=50)
    p.add_argument("--skip-hf", action="store_true", help="leave HF transformers out")
    p.add_argument("--workload", choices=["fixed", "realistic", "both"], default="both",
                   help="fixed: every row generates --new-tokens (ours vs reference vs HF); realistic: drawn stop "
                        "lengths, continuous vs static batching")
    p.add_argument("--cont-batch", type=int, default=None, help="batch size of the realistic workload (default 16)")
    p.add_argument("--cont-rows", type=int, default=None, help="rows per kind in the realistic workload (default 4 x batch)")
    p.add_argument("--compile", action="store_true", help="realistic workload: add the compiled continuous engine")
    args = p.parse_args(argv)
    device, dtype = setup(args)
    real = real_sizes(args)

    dims = LLAMA3_1_8B if real else (QUICK_DIMS if args.quick else CPU_DIMS)
    new_tokens = args.new_tokens or (8 if args.quick else 128)
    batch = args.batch or (3 if args.quick else 8)
    b1_prompts = min(batch, args.b1_prompts or (1 if args.quick else 4))
    ref_prompts = min(batch, args.ref_prompts or (1 if args.quick else 2))
    reps = args.reps or (1 if args.quick else 3)
    n_img = args.num_image_tokens if not args.quick else 8
    rounds = max(reps, ref_prompts)

    tmp = Path(tempfile.mkdtemp(prefix="medcap-bench-gen-"))
    tokenizer = bench_tokenizer(tmp / "tok", dims.vocab_size)
    t0 = time.perf_counter()
    model = build_model(dims, num_image_tokens=n_img, device=device, dtype=dtype, seed=args.seed,
                        real_vision=real, max_seq_len=4096).eval()
    log(f"model built in {time.perf_counter() - t0:.1f}s: {dims}")
    image_size = model.vision.visual.image_size

    from medcap.generation import build_prompt

    prompts = [
        build_prompt(tokenizer, QUESTIONS[i % len(QUESTIONS)], num_image_tokens=n_img, has_image=True)
        for i in range(batch)
    ]
    g = torch.Generator().manual_seed(args.seed)
    images = torch.randn(batch, 3, image_size, image_size, generator=g).to(device=device, dtype=dtype)

    result: Dict = {
        "bench": "generation",
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "machine": machine_info(device),
        "settings": {
            "model": dims.as_dict(),
            "num_image_tokens": n_img,
            "prompt_lengths": [len(x) for x in prompts],
            "new_tokens": new_tokens,
            "batch": batch,
            "b1_prompts_per_round": b1_prompts,
            "reference_prompts": ref_prompts,
            "reference_logits": args.reference_logits,
            "rounds": rounds,
            "greedy": True,
            "stop_tokens": "none (every row generates new_tokens)",
        },
    }

    if args.workload != "fixed":
        cb = args.cont_batch or (3 if args.quick else 16)
        rows = args.cont_rows or (2 * cb if args.quick else 4 * cb)
        log(f"realistic workload: {rows} rows per kind, batch {cb}")
        work = realistic_rows(tokenizer, n_img, rows, args.seed, image_size, device, dtype)
        if args.quick:  # seconds, not minutes: cut the drawn lengths
            work = {k: (p_, i_, k_, [min(b, 6) for b in b_]) for k, (p_, i_, k_, b_) in work.items()}
        result["realistic"] = compare_continuous_static(model, tokenizer, work, cb, max(1, reps - 1), device,
                                                        args.compile)
        if args.workload == "realistic":
            result["ratios"] = dict(result["realistic"]["ratios"])
            result["outputs_match"] = result["realistic"]["outputs_match"]
            result["goals"] = {"continuous_vs_static_decode_passes": 1.5, "continuous_vs_static_wall": 1.0}
            result["goals_met"] = {k: result["ratios"][k] >= v for k, v in result["goals"].items()}
            result["figures"] = result["realistic"]["figures"]
            emit(result)
            return result

    hf = None
    if not args.skip_hf:
        hf = to_hf_llama(model, dims, device, dtype, max_seq_len=131072)
        with torch.inference_mode():
            tok = torch.tensor([prompts[0]], device=device)
            emb = model.embed(tok, images[:1])
            ours_logits = model.decoder(emb)
            hf_logits = hf(inputs_embeds=emb).logits.float()
            diff = float((ours_logits - hf_logits).abs().max())
            scale = float(ours_logits.abs().max())
        del ours_logits, hf_logits
        result["hf_logits_max_abs_diff"] = diff
        result["hf_logits_max_abs"] = scale
        tol = 1e-3 if dtype == torch.float32 else 0.1 * max(scale, 1.0)
        if not diff <= tol:
            raise SystemExit(f"HF conversion check failed: logits differ by {diff} (tolerance {tol})")
        log(f"HF logits match: max |diff| = {diff:.2e}")

    pad_id = tokenizer.pad_id
    state = {"round": 0}
    outputs: Dict[str, Dict[int, List[int]]] = {}

    def record(name: str, rows: List[int], toks: List[List[int]]) -> None:
        d = outputs.setdefault(name, {})
        for r, t in zip(rows, toks):
            d[r] = list(t)

    def b1_rows() -> List[int]:
        # each round generates b1_prompts prompts one at a time, moving through the batch
        start = (state["round"] * b1_prompts) % batch
        return [(start + k) % batch for k in range(b1_prompts)]

    def run_reference() -> int:
        r = state["round"]
        if r >= ref_prompts:
            return 0
        toks = reference_generate(model, prompts[r], images[r:r + 1], new_tokens, args.reference_logits)
        record("reference", [r], [toks])
        return new_tokens

    def run_ours_b1() -> int:
        rows = b1_rows()
        for r in rows:
            record("ours_b1", [r], ours_generate(model, tokenizer, [prompts[r]], images[r:r + 1], new_tokens))
        return new_tokens * len(rows)

    def run_ours_bn() -> int:
        record(f"ours_b{batch}", list(range(batch)), ours_generate(model, tokenizer, prompts, images, new_tokens))
        return new_tokens * batch

    def run_hf_b1() -> int:
        rows = b1_rows()
        for r in rows:
            record("hf_b1", [r], hf_generate(model, hf, [prompts[r]], images[r:r + 1], new_tokens, pad_id))
        return new_tokens * len(rows)

    def run_hf_bn() -> int:
        record(f"hf_b{batch}", list(range(batch)), hf_generate(model, hf, prompts, images, new_tokens, pad_id))
        return new_tokens * batch

    fns = {"ours_b1": run_ours_b1, f"ours_b{batch}": run_ours_bn}
    if hf is not None:
        fns.update({"hf_b1": run_hf_b1, f"hf_b{batch}": run_hf_bn})

    # warm-up: every variant once on a few tokens (allocators, lazy inits, HF's first-call setup)
    with torch.inference_mode():
        ours_generate(model, tokenizer, prompts[:1], images[:1], 2)
        ours_generate(model, tokenizer, prompts, images, 2)
        if hf is not None:
            hf_generate(model, hf, prompts[:1], images[:1], 2, pad_id)
            hf_generate(model, hf, prompts, images, 2, pad_id)
        reference_generate(model, prompts[0], images[:1], 2, args.reference_logits)

    # rounds: the reference on one new prompt, then the others, order rotating
    times: Dict[str, List[float]] = {n: [] for n in ["reference", *fns]}
    tokens_done: Dict[str, int] = {n: 0 for n in times}
    for r in range(rounds):
        state["round"] = r
        log(f"round {r + 1}/{rounds}")
        order = list(fns)
        order = order[r % len(order):] + order[: r % len(order)]
        if r < ref_prompts:
            order = ["reference"] + order
        for name in order:
            fn = run_reference if name == "reference" else fns[name]
            sync(device)
            t = time.perf_counter()
            n = fn()
            sync(device)
            dt = time.perf_counter() - t
            if n:
                times[name].append(dt)
                tokens_done[name] += n
                log(f"  {name}: {n / dt:.1f} tokens/s")

    figures: Dict[str, Dict] = {}
    for name, ts in times.items():
        if not ts:
            continue
        per_call = tokens_done[name] / len(ts)  # same token count every round
        figures[name] = {
            "tokens_per_s": per_call / median(ts),
            "median_s": median(ts),
            "times_s": [round(x, 4) for x in ts],
            "tokens_per_call": per_call,
        }

    def tps(name: str) -> Optional[float]:
        return figures[name]["tokens_per_s"] if name in figures else None

    bn = f"b{batch}"
    ratios = {
        f"ours_{bn}_vs_reference": tps(f"ours_{bn}") / tps("reference"),
        "ours_b1_vs_reference": tps("ours_b1") / tps("reference"),
    }
    if hf is not None:
        ratios["ours_b1_vs_hf_b1"] = tps("ours_b1") / tps("hf_b1")
        ratios[f"ours_{bn}_vs_hf_{bn}"] = tps(f"ours_{bn}") / tps(f"hf_{bn}")
    ratios = {k: round(v, 3) for k, v in ratios.items()}

    # every variant against every other on the prompts both generated
    names = list(outputs)
    mismatches = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            for row in sorted(set(outputs[a]) & set(outputs[b])):
                if outputs[a][row] != outputs[b][row]:
                    first = next(k for k, (x, y) in enumerate(zip(outputs[a][row], outputs[b][row])) if x != y)
                    mismatches.append({"a": a, "b": b, "prompt": row, "first_differing_token": first})
    result["figures"] = figures
    goals = {f"ours_{bn}_vs_reference": 10.0, "ours_b1_vs_hf_b1": 1.0, f"ours_{bn}_vs_hf_{bn}": 1.0}
    if "realistic" in result:
        ratios.update(result["realistic"]["ratios"])
        goals.update({"continuous_vs_static_decode_passes": 1.5, "continuous_vs_static_wall": 1.0})
    result["ratios"] = ratios
    result["goals"] = goals
    result["goals_met"] = {k: ratios.get(k, 0) >= v for k, v in result["goals"].items() if k in ratios}
    result["outputs_match"] = not mismatches and result.get("realistic", {}).get("outputs_match", True)
    result["output_mismatches"] = mismatches[:20]
    result["outputs_compared"] = {n: sorted(outputs[n]) for n in names}
    result["distinct_tokens_in_outputs"] = len({t for d in outputs.values() for o in d.values() for t in o})

    if wants_limits(args, device):
        lim = gpu_limits(args, device)
        wbytes = decode_weight_bytes(dims, torch.finfo(dtype).bits // 8)
        result["limits"] = {**lim, "weight_bytes_per_decode_step": wbytes}
        if lim["bandwidth_bytes_per_s"]:
            step_limit = lim["bandwidth_bytes_per_s"] / wbytes  # decode steps/s if only weights were read
            result["limits"]["decode_steps_per_s_limit"] = step_limit
            result["fraction_of_bandwidth_limit"] = {
                "ours_b1": round(tps("ours_b1") / step_limit, 3),
                f"ours_{bn}": round(tps(f"ours_{bn}") / (step_limit * batch), 3),
            }
            if hf is not None:
                result["fraction_of_bandwidth_limit"]["hf_b1"] = round(tps("hf_b1") / step_limit, 3)
                result["fraction_of_bandwidth_limit"][f"hf_{bn}"] = round(tps(f"hf_{bn}") / (step_limit * batch), 3)
        result["note"] = ("tokens/s include prefill; the limit counts weight reads only (no KV cache, no "
                          "activations), so 1.0 is unreachable")
    emit(result)
    return result


if __name__ == "__main__":
    main()
