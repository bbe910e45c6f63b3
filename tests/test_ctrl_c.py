"""Ctrl-C is one line and exit status 130 in every command that works for a while: the
real command on the tiny model, started in a session of its own, sent SIGINT (to its
whole process group, as a terminal sends it) once it is visibly at work; and a refusal
deep in a run (a results folder holding another model's files) is one line, exit 2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]  # a fresh Python importing torch per command

SAMPLES = 40  # enough rows that a run is still working when the signal lands
SLOW_ROWS = ["batch_size=1", "max_new_tokens=48"]  # one row at a time, each ~48 decode steps


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The tiny LLM, 40 captioned images and two vision checkpoints (two "models")."""
    import torch

    from medcap.models import medcap_tiny, save_vision_checkpoint
    from medcap.testing import make_tiny_training_assets

    root = tmp_path_factory.mktemp("ctrl_c")
    a = make_tiny_training_assets(root, samples=SAMPLES)
    ckpts = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        ckpts.append(root / f"model{seed}" / "meta_model_last.pt")
        save_vision_checkpoint(medcap_tiny(**a["model_kwargs"], num_image_tokens=4), ckpts[-1])
    return {**a, "ckpts": [str(c) for c in ckpts], "images": str(root / "data" / "images")}


def _start(args, **kw) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("MEDCAP_LLM", None)
    env.pop("MEDCAP_DEBUG", None)
    return subprocess.Popen([sys.executable, "-m", "medcap.cli", *args], stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True, **kw)


def _ctrl_c(proc: subprocess.Popen):
    """SIGINT to the command's process group; (exit status, the rest of its stderr)."""
    try:
        assert proc.poll() is None, "the command ended before it was interrupted"
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, err


def _assert_one_stopped_line(rc: int, err: str, prog: str) -> str:
    assert rc == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"{prog}: stopped (Ctrl-C)"), err[-3000:]
    return last


def test_ctrl_c_in_caption_is_one_line_exit_130(assets):
    proc = _start(["caption", assets["images"], "--config", "tiny/generate", f"assets_dir={assets['assets_dir']}",
                   "--checkpoint", assets["ckpts"][0], "--batch-size", "1", "max_new_tokens=48"],
                  stdout=subprocess.PIPE)
    first = proc.stdout.readline()  # the first image's caption: it is at work
    assert first.startswith(os.path.join(assets["images"], "img_0000.png") + ": "), first
    rc, err = _ctrl_c(proc)
    _assert_one_stopped_line(rc, err, "medcap caption")


def test_ctrl_c_in_chat_is_one_line_exit_130(assets):
    proc = _start(["chat", os.path.join(assets["images"], "img_0001.png"), "--config", "tiny/generate",
                   f"assets_dir={assets['assets_dir']}", "--checkpoint", assets["ckpts"][0]],
                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    proc.stdin.write("What is shown?\n")
    proc.stdin.flush()
    reply = proc.stdout.readline()  # answered; now it waits for the next question
    assert reply.startswith("ASSISTANT: "), reply
    rc, err = _ctrl_c(proc)
    _assert_one_stopped_line(rc, err, "medcap chat")


def _generate_args(assets, out: Path, ckpt: str):
    return ["run", "generate", "--config", "tiny/generate", f"assets_dir={assets['assets_dir']}",
            f"output_dir={out}", f"vision_checkpoint={ckpt}", "test_metrics=True", "progress=False",
            "chunk_size=1", *SLOW_ROWS]


def test_ctrl_c_in_run_generate_is_one_line_exit_130_and_keeps_the_rows(assets, tmp_path):
    """Ctrl-C mid-run: one line, the rows made so far kept. Then another model's run into the
    same folder (likely: every run's last checkpoint is called meta_model_last) meets those
    rows and is refused in one line with exit status 2, the files untouched."""
    from medcap.eval._results import read_csv_rows

    partial = tmp_path / "metrics-raw-meta_model_last.partial.csv"
    proc = _start(_generate_args(assets, tmp_path, assets["ckpts"][0]), stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if partial.exists() and len(read_csv_rows(partial)) >= 1:  # a row on disk: it is at work
            break
        time.sleep(0.05)
    rc, err = _ctrl_c(proc)
    last = _assert_one_stopped_line(rc, err, "medcap run")
    assert "the same command continues" in last
    kept = partial.read_bytes()
    assert 1 <= len(read_csv_rows(partial)) < SAMPLES and not (tmp_path / "metrics-raw-meta_model_last.csv").exists()

    other = subprocess.run([sys.executable, "-m", "medcap.cli", *_generate_args(assets, tmp_path, assets["ckpts"][1])],
                           capture_output=True, text=True, timeout=300)
    assert other.returncode == 2, other.stderr[-3000:]
    assert "Traceback" not in other.stderr
    last = other.stderr.strip().splitlines()[-1]
    assert last.startswith(f"medcap run: error: {partial} was made by another model or with other settings"), last
    assert "vision_checkpoint" in last and "overwrite=True" in last
    assert partial.read_bytes() == kept
