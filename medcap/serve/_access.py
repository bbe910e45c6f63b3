"""The server's log: one line per request, and a fault's traceback once.

    AccessLog   ASGI middleware around every route and the page: on one line the client,
                the method and path, the status, the seconds taken and the tokens (prompt +
                answer); a refused request's reason on the same line; a client that left,
                one line; an unexpected exception, its traceback once with the line, answered
                500 in OpenAI's format and not re-raised (so uvicorn adds no second "Exception
                in ASGI application"); a request cut by a shutdown is counted
                (``counts["cut"]``, which decides ``medcap serve``'s exit status)
    note        what a route adds to its request's line: ``usage`` (a callable giving the
                prompt and answer token counts, read when the line is written), ``error``

Lines go to the ``medcap.serve.access`` logger: INFO up to 4xx, ERROR for 5xx. With
``enabled=False`` (``--no-access-log``) answered requests are not logged; refusals and
faults still are, one line each.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Dict, Optional

log = logging.getLogger("medcap.serve.access")

_NOTE = "medcap_note"  # keys in the request scope's "state", shared with the routes
_USAGE = "medcap_usage"
_MAX_NOTE = 300


def note(request, *, usage=None, error: Optional[str] = None) -> None:
    """Add the tokens (``usage() -> (prompt, answer)``) or a refusal's message to the request's line."""
    state = request.scope.setdefault("state", {})
    if usage is not None:
        state[_USAGE] = usage
    if error is not None:
        state[_NOTE] = error


def _client_left(e: BaseException) -> bool:
    from starlette.requests import ClientDisconnect

    return isinstance(e, (ClientDisconnect, ConnectionError))


def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _MAX_NOTE else text[: _MAX_NOTE - 3] + "..."


class AccessLog:
    """ASGI middleware: see the module docstring."""

    def __init__(self, app, enabled: bool = True, counts: Optional[Dict[str, int]] = None):
        self.app, self.enabled = app, enabled
        self.counts = counts if counts is not None else {}  # "cut": requests a shutdown cut short

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        sent = {"status": None, "complete": False}

        async def watched_send(message):
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                sent["complete"] = True
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except asyncio.CancelledError:
            self.counts["cut"] = self.counts.get("cut", 0) + 1
            self._line(scope, sent["status"] or 503, started, "cut: the server stopped before it was answered "
                       "(--drain-timeout)", logging.WARNING)
            raise
        except Exception as e:  # noqa: BLE001 - every fault is answered and logged here, once
            if _client_left(e):  # the protocol's note says when the server closed it (a deadline)
                why = (scope.get("state") or {}).get(_NOTE) or "the client disconnected"
                self._line(scope, sent["status"] or 499, started, why)
                return
            self._line(scope, 500, started, f"internal error: {type(e).__name__}: {e}", logging.ERROR, e)
            if sent["status"] is None:
                await _internal_error(send, e)
            return
        status = sent["status"] or 500
        why = None if sent["complete"] else "the client left before the end of the answer"
        self._line(scope, status, started, why)

    def _line(self, scope, status: int, started: float, why: Optional[str] = None, level: Optional[int] = None,
              exc: Optional[BaseException] = None) -> None:
        state = scope.get("state") or {}
        why = why or state.get(_NOTE)
        if level is None:
            level = logging.ERROR if status >= 500 else logging.INFO
        if not self.enabled and status < 400 and why is None:
            return
        client = scope.get("client")
        who = f"{client[0]}:{client[1]}" if client else "-"
        path = scope.get("raw_path") or scope.get("path", "").encode()
        target = path.decode("ascii", "backslashreplace")[:200]
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("ascii", "backslashreplace")[:100]
        line = f'{who} - "{scope.get("method")} {target} HTTP/{scope.get("http_version", "1.1")}" {status} ' \
               f"{time.perf_counter() - started:.3f} s"
        usage = state.get(_USAGE)
        if usage is not None:
            prompt, answer = usage()
            line += f", tokens {prompt}+{answer}"
        if why:
            line += f": {_one_line(why)}"
        log.log(level, "%s", line, exc_info=exc)


async def _internal_error(send, e: BaseException) -> None:
    body = json.dumps({"error": {"message": f"internal error: {type(e).__name__}", "type": "server_error",
                                 "param": None, "code": None}}).encode()
    headers: Any = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 500, "headers": headers})
    await send({"type": "http.response.body", "body": body})
