"""Safe defaults: loopback unless told otherwise, another address only with a key,
and the key checked as a Bearer token."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

openai = pytest.importorskip("openai")


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "::", "example.com"])
def test_a_non_loopback_bind_without_a_key_is_refused(serve_assets, host):
    env = {k: v for k, v in os.environ.items() if k != "MEDCAP_API_KEY"}
    res = subprocess.run(
        [sys.executable, "-m", "medcap.cli", "serve", "--config", "tiny/generate", *serve_assets["overrides"],
         "--host", host, "--port", "0"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert res.returncode == 2, res.stderr
    assert "API key" in res.stderr and "--api-key" in res.stderr and "MEDCAP_API_KEY" in res.stderr
    assert "listening" not in res.stdout


def test_which_addresses_count_as_loopback():
    from medcap.serve._main import UserError, check_bind

    for host in ("127.0.0.1", "127.0.0.5", "::1", "localhost"):
        check_bind(host, None)
    for host in ("0.0.0.0", "10.1.2.3", "::", "my-host"):
        with pytest.raises(UserError, match="API key"):
            check_bind(host, None)
        check_bind(host, "a-key")  # allowed with a key


def test_the_key_is_checked_as_a_bearer_token(start_server, monkeypatch):
    import httpx

    with start_server("--api-key", "s3cret") as (server, _):
        def client(key):
            return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=60)

        messages = [{"role": "user", "content": "hello"}]
        for wrong in ("wrong", "s3cret-not", "S3CRET"):
            with pytest.raises(openai.AuthenticationError):
                client(wrong).chat.completions.create(model="medcap", messages=messages, max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            client("wrong").models.list()
        r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": messages})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert client("s3cret").chat.completions.create(model="medcap", messages=messages, max_tokens=2).choices
        assert httpx.get(f"{server.url}/health").status_code == 200  # for load balancers, no key
