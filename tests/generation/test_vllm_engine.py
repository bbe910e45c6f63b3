"""The vLLM backend's engine and server process, without vLLM.

- ``VllmEngine`` (``GenerationEngine``'s interface) against a stand-in vLLM server (real
  HTTP, ``tests/fixtures/fake_vllm.py``) that replays vLLM's own recorded answers
  (``vllm_greedy.json``: response and stream as vLLM sent them) and decodes other prompts;
- ``VllmServer``'s start, stop and death with its parent, on a stand-in ``vllm`` package
  whose API server serves ``/health`` and holds a child of its own, as vLLM's engine is;
  and a start without vLLM, refused in one line.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from medcap.generation import GenerationEngine, VllmEngine, VllmError
from medcap.generation._sampling import row_seed
from medcap.generation._vllm import VllmClient, llm_folder, prompt_embeds, prompt_embeds_batch
from medcap.generation._vllm_engine import BackendError, keep_embedding_side
from medcap.generation._vllm_server import VllmServer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, FIXTURES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


vt, fv = _load("vllm_tiny"), _load("fake_vllm")


@pytest.fixture(scope="module")
def recorded():
    return json.loads((FIXTURES / "vllm_greedy.json").read_text())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    t = vt.build(tmp_path_factory.mktemp("vllm_engine") / "llm")
    t["rows"] = vt.prompt_rows(t)
    return t


@pytest.fixture(scope="module")
def fake(tiny, recorded):
    embeds = [prompt_embeds(tiny["model"], r["tokens"], r["image"]) for r in tiny["rows"]]
    replay = [(e, recorded["max_new_tokens"], row) for e, row in zip(embeds, recorded["rows"])]
    server = fv.FakeVllm(tiny["model"], tiny["llm_dir"], replay=replay).start()
    yield server
    server.stop()


def _engine(tiny, fake, **kw):
    client = VllmClient.connect(fake.url, llm_folder(tiny["llm_dir"]), tokenizer=tiny["tokenizer"])
    return VllmEngine(tiny["model"], tiny["tokenizer"], client, **kw)


def _args(rows, n=None):
    return [r["tokens"] for r in rows], [r["image"] for r in rows], n or vt.MAX_NEW_TOKENS, [r["key"] for r in rows]


# ---- vLLM's recorded answers, read by the engine


def test_the_engine_reads_vllms_recorded_answers(tiny, fake, recorded, one_thread):
    before = fake.replayed
    got = _engine(tiny, fake, batch_size=4).generate_tokens(*_args(tiny["rows"], recorded["max_new_tokens"]))
    assert fake.replayed - before == 4  # every answer was vLLM's own bytes
    assert got == [r["tokens"] for r in recorded["rows"]]  # the stop id vLLM appends is left out
    assert any(r["response"]["choices"][0]["token_ids"][-1] in recorded["stop_token_ids"] for r in recorded["rows"])
    sent = fake.requests[-4:]
    assert all(s["stop_token_ids"] == recorded["stop_token_ids"] and s["ignore_eos"] and s["return_token_ids"]
               and (s["temperature"], s["top_k"]) == (0.0, 1) and "prompt" not in s for s in sent)


def test_a_stream_reads_vllms_recorded_events(tiny, fake, recorded):
    client = VllmClient.connect(fake.url, llm_folder(tiny["llm_dir"]))
    for r, rec in zip(tiny["rows"], recorded["rows"]):
        with client.stream(prompt_embeds(tiny["model"], r["tokens"], r["image"]), max_tokens=recorded["max_new_tokens"],
                           stop_token_ids=recorded["stop_token_ids"]) as stream:
            pieces = list(stream)
        assert sum(pieces, []) == rec["tokens"] and stream.finish_reason == rec["finish_reason"]
        assert len(pieces) == len(rec["stream"]) - (rec["finish_reason"] == "stop")  # the stop id's event is empty


def test_the_engine_writes_the_native_engines_texts(tiny, fake, one_thread):
    """Other prompts are decoded by the stand-in without a cache; budgets of 0 post nothing."""
    rows = tiny["rows"] * 2
    keys = [f"k{i}" for i in range(len(rows))]
    budgets = [6, 0, 9, 3, 12, 5, 0, 7]
    native = GenerationEngine(tiny["model"], tiny["tokenizer"], batch_size=3)
    prompts, images = [r["tokens"] for r in rows], [r["image"] for r in rows]
    before = len(fake.requests)
    got = _engine(tiny, fake, batch_size=3).generate_texts(prompts, images, budgets, keys)
    assert got == native.generate_texts(prompts, images, budgets, keys)
    assert len(fake.requests) - before == 6 and [got[1], got[6]] == ["", ""]


def test_sampled_rows_carry_their_own_seed(tiny, fake, one_thread):
    eng = _engine(tiny, fake, temperature=0.8, top_k=20, seed=3)
    prompts, images, _, keys = _args(tiny["rows"])
    a = eng.generate_tokens(prompts, images, 8, keys)
    assert sorted(r["seed"] for r in fake.requests[-4:]) == sorted(row_seed(3, k) for k in keys)  # posted at once
    assert eng.generate_tokens(prompts[::-1], images[::-1], 8, keys[::-1])[::-1] == a  # not the batch, the key


def test_embeddings_in_a_batch_equal_one_by_one(tiny):
    rows = tiny["rows"]
    batch = prompt_embeds_batch(tiny["model"], [r["tokens"] for r in rows], [r["image"] for r in rows])
    for r, e in zip(rows, batch):
        assert torch.allclose(e, prompt_embeds(tiny["model"], r["tokens"], r["image"]), atol=1e-6)


def test_what_vllm_cannot_do_is_refused(tiny, fake):
    with pytest.raises(BackendError, match="needs backend=native"):
        _engine(tiny, fake).score_options([[1]], [None], [["yes"]])


def test_connect_names_what_the_server_serves(tiny, fake, tmp_path):
    other = vt.build(tmp_path / "other")
    with pytest.raises(VllmError, match=r"serves medcap-llm \(.*\), not .*other"):
        VllmClient.connect(fake.url, llm_folder(other["llm_dir"]))
    with pytest.raises(VllmError, match="no vLLM server answers at http://127.0.0.1:9") as e:
        VllmClient.connect("http://127.0.0.1:9", llm_folder(tiny["llm_dir"]))
    assert "\n" not in str(e.value)


def test_a_refused_prompt_is_one_line(tiny, fake, monkeypatch):
    monkeypatch.setattr(fake, "hidden", 65)  # the stand-in now expects another width, as vLLM would refuse it
    with pytest.raises(VllmError, match=r"vLLM answered 400: prompt_embeds must be of shape") as e:
        _engine(tiny, fake).generate_tokens(*_args(tiny["rows"][:1], 3))
    assert "\n" not in str(e.value)


def test_medcap_keeps_the_embedding_side(tiny, tmp_path):
    t = vt.build(tmp_path / "llm")
    r = vt.prompt_rows(t)[0]
    before = prompt_embeds(t["model"], r["tokens"], r["image"])
    freed = keep_embedding_side(t["model"])
    assert len(t["model"].decoder.layers) == 0 and freed > 0
    assert torch.equal(prompt_embeds(t["model"], r["tokens"], r["image"]), before)


# ---- the server process, on a stand-in vllm package


FAKE_API_SERVER = textwrap.dedent('''
    import argparse, http.server, signal, subprocess, sys
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int)
    args, _ = p.parse_known_args()
    engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # vLLM's engine process
    def stop(*_):
        engine.terminate()
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
        def log_message(self, *a):
            pass
    print("engine", engine.pid, flush=True)
    http.server.HTTPServer(("127.0.0.1", args.port), H).serve_forever()
''')


@pytest.fixture
def fake_vllm_package(tmp_path):
    pkg = tmp_path / "site" / "vllm" / "entrypoints" / "openai"
    pkg.mkdir(parents=True)
    for d in (pkg, pkg.parent, pkg.parent.parent):
        (d / "__init__.py").write_text("")
    (pkg / "api_server.py").write_text(FAKE_API_SERVER)
    return {"PYTHONPATH": str(tmp_path / "site")}


def _gone(pid: int, within: float = 20.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def _engine_pid(log: Path) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines() if log.exists() else []:
            if line.startswith("engine "):
                return int(line.split()[1])
        time.sleep(0.1)
    raise AssertionError(log.read_text())


def test_stop_ends_the_whole_process_group(tiny, tmp_path, fake_vllm_package):
    srv = VllmServer(tiny["llm_dir"], env=fake_vllm_package, log_path=tmp_path / "s.log", startup_timeout=60)
    with srv:
        pid, engine = srv.proc.pid, _engine_pid(tmp_path / "s.log")
        assert "--enable-prompt-embeds" in srv.args and "--skip-tokenizer-init" in srv.args
    assert srv.proc is None and _gone(pid, 1) and _gone(engine, 1)


def test_the_server_dies_with_a_killed_medcap(tiny, tmp_path, fake_vllm_package):
    """SIGKILL leaves no cleanup to run: the child's parent-death signal stops it."""
    code = textwrap.dedent(f"""
        import sys, time
        from medcap.generation._vllm_server import VllmServer
        srv = VllmServer({tiny['llm_dir']!r}, env={fake_vllm_package!r}, log_path={str(tmp_path / 'k.log')!r})
        srv.start()
        print(srv.proc.pid, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    try:
        server_pid = int(parent.stdout.readline())
        engine = _engine_pid(tmp_path / "k.log")
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        assert _gone(server_pid) and _gone(engine)
    finally:
        if parent.poll() is None:
            parent.kill()


def test_a_start_without_vllm_is_one_line(tiny, tmp_path):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    srv = VllmServer(tiny["llm_dir"], log_path=tmp_path / "bad.log", startup_timeout=60)
    with pytest.raises(VllmError, match=r"exited with code 1 while starting: .*No module named 'vllm'") as e:
        srv.start()
    assert "\n" not in str(e.value) and str(tmp_path / "bad.log") in str(e.value) and srv.proc is None


def test_a_llama_folder_without_architectures_is_served_as_llama(tiny, tmp_path):
    """transformers writes no "architectures" for a LlamaConfig saved alone (the demo's LLM):
    vLLM is told what it is rather than refusing the folder."""
    import shutil

    folder = tmp_path / "llm"
    shutil.copytree(tiny["llm_dir"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg.pop("architectures") == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    (folder / "config.json").write_text(json.dumps(cfg))
    assert llm_folder(folder).architecture_given is False
    args = VllmServer(folder).args
    assert args[args.index("--hf-overrides") + 1] == '{"architectures": ["LlamaForCausalLM"]}'
    assert "--hf-overrides" not in VllmServer(tiny["llm_dir"]).args
