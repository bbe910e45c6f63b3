"""Helpers shared by the benchmarks: devices, timing with medians,
peak memory, analytic FLOP and byte counts, GPU limits, JSON output, HF conversion.

Each benchmark prints exactly one JSON object as its last stdout line; progress
and notes go to stderr so the last line stays machine-readable.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    # run as `python bench/x.py` from a checkout without installing medcap
    sys.path.insert(0, str(REPO_ROOT))


# ---- arguments, devices


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cpu: small Llama-3.1-architecture sizes, fp32; cuda: Llama-3.1-8B sizes (random weights), bf16")
    p.add_argument("--quick", action="store_true", help="tiny settings: checks that the script runs, figures mean nothing")
    p.add_argument("--small", action="store_true",
                   help="with --device cuda: use the CPU sizes instead of the 8B ones (a smoke run of the cuda path)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per variant (median reported)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (CPU default: 1, steady on a shared machine; 2 to use both cores of an idle one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="auto: float32 on the CPU (exact comparisons), bfloat16 on CUDA")
    p.add_argument("--bandwidth-gbs", type=float, default=None,
                   help="GPU memory bandwidth in GB/s (default: from the GPU's name, see GPU_SPECS)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="GPU dense bf16 peak in TFLOP/s (default: from the GPU's name, see GPU_SPECS)")
    return p


def setup(args) -> tuple[torch.device, torch.dtype]:
    """The device and dtype a run uses: fp32 on the CPU (exact comparisons), bf16 on CUDA."""
    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.device == "cpu":
        # One thread unless asked: on a shared machine, OpenMP threads wait for each
        # other's time slices at every op, and a decode step's small ops take
        # milliseconds instead of microseconds (measured here: 2 threads 5x slower than
        # 1 under load). One thread keeps the figures steady; --threads 2 on a quiet box.
        torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda asked for, but torch sees no CUDA device (run with --device cpu)")
        torch.backends.cuda.matmul.allow_tf32 = True
        return torch.device("cuda"), torch.float32 if args.dtype == "float32" else torch.bfloat16
    configure_cpu_allocator()
    return torch.device("cpu"), torch.bfloat16 if args.dtype == "bfloat16" else torch.float32


def real_sizes(args) -> bool:
    """Whether this run uses the 8B sizes (cuda, not --small, not --quick)."""
    return args.device == "cuda" and not args.small and not args.quick


def log(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


def machine_info(device: torch.device) -> Dict[str, Any]:
    info: Dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        info["loadavg_1min"] = round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover - not on Linux
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def emit(result: Dict[str, Any]) -> None:
    """The benchmark's one JSON object, alone on the last line of stdout."""
    sys.stdout.flush()
    print(json.dumps(result, default=_json_default), flush=True)


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ---- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


# ---- peak memory


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def configure_cpu_allocator() -> None:
    """Make freed tensors go back to the OS at once, so that the resident set size
    follows the live tensors and its peak is a fair memory figure.

    glibc serves blocks above the mmap threshold with their own ``mmap`` and unmaps
    them on free; but it raises that threshold on the fly (up to 32 MiB) and then
    keeps freed memory in its heap. Setting the threshold explicitly turns the
    adjustment off.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 256 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, 1024 * 1024)
    except OSError:  # pragma: no cover - not glibc
        pass


def _proc_status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:  # pragma: no cover - not Linux
        return None
    return None


class PeakMemory:
    """Peak memory used above the level at entry, in bytes (``.peak_bytes``).

    * CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``
      (tensor memory only, exact).
    * CPU: the process's resident set high-water mark (``VmHWM``), reset at entry by
      writing ``5`` to ``/proc/self/clear_refs``, minus the resident size at entry.
      With :func:`configure_cpu_allocator` this follows the tensors' memory to within
      the allocator's small-block slack. ``.method`` names what was used; ``None``
      figures where neither is available.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes: Optional[int] = None
        self.method = "unavailable"

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self._base = (_proc_status_kib("VmRSS") or 0) * 1024
                self.method = "VmHWM after clear_refs=5, minus VmRSS at start"
            except OSError:
                self._base = None
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._base is not None:
            hwm = _proc_status_kib("VmHWM")
            if hwm is not None:
                self.peak_bytes = hwm * 1024 - self._base


