"""A real server for the serving tests: the tiny model (trained-format vision checkpoint
included) loaded by ``medcap serve``'s own setup, uvicorn on a loopback port in a
thread of this process, limits small enough to hit cheaply."""

from __future__ import annotations

import base64
import socket
import threading
import time
from pathlib import Path
from typing import Any, Dict

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

# the test server's limits (flags of medcap serve)
MAX_IMAGE_PIXELS = 1_000_000
MAX_BODY_BYTES = 400_000
MAX_TOKENS = 64


@pytest.fixture(scope="session")
def serve_assets(tmp_path_factory) -> Dict[str, Any]:
    import torch

    from medcap.models import medcap_tiny, save_vision_checkpoint
    from medcap.testing import make_tiny_training_assets

    root = tmp_path_factory.mktemp("serve_assets")
    assets = make_tiny_training_assets(root, samples=3)
    torch.manual_seed(7)
    ckpt = root / "checkpoint" / "meta_model_last.pt"
    ckpt.parent.mkdir(parents=True)
    save_vision_checkpoint(medcap_tiny(**assets["model_kwargs"], num_image_tokens=4), ckpt)
    images = sorted((root / "data" / "images").glob("*.png"))
    overrides = [f"assets_dir={root}", f"vision_checkpoint={ckpt}"]
    return {**assets, "root": root, "vision_checkpoint": str(ckpt), "images": images, "overrides": overrides}


def serve_args(assets, *extra: str):
    from medcap.serve._main import _parser

    return _parser().parse_args([
        "--config", "tiny/generate", *assets["overrides"], "--max-image-pixels", str(MAX_IMAGE_PIXELS),
        "--max-body-bytes", str(MAX_BODY_BYTES), "--max-tokens", str(MAX_TOKENS), *extra,
    ])


class LiveServer:
    """uvicorn serving ``app`` on 127.0.0.1 (a free port) in a daemon thread."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as medcap serve's socket
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


@pytest.fixture(scope="session")
def start_server(serve_assets):
    """``with start_server(*flags, page=False, examples=None) as (server, state):`` a server
    of its own (medcap serve's setup with more flags; ``examples``: the page's example
    images, as ``--demo`` finds them), stopped at the end of the block."""
    import contextlib

    from medcap.serve._app import create_app
    from medcap.serve._main import build_state

    @contextlib.contextmanager
    def start(*flags: str, page: bool = False, examples=None):
        state = build_state(serve_args(serve_assets, *flags))
        state.examples = list(examples or [])
        with LiveServer(create_app(state, page=page)) as server:
            yield server, state

    return start


@pytest.fixture(scope="session")
def served(start_server):
    """(LiveServer, ServeState) with the web page, shared by the session's tests."""
    with start_server(page=True) as pair:
        yield pair


def _data_url(path: Path, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(Path(path).read_bytes()).decode()}"


def _image_message(url: str, question: str | None = None):
    parts = [{"type": "image_url", "image_url": {"url": url}}]
    if question:
        parts.append({"type": "text", "text": question})
    return [{"role": "user", "content": parts}]


@pytest.fixture(scope="session")
def data_url():
    """``data_url(path, mime="image/png")`` -> a base64 data URL of the file."""
    return _data_url


@pytest.fixture(scope="session")
def image_message():
    """``image_message(url, question=None)`` -> one user message: the image, then the question."""
    return _image_message


# ---- medcap serve's own connection handling (the cap, the timeouts), in a thread


class GuardedServer:
    """``app`` served as ``medcap serve`` serves it (``_connections``), on 127.0.0.1 in a
    daemon thread; ``.guard`` counts what it closed."""

    def __init__(self, app, limits, cap: int):
        from medcap.serve._connections import make_server, open_listener

        self.listener = open_listener("127.0.0.1", 0)
        self.server, self.guard = make_server(app, self.listener, limits, cap)
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import asyncio

        from medcap.serve._connections import run_server

        asyncio.run(run_server(self.server, self.listener, self.guard))

    def __enter__(self) -> "GuardedServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.listener.close()


@pytest.fixture(scope="session")
def start_guarded(serve_assets):
    """``with start_guarded(*flags, cap=None) as (server, state):`` the tiny model behind
    medcap serve's connection handling; ``flags`` are medcap serve's (``--header-timeout 1``)."""
    import contextlib

    from medcap.serve._app import create_app
    from medcap.serve._connections import connection_limits
    from medcap.serve._main import build_state

    @contextlib.contextmanager
    def start(*flags: str, cap=None):
        args = serve_args(serve_assets, "--no-page", *flags)
        limits = connection_limits(args)
        state = build_state(args)
        app = create_app(state, page=False, access_log=not args.no_access_log)
        with GuardedServer(app, limits, cap or limits.max_connections) as server:
            yield server, state

    return start
