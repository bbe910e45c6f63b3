"""``medcap serve --backend vllm`` without vLLM: the server's own setup with the flag, its
decoding forwarded to a stand-in vLLM server (real HTTP, ``tests/fixtures/fake_vllm.py``),
answers the ``openai`` client as the native server does, plain, streamed and concurrent.
Against vLLM itself: ``tests/vllm_backend`` (``make test-vllm``)."""

from __future__ import annotations

import importlib.util
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.serve.conftest import LiveServer, serve_args

openai = pytest.importorskip("openai")

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, FIXTURES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


vt, fv = _load("vllm_tiny"), _load("fake_vllm")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return vt.recipe_assets(tmp_path_factory.mktemp("vllm_serve"))


@pytest.fixture(scope="module")
def servers(assets):
    """(native server, vLLM-backend server, the stand-in vLLM), each medcap serve's own setup."""
    from medcap.serve._app import create_app
    from medcap.serve._main import build_state
    from medcap.serve._vllm_worker import VllmWorker

    fake = fv.FakeVllm(vt.build(Path(assets["root"]) / "fake_llm", max_seq_len=vt.RECIPE_MAX_SEQ_LEN)["model"],
                       assets["llm_dir"]).start()
    native_state = build_state(serve_args(assets, "--max-context", "512"))
    with_url = {**assets, "overrides": [*assets["overrides"], f"vllm_url={fake.url}"]}
    vllm_state = build_state(serve_args(with_url, "--max-context", "512", "--backend", "vllm"))
    assert isinstance(vllm_state.worker, VllmWorker) and vllm_state.engine.client.url == fake.url
    with LiveServer(create_app(native_state, page=False)) as native, LiveServer(create_app(vllm_state, page=False)) as v:
        yield native, v, fake
    fake.stop()


def _client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_answers_equal_the_native_servers(servers, assets, data_url, image_message):
    native, vllm, fake = servers
    images = sorted((Path(assets["captions"]).parent / "images").glob("*.png"))
    asks = [image_message(data_url(images[0]), "What is shown?"), image_message(data_url(images[1])),
            [{"role": "user", "content": "Is there a lesion?"}]]
    for messages in asks:
        want = _client(native).chat.completions.create(model="medcap", messages=messages, temperature=0, max_tokens=20)
        got = _client(vllm).chat.completions.create(model="medcap", messages=messages, temperature=0, max_tokens=20)
        assert got.choices[0].message.content == want.choices[0].message.content
        assert (got.choices[0].finish_reason, got.usage.completion_tokens) == (
            want.choices[0].finish_reason, want.usage.completion_tokens)
        pieces = [c.choices[0].delta.content or "" for c in _client(vllm).chat.completions.create(
            model="medcap", messages=messages, temperature=0, max_tokens=20, stream=True) if c.choices]
        assert "".join(pieces) == want.choices[0].message.content
        assert len([p for p in pieces if p]) >= 2  # token by token, as vLLM streams them
    assert all(r["stream"] is True for r in fake.requests)  # plain answers are streamed from vLLM too


def test_concurrent_requests_and_health(servers, assets, data_url, image_message):
    import httpx

    native, vllm, _ = servers
    images = sorted((Path(assets["captions"]).parent / "images").glob("*.png"))
    asks = [image_message(data_url(images[i % len(images)]), f"Question {i}?") for i in range(6)]

    def ask(server, messages):
        r = _client(server).chat.completions.create(model="medcap", messages=messages, max_tokens=12, temperature=0)
        return r.choices[0].message.content

    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda m: ask(vllm, m), asks))
    assert together == [ask(native, m) for m in asks]
    health = httpx.get(f"{vllm.url}/health").json()
    assert health["status"] == "ok" and health["waiting"] == 0 and health["served"] >= 6


def test_sampled_requests_carry_their_seed(servers, data_url, image_message, assets):
    _, vllm, fake = servers
    messages = [{"role": "user", "content": "Say something."}]
    a = _client(vllm).chat.completions.create(model="medcap", messages=messages, temperature=1.0, seed=5, max_tokens=8)
    b = _client(vllm).chat.completions.create(model="medcap", messages=messages, temperature=1.0, seed=5, max_tokens=8)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert fake.requests[-1]["seed"] == 5 and fake.requests[-1]["temperature"] == 1.0


def test_vllm_failure_is_a_500_for_that_request(servers, monkeypatch):
    _, vllm, fake = servers
    monkeypatch.setattr(fake, "hidden", fake.hidden + 1)  # the stand-in now refuses every prompt's width
    with pytest.raises(openai.InternalServerError, match="vLLM answered 400"):
        _client(vllm).chat.completions.create(model="medcap", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=4)
