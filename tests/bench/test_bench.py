"""The benchmarks run and print one valid JSON object last (``--quick`` sizes), and
the helpers their figures rest on count what they claim to count. No timing is
asserted: speed goals are read from the benchmarks' output, never tested."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import _common  # noqa: E402


def _run(script: str, *args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", *args],
        capture_output=True, text=True, timeout=600, cwd=BENCH.parent,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    return json.loads(last)


@pytest.mark.slow
@pytest.mark.parametrize("script, ratios", [
    ("generation.py", {"ours_b3_vs_reference", "ours_b1_vs_hf_b1", "ours_b3_vs_hf_b3",
                       "continuous_vs_static_decode_passes", "continuous_vs_static_wall"}),
    ("eval_omnimedvqa.py", {"ours_vs_hf_static", "ours_vs_hf_cb", "continuous_vs_static_decode_passes",
                            "continuous_vs_static_wall"}),
    ("train_step.py", {"ours_vs_reference_samples_per_s", "ours_grouped_vs_reference_samples_per_s"}),
])
def test_bench_quick_prints_json(script, ratios):
    # the eval bench's peers without vLLM (its server takes a minute to start; run it with make bench)
    out = _run(script, *(["--engines", "ours,static,hf_static,hf_cb,reference"] if script.startswith("eval") else []))
    assert ratios <= set(out["ratios"])
    assert all(isinstance(v, (int, float)) and v > 0 for v in out["ratios"].values())
    assert out["outputs_match"] is True, out
    assert out["settings"] and out["figures"]


def test_analytic_params_match_a_built_decoder():
    """The per-token weight count equals the real decoder's Linear weights."""
    dims = _common.LlamaDims(vocab_size=300, embed_dim=64, num_layers=3, num_heads=4, num_kv_heads=2,
                             intermediate_dim=96)
    from torchtune.models.llama3_1 import llama3_1

    dec = llama3_1(vocab_size=dims.vocab_size, num_layers=dims.num_layers, num_heads=dims.num_heads,
                   num_kv_heads=dims.num_kv_heads, embed_dim=dims.embed_dim, max_seq_len=64,
                   intermediate_dim=dims.intermediate_dim)
    layer_linear = sum(m.weight.numel() for layer in dec.layers for m in layer.modules()
                       if isinstance(m, torch.nn.Linear))
    assert dims.body_matmul_params() == layer_linear
    assert dims.output_params() == dec.output.weight.numel()
    norms = sum(p.numel() for n, p in dec.named_parameters() if "norm" in n)
    assert dims.norm_params() == norms
    assert _common.decode_weight_bytes(dims, 2) == 2 * (layer_linear + dec.output.weight.numel() + norms)


def test_llama3_1_8b_counts():
    d = _common.LLAMA3_1_8B
    # Llama-3.1-8B: 8.03 B parameters = body + norms + output + embedding (128256 x 4096)
    total = d.body_matmul_params() + d.norm_params() + 2 * d.output_params()
    assert abs(total - 8.03e9) < 0.01e9
    # the projection's share of the matmul weights one token meets: ~7 %
    share = d.output_params() / (d.output_params() + d.body_matmul_params())
    assert 0.065 < share < 0.075
    flops = _common.frozen_llm_step_flops(d, _common.BIOMEDCLIP_VISION, [(1, 256, 256)])
    assert 0.06 < flops["vocab_share"] < 0.075
    # ViT-B/16 at 224 px: ~17.6 G multiply-adds (35 GFLOP) + the projector's ~1.7 GFLOP
    assert 34e9 < _common.BIOMEDCLIP_VISION.forward_flops() < 39e9


def test_peak_memory_sees_a_temporary_tensor():
    _common.configure_cpu_allocator()
    device = torch.device("cpu")
    with _common.PeakMemory(device) as pm:
        x = torch.ones(16 * 2**20)  # 64 MiB, touched
        del x
    if pm.peak_bytes is None:
        pytest.skip("no /proc/self/clear_refs here")
    assert 60 * 2**20 <= pm.peak_bytes < 200 * 2**20
    with _common.PeakMemory(device) as pm2:
        y = torch.ones(1024)
        del y
    assert pm2.peak_bytes < 32 * 2**20  # the 64 MiB went back to the OS


def test_bench_tokenizer_fills_the_vocabulary(tmp_path):
    tok = _common.bench_tokenizer(tmp_path, 1000)
    assert tok.image_id == 1000
    assert max(tok.stop_tokens) < 1000 and tok.pad_id < 1000
    # every id below the specials decodes (generated ids always become text)
    for i in (0, 255, 256, 700, 1000 - 13):
        assert isinstance(tok.decode([i]), str)


@pytest.mark.slow
def test_run_all_quick_writes_each_bench_s_json(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "run_all.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=BENCH.parent,
                          env={**__import__("os").environ, "MEDCAP_VLLM_PYTHON": "/nonexistent"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval_omnimedvqa.json", "train_step.json"]
    assert "serve skipped: it needs --demo DIR" in proc.stderr
    ev = json.loads((tmp_path / "eval_omnimedvqa.json").read_text())
    assert ev["command"].startswith("python bench/eval_omnimedvqa.py --quick")
    assert ev["cells"][0]["not_run"]["vllm"].startswith("not run")
