"""The vLLM path for real (``make test-vllm``, in .venv-vllm): a seeded tiny medcap model, its
LLM served by vLLM from prompt embeddings, against medcap's own engine on the same embeddings.

Skipped where vLLM does not import (the main environment)."""

from __future__ import annotations

import base64
import importlib.util
import json
import socket
import time
from pathlib import Path

import pytest
import torch

# vllm.version, not vllm: only the real package has it (a folder named vllm on sys.path once
# passed for it; this folder is named vllm_backend since).
pytest.importorskip("vllm.version", reason="vLLM is not installed here (make vllm, then make test-vllm)")

from medcap.generation import GenerationEngine  # noqa: E402
from medcap.generation._vllm import (  # noqa: E402
    SERVED_NAME,
    PromptEmbedsError,
    VllmError,
    encode_embeds,
    generate_tokens,
    prompt_embeds,
)
from medcap.generation._vllm_server import VllmServer  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.integration]

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
_spec = importlib.util.spec_from_file_location("vllm_tiny", FIXTURES / "vllm_tiny.py")
vt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vt)

LOGPROB_TOL = 1e-4  # float32 on both sides; observed differences are ~1e-6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    t = vt.build(tmp_path_factory.mktemp("vllm_tiny") / "llm")
    t["rows"] = vt.prompt_rows(t)
    t["embeds"] = [prompt_embeds(t["model"], r["tokens"], r["image"]) for r in t["rows"]]
    return t


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    log = tmp_path_factory.mktemp("vllm_log") / "server.log"
    srv = VllmServer(tiny["llm_dir"], dtype="float32", max_model_len=vt.SIZES["max_seq_len"],
                     env={"VLLM_CPU_KVCACHE_SPACE": "1"}, log_path=log)
    t0 = time.monotonic()
    srv.start()
    print(f"\nvLLM server ready in {time.monotonic() - t0:.1f} s at {srv.url}")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def native(tiny):
    rows = tiny["rows"]
    eng = GenerationEngine(tiny["model"], tiny["tokenizer"], batch_size=len(rows))
    return eng.generate_tokens([r["tokens"] for r in rows], [r["image"] for r in rows], vt.MAX_NEW_TOKENS,
                               [r["key"] for r in rows])


