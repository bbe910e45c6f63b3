"""bench/gpu.py, the one-command GPU benchmark: its CPU dry run (tiny sizes, the same
code path) runs here so the script cannot rot while no GPU is around; the short GPU
run is marked ``gpu``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _run(*args: str, timeout: int) -> dict:
    proc = subprocess.run([sys.executable, str(BENCH / "gpu.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=BENCH.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check(out: dict, batches) -> None:
    s = out["summary"]
    for b in batches:
        assert s["decode_tokens_per_s"][f"b{b}_eager"] > 0
    assert s["decode_tokens_per_s"]["b16_compiled"] > 0
    assert set(s["omnimedvqa_questions_per_s"]) == {"ours", "static", "reference"}
    assert s["omnimedvqa_continuous_vs_static_decode_passes"] > 0
    assert set(s["training_samples_per_s"]) == {"ours", "ours_grouped", "reference"}  # shipped settings; grouped by length
    assert s["outputs_match"] is True
    assert out["training_8b_config"]["sequence_lengths"]["max"] > 0


def test_gpu_bench_dry_run_on_cpu():
    out = _run("--dry-run", timeout=300)
    assert out["dry_run"] is True and out["device"] == "cpu"
    _check(out, (1, 16, 64))
    assert out["summary"]["training_8b_config_peak_memory_gb"] is None  # measured on CUDA only
    peer = out["summary"]["vllm_peer"]  # the vLLM backend's peer: measured where .venv-vllm exists, else why not
    assert set(peer["native"]["decode_tokens_per_s"]) == {"1", "2"} and peer["native"]["omnimedvqa_projected_hours"] > 0
    assert peer["vllm_available"] == ("vllm" in peer) and (peer["vllm_available"] or out["vllm_peer"]["vllm"]["reason"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_bench_short_on_a_gpu():
    out = _run("--short", timeout=1200)
    _check(out, (1, 16))
    s = out["summary"]
    assert s["training_8b_config_fits_80gb"] is True
    for frac in s["decode_fraction_of_bandwidth_roofline"].values():
        assert frac is None or 0 < frac < 1.0
