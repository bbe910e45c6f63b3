"""Training throughput and peak memory: the vision side trained with the LLM frozen,
ours against the reference's way, on captions whose lengths spread as real ones do.

The data set is sharegpt JSON in the reference's layout (50 placeholders, one
synthetic image each) whose caption lengths follow a log-normal law (default:
median 40 tokens, sigma 1, clipped to 3..400 tokens: a few words to several
hundred tokens, like PMC-OA / ROCO captions mixed with PMC-Patients summaries),
read by ``medcap.data.image_chat_dataset`` (items built once, then reused: image
decoding is the same for both ways and is not timed). One epoch per timed run:

* ``reference``: batches in random order, padded to their longest sample, the
  decoder's full logits at every position ``[b, L, V]`` (float32), then
  cross-entropy with the ignore index, as the reference's torchtune recipe does;
* ``ours``: the shipped configs' settings (``llama3_1/8B_full*.yaml``: batch 2,
  ``group_by_length: False``, activation checkpointing, loss chunks of 1024):
  ``ResumableBatchSampler`` batches in random order, ``TrainForward`` with
  ``LabelTokenCrossEntropy`` (vocabulary projection only at label positions, in
  checkpointed chunks);
* ``ours_grouped``: the same with ``group_by_length=True`` (similar lengths, random
  order), a setting the configs offer but leave off: its own row.

Both: same model, AdamW on the vision tower + projector, activation
checkpointing of the decoder layers (the 8B configs' setting; ``--no-ac`` turns
it off), same batch size. Per-sample losses of both ways are compared at the
same weights before training. The epochs alternate; medians are reported.

Proportions: the vocabulary projection's share of a step's FLOPs is computed
analytically for these sizes and for Llama-3.1-8B on the same batches and
printed; the default sizes keep it within 1.5x. So is the gain each way would
get at both sizes, from FLOPs alone.

Peak memory: CUDA: ``torch.cuda.max_memory_allocated`` above the level at the
epoch's start. CPU: the resident set's high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs``) above the resident size at the epoch's start, with
glibc told to return freed blocks at once (see ``_common.PeakMemory``).

    python bench/train_step.py             # CPU, < 3 min on 2 cores
    python bench/train_step.py --quick
    python bench/train_step.py --device cuda   # Llama-3.1-8B sizes + BiomedCLIP, bf16, vs the FLOP limit
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from _common import (
    BIOMEDCLIP_VISION,
    LLAMA3_1_8B,
    LlamaDims,
    PeakMemory,
    VisionDims,
    base_parser,
    bench_tokenizer,
    build_model,
    emit,
    frozen_llm_step_flops,
    gpu_limits,
    wants_limits,
    log,
    machine_info,
    median,
    mib,
    real_sizes,
    setup,
    sync,
)

# Vocabulary sized so that its projection's share of a step's FLOPs stays within
# 1.5x of Llama-3.1-8B's (see the printed shares); width and depth as small as
# the 2-core budget allows.
CPU_DIMS = LlamaDims(vocab_size=1024, embed_dim=192, num_layers=4, num_heads=3, num_kv_heads=1, intermediate_dim=672)
QUICK_DIMS = LlamaDims(vocab_size=512, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=1, intermediate_dim=224)
# For the memory probe: what sets the two ways' peaks apart is the float32 logits
# (~3 x V x 4 bytes per position) against a recomputed layer's activations
# (~width x constant); this keeps 8B's vocabulary-to-width ratio (31), in float32
# throughout (at 8B the activations are bf16, so its logits weigh twice as much again).
MEM_DIMS = LlamaDims(vocab_size=2048, embed_dim=64, num_layers=4, num_heads=1, num_kv_heads=1, intermediate_dim=224)
TINY_VISION = dict(image_size=32, patch_size=8, width=32, depth=2, heads=2, output_dim=24, projector_hidden=64)

WORDS = ("left right upper lower lobe opacity nodule mass lesion effusion consolidation fracture normal "
         "contrast enhanced axial coronal sagittal view shows demonstrates arrow indicates the of with and "
         "in a an patient year old male female scan image figure panel tumor cyst margin irregular").split()


def make_dataset(out: Path, tokenizer, n: int, *, median_len: float, sigma: float, lo: int, hi: int,
                 num_image_tokens: int, seed: int) -> Path:
    """Sharegpt JSON with ``n`` samples whose captions hold log-normally spread token counts."""
    from medcap.testing import PLACEHOLDER_CHAR, make_image

    rng = np.random.default_rng(seed)
    targets = np.clip(np.round(rng.lognormal(np.log(median_len), sigma, n)), lo, hi).astype(int)
    img_dir = out / "images"
    records = []
    for i, t in enumerate(targets):
        text = " ".join(rng.choice(WORDS, size=int(t) * 2))
        ids = tokenizer.encode(text, add_bos=False, add_eos=False)[: int(t)]
        caption = tokenizer.decode(ids).strip() or "normal"
        rel = f"img_{i:04d}.png"
        make_image(img_dir / rel, 40, seed=seed * 1000 + i)
        records.append({
            "conversations": [
                {"from": "human", "value": PLACEHOLDER_CHAR * num_image_tokens},
                {"from": "gpt", "value": caption},
            ],
            "image": rel,
            "meta": f"dir={img_dir}",
        })
    path = out / "train.json"
    path.write_text(json.dumps(records))
    return path


# ---- the two ways


def random_batches(n: int, batch: int, seed: int) -> List[List[int]]:
    """The reference's order: a shuffled epoch cut into batches (last partial one dropped)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g).tolist()
    return [order[i:i + batch] for i in range(0, n - batch + 1, batch)]