def mib(n: Optional[float]) -> Optional[float]:
    return None if n is None else round(n / 2**20, 1)


# ---- model sizes and analytic counts


@dataclass(frozen=True)
class LlamaDims:
    vocab_size: int
    embed_dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_dim: int

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def layer_matmul_params(self) -> int:
        """Weights one token multiplies by in one decoder layer (q, k, v, o, w1, w2, w3)."""
        d, kv = self.embed_dim, self.num_kv_heads * self.head_dim
        return 2 * d * d + 2 * d * kv + 3 * d * self.intermediate_dim

    def body_matmul_params(self) -> int:
        return self.num_layers * self.layer_matmul_params()

    def output_params(self) -> int:
        return self.vocab_size * self.embed_dim

    def norm_params(self) -> int:
        return (2 * self.num_layers + 1) * self.embed_dim

    def as_dict(self) -> Dict[str, int]:
        return asdict(self)


LLAMA3_1_8B = LlamaDims(128_256, 4096, 32, 32, 8, 14336)


def decode_weight_bytes(dims: LlamaDims, bytes_per_param: int = 2) -> int:
    """Bytes of weights read for one decode step: every layer, the final norm and
    the output projection; the embedding table contributes one row per token (ignored)."""
    return (dims.body_matmul_params() + dims.output_params() + dims.norm_params()) * bytes_per_param


def attention_flops(dims: LlamaDims, q_len: int, kv_len: int) -> int:
    """Forward FLOPs of scores and weighted sum for ``q_len`` queries over ``kv_len``
    keys in all layers (counted as the full rectangle, as dense kernels compute it)."""
    return dims.num_layers * 4 * q_len * kv_len * dims.embed_dim


