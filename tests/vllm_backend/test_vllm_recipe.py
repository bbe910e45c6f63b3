"""``backend=vllm`` for real (``make test-vllm``, in .venv-vllm): the seeded tiny model (head
size 32, as vLLM's CPU attention needs) through ``medcap run generate backend=vllm`` for
captions, VQA-RAD and OmniMedVQA in every ``vqa_type``, a run killed under vLLM and finished
natively, ``medcap serve --backend vllm`` against the native server with the ``openai``
client, and the benchmark's vLLM peer. Greedy files must equal the native backend's byte for
byte (the resolved config aside, which records the backend).

Skipped where vLLM does not import (the main environment)."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm.version", reason="vLLM is not installed here (make vllm, then make test-vllm)")

from medcap.eval import read_csv_rows  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
_spec = importlib.util.spec_from_file_location("vllm_tiny", FIXTURES / "vllm_tiny.py")
vt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vt)

VQA_TYPES = ("no_cond_desc", "no_cond_desc_no_image", "cond_desc", "cond_desc_no_image", "omit")
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return vt.recipe_assets(tmp_path_factory.mktemp("vllm_lane"))


@pytest.fixture(scope="module")
def server(assets, tmp_path_factory):
    """One vLLM server for the runs that name it (vllm_url=...); the documented commands start their own."""
    from medcap.generation._vllm_server import VllmServer

    srv = VllmServer(assets["llm_dir"], dtype="float32", max_model_len=vt.RECIPE_MAX_SEQ_LEN, env=ENV,
                     log_path=tmp_path_factory.mktemp("vllm_log") / "server.log")
    srv.start()
    yield srv
    srv.stop()


def _cmd(assets, out, *args):
    return [sys.executable, "-m", "medcap.cli", "run", "generate", "--config", "tiny/generate", *assets["overrides"],
            f"output_dir={out}", "progress=False", "batch_size=4", *args]


def _run(assets, out, *args, timeout=900):
    done = subprocess.run(_cmd(assets, out, *args), capture_output=True, text=True, env=ENV, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _files(folder: Path):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if not p.name.endswith((".config.yaml", ".lock"))}  # these hold the backend, the lock holder's PID


def _differences(a: Path, b: Path):
    """Per file that differs: the rows (by line) whose bytes differ, to say where and how many."""
    fa, fb = _files(a), _files(b)
    out = {}
    for name in sorted(set(fa) | set(fb)):
        if fa.get(name) != fb.get(name):
            la, lb = (fa.get(name) or b"").splitlines(), (fb.get(name) or b"").splitlines()
            out[name] = [i for i in range(max(len(la), len(lb))) if la[i:i + 1] != lb[i:i + 1]][:10]
    return out


def _server_pid(stderr: str) -> int:
    return int(re.search(r"vLLM: server pid (\d+) ready", stderr).group(1))


def _gone(pid: int, within: float = 60.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def test_documented_command_writes_the_native_files(assets, tmp_path):
    """`medcap run generate ... backend=vllm` starts vLLM's server, writes VQA-RAD and
    OmniMedVQA, and stops the server when it ends."""
    suites = ["test_vqarad=True", "test_omnimedvqa=True", "vqa_type=no_cond_desc", f"dataset_source={assets['datasets']}"]
    _run(assets, tmp_path / "native", *suites)
    done = _run(assets, tmp_path / "vllm", *suites, "backend=vllm")
    assert _differences(tmp_path / "vllm", tmp_path / "native") == {}
    assert len(_files(tmp_path / "native")) >= 8
    assert "vLLM: server stopped" in done.stderr and _gone(_server_pid(done.stderr), 5)


@pytest.mark.parametrize("suites", [("test_metrics=True",)] + [("test_omnimedvqa=True", f"vqa_type={t}")
                                                              for t in VQA_TYPES[1:]])
def test_every_suite_and_vqa_type_writes_the_native_files(assets, server, tmp_path, suites):
    source = assets["captions"] if "test_metrics=True" in suites else assets["datasets"]
    _run(assets, tmp_path / "native", *suites, f"dataset_source={source}")
    _run(assets, tmp_path / "vllm", *suites, f"dataset_source={source}", "backend=vllm", f"vllm_url={server.url}")
    assert _differences(tmp_path / "vllm", tmp_path / "native") == {}


def test_killed_under_vllm_finished_natively(assets, tmp_path):
    """SIGKILL to the run: its vLLM server dies with it; the native backend finishes the file."""
    args = ["test_omnimedvqa=True", "vqa_type=omit", f"dataset_source={assets['datasets']}", "chunk_size=1",
            "batch_size=1"]
    _run(assets, tmp_path / "ref", *args)
    out = tmp_path / "run"
    log = tmp_path / "stderr.log"
    partial = out / "omnimedvqa-omit-raw-meta_model_last-0_50.partial.csv"
    with open(log, "w") as err:
        proc = subprocess.Popen(_cmd(assets, out, *args, "backend=vllm"), stdout=subprocess.DEVNULL, stderr=err,
                                env=ENV, start_new_session=True)
        try:
            deadline = time.time() + 900
            while time.time() < deadline and proc.poll() is None:
                if partial.exists() and len(read_csv_rows(partial)) >= 2:
                    break
                time.sleep(0.02)
            assert proc.poll() is None, log.read_text()[-3000:]
            os.killpg(proc.pid, signal.SIGKILL)  # no cleanup runs: only the parent-death signal stops vLLM
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert _gone(_server_pid(log.read_text()))
    assert 2 <= len(read_csv_rows(partial))
    done = _run(assets, out, *args)
    assert "resuming with" in done.stderr
    assert _differences(out, tmp_path / "ref") == {}


def _serve(assets, *flags):
    cmd = [sys.executable, "-m", "medcap.cli", "serve", "--config", "tiny/generate", *assets["overrides"], "--port", "0",
           "--max-context", "512", *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 900
    for line in proc.stdout:
        m = re.search(r"listening on (http://127\.0\.0\.1:\d+)/", line)
        if m:
            return proc, m.group(1)
        assert time.time() < deadline
    raise AssertionError(proc.stderr.read()[-3000:])


def _image_message(path: Path, question=None):
    url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]
             + ([{"type": "text", "text": question}] if question else [])}]


def test_serve_backend_vllm_answers_the_openai_client_as_the_native_server(assets):
    import openai

    images = sorted((Path(assets["captions"]).parent / "images").glob("*.png"))
    asks = [_image_message(images[0], "What is shown?"), _image_message(images[1]),
            [{"role": "user", "content": "Is there a lesion?"}]]
    native, native_url = _serve(assets)
    vllm, vllm_url = _serve(assets, "--backend", "vllm")
    try:
        for messages in asks:
            want, got = (openai.OpenAI(base_url=u + "/v1", api_key="x").chat.completions.create(
                model="medcap", messages=messages, temperature=0, max_tokens=24) for u in (native_url, vllm_url))
            assert got.choices[0].message.content == want.choices[0].message.content
            stream = openai.OpenAI(base_url=vllm_url + "/v1", api_key="x").chat.completions.create(
                model="medcap", messages=messages, temperature=0, max_tokens=24, stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want.choices[0].message.content
    finally:
        for p in (native, vllm):
            p.send_signal(signal.SIGTERM)
        err = vllm.communicate(timeout=120)[1]
        native.communicate(timeout=60)
    assert _gone(_server_pid(err), 30)


def test_the_benchmarks_vllm_peer_runs(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "bench" / "vllm_peer.py"), "--quick"], capture_output=True,
                          text=True, env=ENV, timeout=1200, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["vllm"]["available"] and out["outputs_match"] is True
    assert {"native_b1", "native_b2", "vllm_b1", "vllm_b2"} <= set(out["figures"])
    assert out["vllm_figures"]["omnimedvqa"]["projected_hours"] > 0