def sampler_batches(n: int, batch: int, seed: int, lengths: Sequence[int], group: bool) -> List[List[int]]:
    """medcap's sampler: ``group_by_length`` as the config sets it (the shipped configs: off)."""
    from medcap.training import ResumableBatchSampler

    sampler = ResumableBatchSampler(n, batch, shuffle=True, seed=seed, lengths=lengths, group_by_length=group,
                                    drop_last=True)
    return [list(b) for b in sampler]


def to_device(b: Dict, device: torch.device, dtype: torch.dtype) -> Dict:
    return {
        "tokens": b["tokens"].to(device),
        "labels": b["labels"].to(device),
        "images": None if b["images"] is None else b["images"].to(device=device, dtype=dtype),
    }


def reference_loss(model, b: Dict, per_sample: bool = False):
    """The reference's step: logits at every position, CE over the shifted labels."""
    logits = model(b["tokens"], images=b["images"])  # [b, L, V] float32
    targets = b["labels"][:, 1:]  # [b, L-1]
    tok = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="none")  # [b, L-1]
    keep = targets != -100
    mean = tok.sum() / keep.sum().clamp(min=1)
    if not per_sample:
        return mean
    return mean, tok.sum(dim=1) / keep.sum(dim=1)


def make_ours(model, chunk_size: int):
    from medcap.training import LabelTokenCrossEntropy, TrainForward

    loss_fn = LabelTokenCrossEntropy(chunk_size=chunk_size)
    return TrainForward(model, loss_fn), loss_fn


def ours_per_sample(model, loss_fn, b: Dict) -> torch.Tensor:
    hidden = model.hidden_states(b["tokens"], images=b["images"])  # [b, L, d]
    return loss_fn(model, hidden, b["labels"], per_sample=True).per_sample_mean


# ---- main


def parse(argv: Optional[List[str]] = None):
    p = base_parser("training step: ours vs the reference's way (vision trained, LLM frozen)")
    p.add_argument("--samples", type=int, default=None, help="data set size = samples per timed epoch (default 40)")
    p.add_argument("--batch", type=int, default=None, help="batch size of every way (default 2, the shipped configs')")
    p.add_argument("--median-len", type=float, default=40.0, help="median caption length in tokens")
    p.add_argument("--sigma", type=float, default=1.0, help="log-normal sigma of caption lengths")
    p.add_argument("--min-len", type=int, default=3)
    p.add_argument("--max-len", type=int, default=400)
    p.add_argument("--no-ac", action="store_true", help="no activation checkpointing of the decoder layers")
    p.add_argument("--loss-chunk", type=int, default=1024, help="LabelTokenCrossEntropy chunk_size (config default)")
    return p.parse_args(argv)