@dataclass(frozen=True)
class VisionDims:
    image_size: int
    patch_size: int
    width: int
    depth: int
    output_dim: int
    projector_hidden: int
    num_image_tokens: int
    llm_dim: int

    def forward_flops(self) -> int:
        n = (self.image_size // self.patch_size) ** 2 + 1  # patches + class token
        w = self.width
        patch = 2 * (self.image_size // self.patch_size) ** 2 * (3 * self.patch_size**2) * w
        # per block: qkv 3w^2, proj w^2, mlp 8w^2 (timm ViT mlp ratio 4); attention 4 n^2 w
        blocks = self.depth * (2 * n * 12 * w * w + 4 * n * n * w)
        head = 2 * w * self.output_dim
        proj = 2 * (self.output_dim * self.projector_hidden
                    + self.projector_hidden * self.llm_dim * self.num_image_tokens)
        return patch + blocks + head + proj


BIOMEDCLIP_VISION = VisionDims(224, 16, 768, 12, 512, 4096, 50, 4096)


def frozen_llm_step_flops(
    dims: LlamaDims,
    vision: VisionDims,
    batches: Sequence[tuple[int, int, int]],
    *,
    activation_checkpointing: bool = False,
    vocab_recomputed: bool = False,
) -> Dict[str, float]:
    """Analytic FLOPs of training steps with the LLM frozen and the vision side trained.

    ``batches``: ``(rows, padded_length, logit_positions)`` per step. The LLM's weights
    get no gradient, but the gradient must reach the image embeddings at its input,
    so its backward is one more matmul pass (activation gradients only): the body
    costs 2 passes of 2 P FLOPs per token (3 with activation checkpointing, which
    runs each layer's forward again in backward); attention 1 forward + 2 backward
    (+1 recomputed); the vocabulary projection 2 passes of 2 V d per logit position
    (+1 when its chunks are recomputed in backward); the vision side 3x its forward.
    """
    body_passes = 3.0 if activation_checkpointing else 2.0
    attn_passes = 4.0 if activation_checkpointing else 3.0
    vocab_passes = 3.0 if vocab_recomputed else 2.0
    body = attn = vocab = vis = 0.0
    for rows, length, logit_pos in batches:
        tokens = rows * length
        body += body_passes * 2.0 * dims.body_matmul_params() * tokens
        attn += attn_passes * rows * attention_flops(dims, length, length)
        vocab += vocab_passes * 2.0 * dims.output_params() * logit_pos
        vis += 3.0 * rows * vision.forward_flops()
    total = body + attn + vocab + vis
    return {
        "total": total,
        "body": body,
        "attention": attn,
        "vocab_projection": vocab,
        "vision": vis,
        "vocab_share": vocab / total if total else 0.0,
        "attention_share": attn / total if total else 0.0,
        "vision_share": vis / total if total else 0.0,
    }


# ---- GPU limits


# Public spec sheets: memory bandwidth (GB/s) and dense bf16 tensor-core peak (TFLOP/s).
GPU_SPECS: Dict[str, Dict[str, float]] = {
    "H200": {"bandwidth_gbs": 4800.0, "bf16_tflops": 989.0},
    "H100 PCIe": {"bandwidth_gbs": 2000.0, "bf16_tflops": 756.0},
    "H100 NVL": {"bandwidth_gbs": 3900.0, "bf16_tflops": 835.0},
    "H100": {"bandwidth_gbs": 3350.0, "bf16_tflops": 989.0},
    "GH200": {"bandwidth_gbs": 4000.0, "bf16_tflops": 989.0},
    "B200": {"bandwidth_gbs": 8000.0, "bf16_tflops": 2250.0},
    "A100-SXM4-80GB": {"bandwidth_gbs": 2039.0, "bf16_tflops": 312.0},
    "A100 80GB PCIe": {"bandwidth_gbs": 1935.0, "bf16_tflops": 312.0},
    "A100": {"bandwidth_gbs": 1555.0, "bf16_tflops": 312.0},
    "L40S": {"bandwidth_gbs": 864.0, "bf16_tflops": 362.0},
    "L4": {"bandwidth_gbs": 300.0, "bf16_tflops": 121.0},
    "A10G": {"bandwidth_gbs": 600.0, "bf16_tflops": 70.0},
    "RTX 4090": {"bandwidth_gbs": 1008.0, "bf16_tflops": 165.0},
}


def wants_limits(args, device: torch.device) -> bool:
    """Limits are reported on CUDA, and on the CPU when ``--bandwidth-gbs`` or
    ``--peak-tflops`` give the machine's own figures."""
    return device.type == "cuda" or bool(args.bandwidth_gbs or args.peak_tflops)


def gpu_limits(args, device: torch.device) -> Dict[str, Any]:
    """Memory bandwidth (bytes/s) and bf16 peak (FLOP/s): from the arguments, else
    from the first ``GPU_SPECS`` name found in the device's name (longest names first)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    spec: Dict[str, float] = {}
    for key in sorted(GPU_SPECS, key=len, reverse=True):
        if key.lower() in name.lower():
            spec = GPU_SPECS[key]
            break
    bw = args.bandwidth_gbs if args.bandwidth_gbs else spec.get("bandwidth_gbs")
    tf = args.peak_tflops if args.peak_tflops else spec.get("bf16_tflops")
    if device.type == "cuda" and (bw is None or tf is None):
        log(f"unknown GPU {name!r}: pass --bandwidth-gbs and --peak-tflops to get the limits")
    return {
        "gpu": name,
        "bandwidth_bytes_per_s": None if bw is None else bw * 1e9,
        "peak_flops_per_s": None if tf is None else tf * 1e12,
        "source": "arguments" if (args.bandwidth_gbs or args.peak_tflops) else "GPU_SPECS",
    }


# ---- models


def build_model(dims: LlamaDims, *, num_image_tokens: int, device: torch.device, dtype: torch.dtype,
                seed: int, real_vision: bool = False, max_seq_len: int = 4096, vision: Optional[dict] = None,
                image_token_id: Optional[int] = None):
    """A Llama-3.1-architecture :class:`MedcapModel` with random weights, built
    directly on ``device`` in ``dtype`` (an 8B model is never materialised in fp32
    on the host). ``real_vision`` gives BiomedCLIP's tower and the 4096-wide projector."""
    from torchtune.models.llama3_1 import llama3_1

    from medcap.models import biomedclip_tower, medcap_fusion, tiny_tower

    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            decoder = llama3_1(
                vocab_size=dims.vocab_size,
                num_layers=dims.num_layers,
                num_heads=dims.num_heads,
                num_kv_heads=dims.num_kv_heads,
                embed_dim=dims.embed_dim,
                max_seq_len=max_seq_len,
                intermediate_dim=dims.intermediate_dim,
            )
            if real_vision:
                visual, hidden = biomedclip_tower(None), 4096
            else:
                v = dict(image_size=32, patch_size=8, width=32, depth=2, heads=2, output_dim=24)
                v.update(vision or {})
                hidden = v.pop("projector_hidden", 64)
                visual = tiny_tower(**v)
            model = medcap_fusion(
                decoder=decoder,
                visual=visual,
                embed_dim=dims.embed_dim,
                num_image_tokens=num_image_tokens,
                projector_hidden_dim=hidden,
                image_token_id=dims.vocab_size if image_token_id is None else image_token_id,
            )
    finally:
        torch.set_default_dtype(prev)
    return model


def to_hf_llama(model, dims: LlamaDims, device: torch.device, dtype: torch.dtype, max_seq_len: int = 4096):
    """The same decoder weights as an HF ``LlamaForCausalLM``: torchtune names and
    the rotary q/k layout converted by ``torchtune.models.convert_weights.tune_to_hf``."""
    from torchtune.models.convert_weights import tune_to_hf
    from transformers import LlamaForCausalLM

    from medcap.models import hf_llama3_1_config

    cfg = hf_llama3_1_config(
        dims.vocab_size,
        num_layers=dims.num_layers,
        num_heads=dims.num_heads,
        num_kv_heads=dims.num_kv_heads,
        embed_dim=dims.embed_dim,
        intermediate_dim=dims.intermediate_dim,
        max_seq_len=max_seq_len,
    )
    cfg.dtype = dtype
    sd = {k[len("decoder."):]: v for k, v in model.state_dict().items() if k.startswith("decoder.")}
    hf_sd = tune_to_hf(sd, num_heads=dims.num_heads, num_kv_heads=dims.num_kv_heads, dim=dims.embed_dim)
    with torch.device("meta"):
        hf = LlamaForCausalLM(cfg)
    hf.load_state_dict(hf_sd, strict=True, assign=True)
    # non-persistent buffers (rotary inverse frequencies) are still on meta: rebuild them
    rope_cls = type(hf.model.rotary_emb)
    with torch.device(device):
        hf.model.rotary_emb = rope_cls(config=cfg)
    # weights already sit on ``device`` in ``dtype``; leave the rotary buffers in fp32
    return hf.eval()


# ---- tokenizers


def bench_tokenizer(out_dir: Path, model_vocab_size: int, max_seq_len: Optional[int] = None):
    """A Llama 3 tokenizer whose vocabulary fills ``model_vocab_size`` ids exactly
    (special tokens included) and whose ``<|image|>`` id is ``model_vocab_size``, as
    in Llama-3.1-8B (128,256). The merges are all byte pairs, then byte triples, in
    order: every id is reachable and decodes to bytes, so generated ids always decode."""
    from medcap.models import llama3_tokenizer, write_tiktoken_tokenizer
    from medcap.models import model_vocab_size as ids_with_specials  # the function; the argument shadows its name

    specials = ids_with_specials(0)
    want = model_vocab_size - specials - 256
    if want < 0:
        raise ValueError(f"model_vocab_size {model_vocab_size} is below the {256 + specials} ids a byte tokenizer needs")
    merges: List[bytes] = []
    for a in range(256):
        for b in range(256):
            if len(merges) == want:
                break
            merges.append(bytes([a, b]))
    a = b = c = 0
    while len(merges) < want:  # byte triples: pair + byte, all pairs already present
        merges.append(bytes([a, b, c]))
        c += 1
        if c == 256:
            c, b = 0, b + 1
            if b == 256:
                b, a = 0, a + 1
    paths = write_tiktoken_tokenizer(out_dir, merges)
    tok = llama3_tokenizer(str(paths["path"]), str(paths["special_tokens_path"]), max_seq_len=max_seq_len)
    assert tok.image_id == model_vocab_size, (tok.image_id, model_vocab_size)
    return tok
