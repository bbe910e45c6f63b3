"""The server's log: one line per request (method, path, status, time, tokens), a
failed request one line, a server fault one traceback (never a second from uvicorn),
a client that leaves one line, a request cut by the shutdown counted."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from typing import List

import pytest

httpx = pytest.importorskip("httpx")

URL = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "hello"}]


class Lines(logging.Handler):
    """Every record of medcap's and uvicorn's loggers, formatted as the command prints them."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.records: List[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def text_lines(self, records) -> List[str]:
        return [line for r in records for line in self.format(r).splitlines()]

    def after(self, n: int, expect: int = 1, timeout: float = 10.0):
        """The records since the ``n``-th, once ``expect`` have come and nothing followed for 0.3 s."""
        deadline = time.monotonic() + timeout
        while len(self.records) - n < expect and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        return self.records[n:]


@pytest.fixture
def lines():
    handler = Lines()
    loggers = [logging.getLogger(name) for name in ("", "uvicorn", "uvicorn.error", "medcap")]
    for lg in loggers:
        lg.addHandler(handler)
    levels = {lg: lg.level for lg in loggers}
    logging.getLogger("medcap").setLevel(logging.INFO)
    try:
        yield handler
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
            lg.setLevel(levels[lg])


def _dedupe(records):
    """A record reaches the handler once per logger it is attached to on the way up."""
    seen, out = set(), []
    for r in records:
        if id(r) not in seen:
            seen.add(id(r))
            out.append(r)
    return out


def test_an_answer_is_one_line_with_method_path_status_time_and_tokens(start_guarded, lines):
    with start_guarded() as (server, _):
        n = len(lines.records)
        r = httpx.post(server.url + URL, json={"messages": HELLO, "max_tokens": 3}, timeout=60)
        got = _dedupe(lines.after(n))
    usage = r.json()["usage"]
    assert [x.name for x in got] == ["medcap.serve.access"]
    text = got[0].getMessage()
    assert '"POST /v1/chat/completions HTTP/1.1" 200 ' in text and text.startswith("127.0.0.1:")
    assert f"tokens {usage['prompt_tokens']}+{usage['completion_tokens']}" in text and " s, " in text


def _failures(server) -> list:
    """(name, a function that makes the failing request) for each kind of client error."""
    def post(body: bytes, content_type="application/json"):
        return lambda: httpx.post(server.url + URL, content=body, headers={"content-type": content_type}, timeout=60)

    return [
        ("malformed JSON", post(b'{"messages": [')),
        ("text/plain", post(json.dumps({"messages": HELLO}).encode(), "text/plain")),
        ("deep JSON", post(b"[" * 100_000)),
        ("seed 2**80", post(json.dumps({"messages": HELLO, "seed": 2**80}).encode())),
        ("unknown model", post(json.dumps({"model": "gpt-9", "messages": HELLO}).encode())),
        ("oversized body", post(b'{"messages": "' + b"x" * 500_000 + b'"}')),
        ("no such path", lambda: httpx.get(server.url + "/v2/nothing", timeout=60)),
    ]


def test_each_client_error_is_one_line(start_guarded, lines):
    with start_guarded() as (server, _):
        for name, make in _failures(server):
            n = len(lines.records)
            status = make().status_code
            got = _dedupe(lines.after(n))
            assert 400 <= status < 500, name
            assert len(lines.text_lines(got)) == 1, (name, lines.text_lines(got))
            assert f" {status} " in got[0].getMessage() and got[0].exc_info is None, name


def test_a_client_that_leaves_is_one_line_not_a_traceback(start_guarded, lines, monkeypatch):
    with start_guarded() as (server, state):
        worker = state.worker
        step = worker._step_all
        monkeypatch.setattr(worker, "_step_all", lambda: (time.sleep(0.2), step()))
        # 1. mid-stream
        n = len(lines.records)
        with httpx.stream("POST", server.url + URL, json={"messages": HELLO, "stream": True, "max_tokens": 60},
                          timeout=30) as r:
            next(r.iter_lines())
        got = _dedupe(lines.after(n))
        assert len(lines.text_lines(got)) == 1 and "client left before the end" in got[0].getMessage(), \
            lines.text_lines(got)
        # 2. while sending its body
        n = len(lines.records)
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"messages\": ")
        time.sleep(0.3)
        s.close()
        got = _dedupe(lines.after(n))
        assert len(lines.text_lines(got)) == 1 and "the client disconnected" in got[0].getMessage(), \
            lines.text_lines(got)


def test_a_server_fault_is_one_traceback_once(start_guarded, lines, monkeypatch):
    with start_guarded() as (server, state):
        def broken(_req):
            raise ZeroDivisionError("a bug")

        monkeypatch.setattr(state, "prepare", broken)
        n = len(lines.records)
        r = httpx.post(server.url + URL, json={"messages": HELLO}, timeout=60)
        got = _dedupe(lines.after(n))
    assert r.status_code == 500 and r.json()["error"]["message"] == "internal error: ZeroDivisionError"
    assert len(got) == 1 and got[0].exc_info is not None, lines.text_lines(got)
    text = "\n".join(lines.text_lines(got))
    assert text.count("Traceback") == 1 and "ZeroDivisionError: a bug" in text
    assert "Exception in ASGI application" not in text


def test_a_request_cut_by_the_drain_timeout_is_counted(start_guarded, lines, monkeypatch):
    with start_guarded("--drain-timeout", "0.5") as (server, state):
        monkeypatch.setattr(state.worker, "_admit", lambda: time.sleep(0.02))  # nothing is ever admitted
        t = threading.Thread(target=lambda: httpx.post(server.url + URL, json={"messages": HELLO}, timeout=30),
                             daemon=True)
        t.start()
        deadline = time.monotonic() + 10
        while state.worker.load()["waiting"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        n = len(lines.records)
        server.server.should_exit = True
        server.thread.join(timeout=30)
        got = _dedupe(lines.after(n, expect=1, timeout=5))
    assert state.access_counts.get("cut") == 1
    assert any("cut: the server stopped before it was answered" in r.getMessage() for r in got), lines.text_lines(got)