def _diff_report(a, b):
    """Rows whose tokens differ, with the first differing position."""
    out = []
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            pos = next((j for j, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
            out.append(f"row {i}: first difference at token {pos} (lengths {len(x)} vs {len(y)})")
    return out


def test_greedy_tokens_and_logprobs_equal_native(tiny, server, native):
    tok = tiny["tokenizer"]
    out = server.client(tok).complete(tiny["embeds"], max_tokens=vt.MAX_NEW_TOKENS, stop_token_ids=tok.stop_tokens,
                                      logprobs=vt.TOP_LOGPROBS)
    got = [c.tokens for c in out]
    diffs = _diff_report(native, got)
    print(f"\n{len(native) - len(diffs)}/{len(native)} rows token-identical; lengths {[len(t) for t in got]}; "
          f"finish {[c.finish_reason for c in out]}")
    assert not diffs, "vLLM and the native engine differ: " + "; ".join(diffs)
    assert {c.finish_reason for c in out} == {"stop", "length"}  # both ways of ending are covered
    worst = 0.0
    for e, c in zip(tiny["embeds"], out):
        ref = vt.native_logprobs(tiny["model"], e, c.tokens)  # [n, vocab]
        assert len(c.logprobs) == len(c.tokens)
        for j, step in enumerate(c.logprobs):
            assert max(step, key=step.get) == c.tokens[j]  # greedy: the top entry is the token
            for tid, lp in step.items():
                worst = max(worst, abs(float(ref[j, tid]) - lp))
    print(f"top-{vt.TOP_LOGPROBS} log-probs: max |vLLM - native| = {worst:.2e}")
    assert worst <= LOGPROB_TOL


def test_matches_committed_fixture(tiny, server):
    fixture = json.loads((FIXTURES / "vllm_greedy.json").read_text())
    assert fixture["weights_sha256"] == tiny["weights_sha256"]
    tok = tiny["tokenizer"]
    out = server.client(tok).complete(tiny["embeds"], max_tokens=fixture["max_new_tokens"],
                                      stop_token_ids=fixture["stop_token_ids"])
    assert [c.tokens for c in out] == [r["tokens"] for r in fixture["rows"]]


def test_generate_tokens_adapter_equals_native(tiny, server, native):
    rows = tiny["rows"]
    got = generate_tokens(server.client(), tiny["model"], [r["tokens"] for r in rows], [r["image"] for r in rows],
                          vt.MAX_NEW_TOKENS, [r["key"] for r in rows], stop_token_ids=tiny["tokenizer"].stop_tokens)
    assert got == native


def test_sampling_is_seeded_per_row(tiny, server):
    rows, tok = tiny["rows"], tiny["tokenizer"]
    args = dict(stop_token_ids=tok.stop_tokens, temperature=1.0, top_k=50)
    prompts, images, keys = [r["tokens"] for r in rows], [r["image"] for r in rows], [r["key"] for r in rows]
    a = generate_tokens(server.client(), tiny["model"], prompts, images, 16, keys, seed=7, **args)
    b = generate_tokens(server.client(), tiny["model"], prompts[::-1], images[::-1], 16, keys[::-1], seed=7, **args)
    assert b[::-1] == a  # a row's draw depends on its key, not on its batch or order
    c = generate_tokens(server.client(), tiny["model"], prompts, images, 16, keys, seed=8, **args)
    assert c != a  # another run seed draws other tokens
    greedy = server.client().complete(tiny["embeds"], max_tokens=16, stop_token_ids=tok.stop_tokens)
    assert [g.tokens for g in greedy] != a  # temperature 1 is not greedy
    no_cut = dict(args, top_k=None)  # sampling from the whole vocabulary (vLLM's top_k=0)
    d = generate_tokens(server.client(), tiny["model"], prompts, images, 16, keys, seed=7, **no_cut)
    assert d == generate_tokens(server.client(), tiny["model"], prompts, images, 16, keys, seed=7, **no_cut)


def test_server_refuses_wrong_width_and_keeps_serving(tiny, server):
    client = server.client()
    bad = {"model": SERVED_NAME, "prompt_embeds": encode_embeds(torch.zeros(5, 65)), "max_tokens": 2}
    with pytest.raises(VllmError, match="400.*hidden_size 65"):
        client._post(bad)  # past our own check: what vLLM does with it
    with pytest.raises(PromptEmbedsError, match="width 65"):  # ours refuses it before any call
        client.complete([torch.zeros(5, 65)], max_tokens=2, stop_token_ids=tiny["tokenizer"].stop_tokens)
    ok = client.complete(tiny["embeds"][:1], max_tokens=3, stop_token_ids=tiny["tokenizer"].stop_tokens)
    assert len(ok[0].tokens) >= 1


def test_openai_client_sends_embeddings(tiny, server, native):
    openai = pytest.importorskip("openai")
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    # prompt=None goes out as null: vLLM takes the embeddings alone ("" would need its tokenizer)
    r = c.completions.create(
        model=SERVED_NAME, prompt=None, max_tokens=vt.MAX_NEW_TOKENS, temperature=0.0,
        extra_body={"prompt_embeds": encode_embeds(tiny["embeds"][0]), "stop_token_ids": tiny["tokenizer"].stop_tokens,
                    "ignore_eos": True, "return_token_ids": True},
    )
    ids = (r.choices[0].model_extra or {}).get("token_ids") or getattr(r.choices[0], "token_ids", None)
    # vLLM's token_ids end with the stop id when a stop id ended the row; ours leave it out
    if r.choices[0].finish_reason == "stop":
        assert ids[-1] in tiny["tokenizer"].stop_tokens
        ids = ids[:-1]
    assert ids == native[0]


def test_wire_format_is_what_vllm_reads(tiny):
    from vllm.renderers.embed_utils import safe_load_prompt_embeds

    class _Cfg:  # the two things vLLM's loader asks of the model config
        enable_prompt_embeds = True
        dtype = torch.float32

        @staticmethod
        def get_hidden_size():
            return vt.SIZES["embed_dim"]

    e = tiny["embeds"][0]
    back = safe_load_prompt_embeds(_Cfg, encode_embeds(e, torch.bfloat16).encode())
    assert back.dtype == torch.float32 and back.shape == e.shape
    assert torch.equal(back, e.to(torch.bfloat16).float())
    assert torch.equal(safe_load_prompt_embeds(_Cfg, base64.b64encode(_saved(e))), e)


def _saved(t):
    import io

    buf = io.BytesIO()
    torch.save(t, buf)
    return buf.getvalue()


def test_start_failure_is_one_line(tiny, tmp_path):
    srv = VllmServer(tiny["llm_dir"], dtype="not-a-dtype", log_path=tmp_path / "bad.log", startup_timeout=300)
    with pytest.raises(VllmError) as e:
        srv.start()
    msg = str(e.value)
    assert "\n" not in msg and "exited with code" in msg and str(tmp_path / "bad.log") in msg
    assert srv.proc is None


def test_stop_ends_the_server(tiny, tmp_path):
    srv = VllmServer(tiny["llm_dir"], dtype="float32", max_model_len=vt.SIZES["max_seq_len"],
                     env={"VLLM_CPU_KVCACHE_SPACE": "1"}, log_path=tmp_path / "s.log")
    with srv:
        pid, port = srv.proc.pid, srv.port
    assert srv.proc is None
    with pytest.raises(ProcessLookupError):
        import os

        os.killpg(pid, 0)  # the whole process group is gone
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
