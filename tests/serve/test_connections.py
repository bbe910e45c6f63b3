"""Slow, idle and many clients cannot starve the server: a request's headers and body
have deadlines, connections have a cap that fits the open-file limit (the oldest
connection not being answered makes room, else 503 at once), the port is checked
before the model loads, and SIGTERM drains and exits 0."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

HALF_SENT = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: appli"
HELLO = [{"role": "user", "content": "hello"}]


def _closed_by_server(sock: socket.socket, within: float) -> bool:
    """True when the server closes ``sock`` (EOF or reset) within ``within`` seconds."""
    sock.settimeout(within)
    try:
        while sock.recv(4096):
            pass
        return True
    except socket.timeout:
        return False
    except OSError:
        return True


def _half_sent(port: int, n: int):
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(HALF_SENT)
        socks.append(s)
    return socks


# ---- the real command, under a low open-file limit


@contextlib.contextmanager
def _serve_process(serve_assets, log_path, *flags, nofile=None):
    """``medcap serve`` on a free loopback port in a subprocess (its open-file limit
    ``nofile``, soft and hard), its log in ``log_path``; stopped by SIGTERM at the end."""
    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    cmd = [sys.executable, "-m", "medcap.cli", "serve", "--config", "tiny/generate", *serve_assets["overrides"],
           "--port", "0", "--no-page", *flags]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True,
                                preexec_fn=limit if nofile else None, start_new_session=True)
    try:
        line = proc.stdout.readline()  # the model loads first: "listening on http://127.0.0.1:PORT/"
        assert "listening on http://127.0.0.1:" in line, open(log_path).read()
        yield proc, line.split("http://", 1)[1].split("/", 1)[0]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _start_in_progress(where: str):
    """A request in progress: its headers and half its body sent -> (socket, the rest)."""
    body = json.dumps({"model": "medcap", "messages": HELLO, "max_tokens": 3}).encode()
    host, port = where.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=30)
    s.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: {where}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body[:10])
    return s, body[10:]


def _finish(s: socket.socket, rest: bytes) -> bytes:
    s.sendall(rest)
    reply = b""
    while chunk := s.recv(65536):  # the server closes it after answering: it is stopping
        reply += chunk
    return reply


def test_a_good_client_is_answered_while_300_half_sent_connections_hold_a_256_file_limit(serve_assets, tmp_path):
    """The issue's case, with the real command; then SIGTERM drains a request in progress and exits 0."""
    log = tmp_path / "serve.log"
    with _serve_process(serve_assets, log, nofile=256) as (proc, where):
        port = int(where.rsplit(":", 1)[1])
        slow = _half_sent(port, 300)
        try:
            client = openai.OpenAI(base_url=f"http://{where}/v1", api_key="unused", max_retries=0, timeout=10)
            t0 = time.monotonic()
            answer = client.chat.completions.create(model="medcap", messages=HELLO, max_tokens=4)
            took = time.monotonic() - t0
            assert answer.choices[0].message.content and took < 10
            # A second one, while the 300 are still held from this side.
            assert client.chat.completions.create(model="medcap", messages=HELLO, max_tokens=4).choices
        finally:
            for s in slow:
                s.close()
        in_progress = _start_in_progress(where)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert proc.poll() is None  # still draining: it waits for the request in progress
        reply = _finish(*in_progress)
        assert reply.startswith(b"HTTP/1.1 200") and b'"finish_reason"' in reply, reply[:300]
        assert proc.wait(timeout=60) == 0  # a clean drain is a clean stop for supervisors
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2)
    text = log.read_text()
    assert "Too many open files" not in text and "EMFILE" not in text and "Traceback" not in text, text[-3000:]
    assert "lowered to" in text and "to fit the open-file limit" in text  # the cap fits 256 files
    assert "closed" in text and "to make room at the cap" in text  # what made room, in one summary line
    assert sum("POST /v1/chat/completions" in line for line in text.splitlines()) == 3  # one line per request
    assert "stopped by SIGTERM after finishing every request in progress" in text


def test_a_port_in_use_is_refused_in_one_line_before_the_model_loads(serve_assets, monkeypatch, capsys):
    from medcap.serve import _main

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        def no_load(*_a, **_k):
            raise AssertionError("the model was loaded before the port was checked")

        monkeypatch.setattr(_main, "build_state", no_load)
        monkeypatch.setattr(_main, "read_model_config", no_load)
        code = _main.serve_main(["--config", "tiny/generate", *serve_assets["overrides"], "--port", str(port)])
        err = capsys.readouterr().err.strip().splitlines()
        # the real command: a subprocess, nothing loaded (its log would say "loading the LLM")
        res = subprocess.run([sys.executable, "-m", "medcap.cli", "serve", "--config", "tiny/generate",
                              *serve_assets["overrides"], "--port", str(port)], capture_output=True, text=True,
                             timeout=120)
    finally:
        taken.close()
    assert code == 2 and err == [f"medcap serve: error: cannot listen on 127.0.0.1:{port}: the port is in use by "
                                 "another program (stop it, or choose another --port)"]
    assert res.returncode == 2 and res.stderr.strip().splitlines() == err, res.stderr