def cli_settings(args) -> Dict:
    """What the command line decides (the JSON's ``settings`` hold them; the docs test
    compares them with ``make bench``'s)."""
    real = real_sizes(args)
    dims = LLAMA3_1_8B if real else (QUICK_DIMS if args.quick else CPU_DIMS)
    return {"model": dims.as_dict(), "samples": args.samples or (8 if args.quick else (64 if real else 40)),
            "batch": args.batch or (2 if args.quick else (8 if real else 2)),
            "reps": args.reps or (1 if args.quick else 3), "num_image_tokens": 8 if args.quick else 50,
            "activation_checkpointing": not args.no_ac, "loss_chunk": args.loss_chunk,
            "caption_tokens": {"law": "log-normal", "median": args.median_len, "sigma": args.sigma,
                               "clip": [args.min_len, args.max_len]},
            "group_by_length": {"ours": False, "ours_grouped": True, "reference": False}, "seed": args.seed,
            "device": args.device}


def main(argv: Optional[List[str]] = None) -> Dict:
    args = parse(argv)
    device, dtype = setup(args)
    real = real_sizes(args)
    cli = cli_settings(args)
    dims = LLAMA3_1_8B if real else (QUICK_DIMS if args.quick else CPU_DIMS)
    n, batch, reps, n_img, ac = cli["samples"], cli["batch"], cli["reps"], cli["num_image_tokens"], \
        cli["activation_checkpointing"]

    tmp = Path(tempfile.mkdtemp(prefix="medcap-bench-train-"))
    tokenizer = bench_tokenizer(tmp / "tok", dims.vocab_size)
    model = build_model(dims, num_image_tokens=n_img, device=device, dtype=dtype, seed=args.seed,
                        real_vision=real, max_seq_len=4096, vision=TINY_VISION)
    model.train()
    from medcap.models import assert_only_vision_trainable

    assert_only_vision_trainable(model)
    from torchtune import training as tt_training
    from torchtune.modules import TransformerSelfAttentionLayer

    if ac:
        tt_training.set_activation_checkpointing(model.decoder, auto_wrap_policy={TransformerSelfAttentionLayer})
    image_size = model.vision.visual.image_size

    from medcap.data import collate_image_chat, image_chat_dataset

    src = make_dataset(tmp / "data", tokenizer, n, median_len=args.median_len, sigma=args.sigma,
                       lo=args.min_len, hi=args.max_len, num_image_tokens=n_img, seed=args.seed)
    ds = image_chat_dataset(tokenizer, source=str(src), num_image_tokens=n_img, image_size=image_size,
                            max_seq_len=1000)
    items = [ds[i] for i in range(len(ds))]  # built once: image decoding is not what is compared
    lengths = [len(it["tokens"]) for it in items]
    label_counts = [sum(1 for x in it["labels"][1:] if x != -100) for it in items]
    pad_id = tokenizer.pad_id

    def collate(idx: Sequence[int]) -> Dict:
        return collate_image_chat([items[i] for i in idx], pad_id=pad_id)

    trainable = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=2e-5, foreach=device.type == "cuda")
    ours_fwd, loss_fn = make_ours(model, args.loss_chunk)

    ref_plan = random_batches(n, batch, args.seed)
    ours_plan = sampler_batches(n, batch, args.seed, lengths, group=False)
    grouped_plan = sampler_batches(n, batch, args.seed, lengths, group=True)

    # ---- same per-sample losses, same weights (before any step)
    model.eval()  # no dropout anywhere, but be explicit
    ref_ps = torch.full((n,), float("nan"))
    our_ps = torch.full((n,), float("nan"))
    with torch.no_grad():
        for idx in ref_plan:
            _, ps = reference_loss(model, to_device(collate(idx), device, dtype), per_sample=True)
            ref_ps[idx] = ps.float().cpu()
        for idx in ours_plan:
            ps = ours_per_sample(model, loss_fn, to_device(collate(idx), device, dtype))
            our_ps[idx] = ps.float().cpu()
    model.train()
    both = ~(ref_ps.isnan() | our_ps.isnan())
    loss_diff = float((ref_ps[both] - our_ps[both]).abs().max()) if both.any() else float("nan")
    # float32: the same sums in another order; bfloat16: hidden states of differently
    # padded batches differ in their last bits, 1 % of the loss is well above that
    loss_tol = 1e-4 if dtype == torch.float32 else 1e-2 * float(ref_ps[both].abs().max())
    losses_match = bool(both.sum() == n) and loss_diff <= loss_tol
    log(f"per-sample losses: max |diff| = {loss_diff:.2e} over {int(both.sum())} samples")

    # ---- the timed epochs
    def step_reference(idx) -> None:
        b = to_device(collate(idx), device, dtype)
        loss = reference_loss(model, b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def step_ours(idx) -> None:
        b = to_device(collate(idx), device, dtype)
        total, count = ours_fwd(b["tokens"], b["labels"], b["images"])
        (total / count.clamp(min=1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    ways = {"reference": (step_reference, ref_plan), "ours": (step_ours, ours_plan),
            "ours_grouped": (step_ours, grouped_plan)}
    # warm-up: two steps each (allocators, optimizer state, lazy inits)
    for fn, plan in ways.values():
        for idx in plan[:2]:
            fn(idx)

    times: Dict[str, List[float]] = {k: [] for k in ways}
    peaks: Dict[str, List[Optional[int]]] = {k: [] for k in ways}
    method = None
    for r in range(reps):
        order = list(ways) if r % 2 == 0 else list(ways)[::-1]
        for name in order:
            fn, plan = ways[name]
            with PeakMemory(device) as pm:
                sync(device)
                t0 = time.perf_counter()
                for idx in plan:
                    fn(idx)
                sync(device)
                dt = time.perf_counter() - t0
            method = pm.method
            times[name].append(dt)
            peaks[name].append(pm.peak_bytes)
            log(f"round {r + 1}/{reps} {name}: {len(plan) * batch / dt:.2f} samples/s, peak +{mib(pm.peak_bytes)} MiB")

    # ---- memory at 8B's proportions of logits to activations (CPU sizes only; the
    # real sizes measure it directly): one step of each way's largest batch
    probe = None
    if not real:
        mem_model = build_model(MEM_DIMS, num_image_tokens=n_img, device=device, dtype=dtype, seed=args.seed,
                                max_seq_len=4096, vision=TINY_VISION, image_token_id=tokenizer.image_id)
        mem_model.train()
        if ac:
            tt_training.set_activation_checkpointing(mem_model.decoder,
                                                     auto_wrap_policy={TransformerSelfAttentionLayer})
        mem_fwd, _ = make_ours(mem_model, args.loss_chunk)

        def largest(plan):
            return max(plan, key=lambda idx: len(idx) * max(lengths[i] for i in idx))

        def probe_ref(idx) -> None:
            reference_loss(mem_model, to_device(collate(idx), device, dtype)).backward()

        def probe_ours(idx) -> None:
            b = to_device(collate(idx), device, dtype)
            total, count = mem_fwd(b["tokens"], b["labels"], b["images"])
            (total / count.clamp(min=1)).backward()

        probes = {"reference": (probe_ref, largest(ref_plan)), "ours": (probe_ours, largest(ours_plan))}
        probe_peaks: Dict[str, List[int]] = {k: [] for k in probes}
        for r in range(3):
            for name in (list(probes) if r % 2 == 0 else list(probes)[::-1]):
                fn, idx = probes[name]
                with PeakMemory(device) as pm:
                    fn(idx)
                mem_model.zero_grad(set_to_none=True)
                if pm.peak_bytes is not None:
                    probe_peaks[name].append(pm.peak_bytes)
        if all(probe_peaks.values()):
            pr_, po_ = median(probe_peaks["reference"]), median(probe_peaks["ours"])
            probe = {
                "model": MEM_DIMS.as_dict(),
                "vocab_per_width": MEM_DIMS.vocab_size / MEM_DIMS.embed_dim,
                "llama3_1_8b_vocab_per_width": round(LLAMA3_1_8B.vocab_size / LLAMA3_1_8B.embed_dim, 1),
                "batch_shape": {k: [len(v[1]), max(lengths[i] for i in v[1])] for k, v in probes.items()},
                "reference_peak_mib": mib(pr_),
                "ours_peak_mib": mib(po_),
                "reference_vs_ours": round(pr_ / po_, 3) if po_ else None,  # a tiny probe can peak at 0
            }
            log(f"memory probe at 8B's logits/activation proportions: reference +{mib(pr_)} MiB, ours +{mib(po_)} MiB")
        del mem_model, mem_fwd

    def sps(name: str) -> float:
        return len(ways[name][1]) * batch / median(times[name])

    def peak(name: str) -> Optional[int]:
        vals = [x for x in peaks[name] if x is not None]
        return max(vals) if vals else None

    # ---- analytic FLOPs: padding, logits positions, shares at both sizes
    def plan_shapes(plan, logits_everywhere: bool):
        out = []
        for idx in plan:
            L = max(lengths[i] for i in idx)
            pos = len(idx) * L if logits_everywhere else sum(label_counts[i] for i in idx)
            out.append((len(idx), L, pos))
        return out

    ref_shapes, ours_shapes = plan_shapes(ref_plan, True), plan_shapes(ours_plan, False)
    if real:
        vision_dims = BIOMEDCLIP_VISION
    else:
        v = TINY_VISION
        vision_dims = VisionDims(v["image_size"], v["patch_size"], v["width"], v["depth"], v["output_dim"],
                                 v["projector_hidden"], n_img, dims.embed_dim)
    flops = {}
    for label, d, vd in (("bench", dims, vision_dims), ("llama3_1_8b", LLAMA3_1_8B, BIOMEDCLIP_VISION)):
        fr = frozen_llm_step_flops(d, vd, ref_shapes, activation_checkpointing=ac)
        fo = frozen_llm_step_flops(d, vd, ours_shapes, activation_checkpointing=ac, vocab_recomputed=True)
        flops[label] = {
            "reference_flops_per_sample": fr["total"] / (len(ref_plan) * batch),
            "ours_flops_per_sample": fo["total"] / (len(ours_plan) * batch),
            "reference_shares": {k: round(v, 4) for k, v in fr.items() if k.endswith("share")},
            "ours_shares": {k: round(v, 4) for k, v in fo.items() if k.endswith("share")},
            "gain_from_flops": round((fr["total"] / len(ref_plan)) / (fo["total"] / len(ours_plan)), 3),
        }
    share_bench = flops["bench"]["reference_shares"]["vocab_share"]
    share_8b = flops["llama3_1_8b"]["reference_shares"]["vocab_share"]
    share_ratio = share_bench / share_8b

    # float32 logits alive at once in the largest batch of each plan, at these sizes and at
    # 8B's vocabulary: the part of the peak the two ways differ in. (The rest, the decoder
    # layers' activations, is the same for both: the largest batch has the same shape in
    # both plans, as grouping by length puts the longest samples together.)
    def logits_bytes(shapes, vocab: int, chunk: Optional[int]) -> int:
        most = max(pos for _, _, pos in shapes)
        return (min(most, chunk) if chunk else most) * vocab * 4

    logits_mem = {
        label: {
            "reference_mib": mib(logits_bytes(ref_shapes, v, None)),
            "ours_mib": mib(logits_bytes(ours_shapes, v, args.loss_chunk)),
        }
        for label, v in (("bench", dims.vocab_size), ("llama3_1_8b", LLAMA3_1_8B.vocab_size))
    }

    tokens_ref = sum(r * L for r, L, _ in ref_shapes)
    tokens_ours = sum(r * L for r, L, _ in ours_shapes)
    result = {
        "bench": "train_step",
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "machine": machine_info(device),
        "settings": {
            **cli,
            "model": dims.as_dict(),
            "vision": "biomedclip ViT-B/16 + 512->4096->4096x50 projector" if real else TINY_VISION,
            "num_image_tokens": n_img,
            "samples_per_epoch": len(ref_plan) * batch,
            "batch": batch,
            "caption_tokens": {"law": "log-normal", "median": args.median_len, "sigma": args.sigma,
                               "clip": [args.min_len, args.max_len]},
            "sequence_lengths": {"min": min(lengths), "median": float(np.median(lengths)), "max": max(lengths),
                                 "mean": float(np.mean(lengths))},
            "activation_checkpointing": ac,
            "optimizer": "torch.optim.AdamW lr 2e-5 (vision tower + projector)",
            "loss_chunk": args.loss_chunk,
            "epochs_timed_per_way": reps,
            "peak_memory_method": method,
        },
        "figures": {
            name: {
                "samples_per_s": sps(name),
                "median_epoch_s": median(times[name]),
                "times_s": [round(x, 3) for x in times[name]],
                "peak_memory_mib": mib(peak(name)),
                "peak_memory_mib_per_epoch": [mib(x) for x in peaks[name]],
            }
            for name in ways
        },
        "padded_tokens_per_epoch": {"reference": tokens_ref, "ours": tokens_ours, "real": int(sum(lengths))},
        "logit_positions_per_epoch": {"reference": sum(x[2] for x in ref_shapes),
                                      "ours": sum(x[2] for x in ours_shapes)},
        "analytic": flops,
        "largest_logits_tensor": logits_mem,
        "memory_probe_8b_proportions": probe,
        "vocab_share": {"bench": share_bench, "llama3_1_8b": share_8b, "ratio": round(share_ratio, 3),
                        "within_1_5x": 1 / 1.5 <= share_ratio <= 1.5},
        "per_sample_loss_max_abs_diff": loss_diff,
    }
    pr, po = peak("reference"), peak("ours")
    result["ratios"] = {"ours_vs_reference_samples_per_s": round(sps("ours") / sps("reference"), 3),
                        "ours_grouped_vs_reference_samples_per_s": round(sps("ours_grouped") / sps("reference"), 3)}
    if pr and po:
        result["ratios"]["reference_vs_ours_peak_memory"] = round(pr / po, 3)
    if probe and probe["reference_vs_ours"]:
        result["ratios"]["reference_vs_ours_peak_memory_8b_proportions"] = probe["reference_vs_ours"]
    result["goals"] = {"ours_vs_reference_samples_per_s": 1.3, "reference_vs_ours_peak_memory": 1.0,
                       "reference_vs_ours_peak_memory_8b_proportions": 1.0}
    result["goals_met"] = {k: result["ratios"][k] >= v for k, v in result["goals"].items() if k in result["ratios"]}
    result["outputs_match"] = losses_match

    if wants_limits(args, device):
        lim = gpu_limits(args, device)
        result["limits"] = lim
        if lim["peak_flops_per_s"]:
            fb = flops["bench"]
            result["fraction_of_flop_limit"] = {
                "ours": round(sps("ours") * fb["ours_flops_per_sample"] / lim["peak_flops_per_s"], 3),
                "reference": round(sps("reference") * fb["reference_flops_per_sample"] / lim["peak_flops_per_s"], 3),
            }
            result["samples_per_s_limit"] = {
                "ours": lim["peak_flops_per_s"] / fb["ours_flops_per_sample"],
                "reference": lim["peak_flops_per_s"] / fb["reference_flops_per_sample"],
            }
    emit(result)
    return result


if __name__ == "__main__":
    main()
