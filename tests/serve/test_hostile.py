"""Bad and hostile requests get 4xx JSON errors while a good client keeps being served;
a full queue answers 503 with Retry-After; a client that leaves frees its place."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import pytest
from PIL import Image

httpx = pytest.importorskip("httpx")

URL = "/v1/chat/completions"


def _png(size, mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def _url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _hostile(image_bytes: bytes, image_message):
    """(name, body bytes, expected status) for every kind of bad request."""
    msg = lambda url, q=None: image_message(url, q)  # noqa: E731
    body = lambda **kw: json.dumps({"model": "medcap", **kw}).encode()  # noqa: E731
    good_url = _url(image_bytes)
    return [
        ("malformed JSON", b'{"messages": [', 400),
        ("not an object", b"[1, 2]", 400),
        ("no messages", body(messages=[]), 400),
        ("bad role", body(messages=[{"role": "root", "content": "hi"}]), 400),
        ("non-image", body(messages=msg(_url(b"hello, I am text"))), 400),
        ("PNG header, garbage after", body(messages=msg(_url(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4))), 400),
        ("truncated image", body(messages=msg(_url(image_bytes[: len(image_bytes) // 2]))), 400),
        ("decompression bomb", body(messages=msg(_url(_png((3000, 3000), "1")))), 400),  # 9 Mpx over 1 Mpx
        ("PNG sent as DICOM", body(messages=msg(_url(image_bytes, "application/dicom"))), 400),
        ("not base64", body(messages=msg("data:image/png;base64,@@@not-base64@@@")), 400),
        ("oversized body", body(messages=[{"role": "user", "content": "x" * 500_000}]), 413),
        ("two images in a message", body(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": good_url}}, {"type": "image_url", "image_url": {"url": good_url}}]}]),
         400),
        ("two images in two messages", body(messages=msg(good_url, "a") + [{"role": "assistant", "content": "b"}]
                                              + msg(good_url, "c")), 400),
        ("prompt longer than the model allows", body(messages=[{"role": "user", "content": "word " * 20_000}]), 400),
        ("absurd max_tokens", body(messages=msg(good_url), max_tokens=10**12), 400),
        ("negative max_tokens", body(messages=msg(good_url), max_tokens=-1), 400),
        ("max_tokens as text", body(messages=msg(good_url), max_tokens="many"), 400),
        ("temperature as text", body(messages=msg(good_url), temperature="hot"), 400),
        ("remote image URL", body(messages=msg("https://example.com/scan.png")), 400),
        ("a server path", body(messages=msg("/etc/passwd")), 400),
        ("a file URL", body(messages=msg("file:///etc/passwd")), 400),
        ("unknown model", json.dumps({"model": "gpt-9", "messages": msg(good_url)}).encode(), 404),
        ("n=3", body(messages=msg(good_url), n=3), 400),
    ]


def test_hostile_requests_get_4xx_while_a_good_client_is_served(served, serve_assets, image_message):
    server, state = served
    image = serve_assets["images"][0].read_bytes()
    good = {"model": "medcap", "messages": image_message(_url(image), "What is shown?"), "max_tokens": 10}
    expected = httpx.post(server.url + URL, json=good, timeout=60).json()["choices"][0]["message"]["content"]

    answers, stop = [], threading.Event()

    def good_client():
        with httpx.Client(base_url=server.url, timeout=60) as c:
            while not stop.is_set() or not answers:
                r = c.post(URL, json=good)
                answers.append((r.status_code, r.json()["choices"][0]["message"]["content"] if r.is_success else r.text))

    t = threading.Thread(target=good_client)
    t.start()
    failures = []
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            for name, raw, status in _hostile(image, image_message):
                r = c.post(URL, content=raw, headers={"content-type": "application/json"})
                err = r.json().get("error", {}) if r.headers.get("content-type", "").startswith("application/json") else {}
                if r.status_code != status or not err.get("message"):
                    failures.append(f"{name}: {r.status_code} {r.text[:200]}")
    finally:
        stop.set()
        t.join(timeout=60)
    assert not failures, failures
    assert answers and all(a == (200, expected) for a in answers), answers
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_error_messages_say_what_is_wrong(served, serve_assets, image_message):
    server, _ = served

    def error(messages, **kw):
        r = httpx.post(server.url + URL, json={"messages": messages, **kw}, timeout=60)
        return r.status_code, r.json()["error"]["message"]

    image = serve_assets["images"][0].read_bytes()
    assert "too large" in error(image_message(_url(_png((3000, 3000), "1"))))[1]
    assert "fetches no URL" in error(image_message("http://10.0.0.1/x.png"))[1]
    assert "one image" in error(image_message(_url(image)) + image_message(_url(image)))[1]
    assert "max_tokens must be between 1 and 64" in error(image_message(_url(image)), max_tokens=100)[1]
    assert "context" in error([{"role": "user", "content": "w " * 20_000}])[1]


def test_a_full_queue_answers_503_with_retry_after(served, serve_assets, image_message):
    server, state = served
    body = {"messages": image_message(_url(serve_assets["images"][0].read_bytes()))}
    limit = state.worker.queue_size
    state.worker.queue_size = 0  # every place taken
    try:
        r = httpx.post(server.url + URL, json=body, timeout=60)
        s = httpx.post(server.url + URL, json={**body, "stream": True}, timeout=60)
    finally:
        state.worker.queue_size = limit
    for resp in (r, s):
        assert resp.status_code == 503 and int(resp.headers["retry-after"]) >= 1, resp.text
        assert "busy" in resp.json()["error"]["message"]
    assert httpx.post(server.url + URL, json=body, timeout=60).status_code == 200


def _wait_for(cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_client_that_leaves_frees_its_place(served, serve_assets, image_message, monkeypatch):
    server, state = served
    worker = state.worker
    body = {"messages": image_message(_url(serve_assets["images"][0].read_bytes()), "What is shown?")}
    _wait_for(lambda: worker.load()["running"] == 0 and worker.load()["waiting"] == 0)

    # 1. it leaves while waiting: the worker admits nobody until the client has gone
    release = threading.Event()
    admit = worker._admit
    monkeypatch.setattr(worker, "_admit", lambda: admit() if release.is_set() else time.sleep(0.02))
    before = dict(worker.counts)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + URL, json=body, timeout=1.0)
    time.sleep(1.0)  # the server looks for its client every 0.25 s
    release.set()
    _wait_for(lambda: worker.counts["cancelled"] == before["cancelled"] + 1)
    assert worker.counts["served"] == before["served"]

    # 2. it leaves while its answer streams: slowed steps, the stream closed after the first event
    step = worker._step_all
    monkeypatch.setattr(worker, "_step_all", lambda: (time.sleep(0.3), step()))
    before = dict(worker.counts)
    with httpx.stream("POST", server.url + URL, json={**body, "stream": True, "max_tokens": 60}, timeout=30) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # the role chunk: the request is in the batch
    ended = lambda: worker.counts["cancelled"] + worker.counts["served"]  # noqa: E731
    _wait_for(lambda: ended() > before["cancelled"] + before["served"])
    assert worker.counts["cancelled"] == before["cancelled"] + 1
    _wait_for(lambda: worker.load()["running"] == 0)