def test_bad_connection_flags_are_one_line(serve_assets, capsys):
    from medcap.serve._main import serve_main

    base = ["--config", "tiny/generate", *serve_assets["overrides"]]
    for flags, says in ((["--header-timeout", "0"], "--header-timeout must be a number of seconds > 0"),
                        (["--max-connections", "0"], "--max-connections must be >= 1"),
                        (["--port", "70000"], "the port must be 0-65535")):
        assert serve_main(base + flags) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err


# ---- deadlines and the cap, in this process


def test_half_sent_silent_and_slow_body_connections_are_closed_at_their_deadlines(start_guarded):
    with start_guarded("--header-timeout", "1", "--body-timeout", "1.5") as (server, _):
        half, silent = _half_sent(server.port, 1)[0], socket.create_connection(("127.0.0.1", server.port))
        slow_body = socket.create_connection(("127.0.0.1", server.port))
        slow_body.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100\r\n\r\n{")
        t0 = time.monotonic()
        assert _closed_by_server(half, 5) and _closed_by_server(silent, 5)
        assert 0.8 < time.monotonic() - t0 < 4
        assert _closed_by_server(slow_body, 5) and time.monotonic() - t0 > 1.2
        assert server.guard.counts["slow"] == 3
        # a client that keeps to the deadlines is answered as before
        assert httpx.post(server.url + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2}).is_success


def test_a_kept_alive_connection_has_the_idle_timeout_then_the_header_timeout(start_guarded):
    with start_guarded("--idle-timeout", "2", "--header-timeout", "0.6") as (server, _):
        def answered() -> socket.socket:
            s = socket.create_connection(("127.0.0.1", server.port))
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            s.settimeout(5)
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
            return s

        idle = answered()
        t0 = time.monotonic()
        assert not _closed_by_server(idle, 1.2)  # past the header timeout: idle is not slow
        assert _closed_by_server(idle, 5) and 1.5 < time.monotonic() - t0 < 4
        slow = answered()
        time.sleep(0.4)
        slow.sendall(b"GET /health HTTP/1.1\r\n")  # the next request, half sent
        t0 = time.monotonic()
        assert _closed_by_server(slow, 5) and 0.4 < time.monotonic() - t0 < 1.5


def test_at_the_cap_the_oldest_unfinished_connection_makes_room(start_guarded):
    with start_guarded(cap=4) as (server, _):
        slow = _half_sent(server.port, 4)
        with httpx.Client(base_url=server.url, timeout=10) as client:
            ask = lambda: client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2})  # noqa: E731
            assert ask().status_code == 200  # its connection displaced the oldest half-sent one
            slow += _half_sent(server.port, 1)  # displaces the next oldest, not the client's kept-alive one
            assert ask().status_code == 200
        assert _closed_by_server(slow[0], 5) and _closed_by_server(slow[1], 5)
        assert not any(_closed_by_server(s, 0.3) for s in slow[2:])
        assert server.guard.counts["displaced"] == 2


def test_at_the_cap_with_every_connection_answering_a_new_one_gets_503_at_once(start_guarded, monkeypatch):
    with start_guarded(cap=2) as (server, state):
        release = threading.Event()
        admit = state.worker._admit
        monkeypatch.setattr(state.worker, "_admit", lambda: admit() if release.is_set() else time.sleep(0.02))
        results = []

        def ask():
            results.append(httpx.post(server.url + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2},
                                      timeout=30).status_code)

        held = [threading.Thread(target=ask) for _ in range(2)]
        for t in held:
            t.start()
        deadline = time.monotonic() + 10
        while state.worker.load()["waiting"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        t0 = time.monotonic()
        r = httpx.post(server.url + "/v1/chat/completions", json={"messages": HELLO}, timeout=10)
        assert r.status_code == 503 and r.headers["retry-after"] and time.monotonic() - t0 < 2
        assert r.json()["error"]["code"] == "too_many_connections"
        release.set()
        for t in held:
            t.join(timeout=30)
        assert results == [200, 200] and server.guard.counts["refused"] == 1


def test_a_listener_that_cannot_bind_names_host_and_port():
    from medcap.serve._connections import ListenError, open_listener

    with pytest.raises(ListenError, match=r"cannot listen on 192\.0\.2\.1:8000: this machine has no such address"):
        open_listener("192.0.2.1", 8000)  # TEST-NET-1: never a local address
    if os.geteuid() != 0:
        with pytest.raises(ListenError, match=r"127\.0\.0\.1:80: permission denied"):
            open_listener("127.0.0.1", 80)
