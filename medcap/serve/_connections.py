"""Connections: the listening socket, and how long and how many a client may hold.

    open_listener        HOST:PORT bound before the model loads (a taken port is one line);
                         listening starts only when serving, so clients are refused, not queued
    connection_room      the open-file budget: the soft limit raised to the hard one, and how
                         many connections fit under it beside what the server itself needs
    ConnectionGuard      the cap, counted at ``accept()``: at the cap a new connection displaces
                         the oldest one that is not being answered (idle, or still sending its
                         request); when every one is being answered it gets a 503 and is closed
    GuardedListener      the listening socket whose ``accept()`` asks the guard
    DeadlineH11          uvicorn's h11 protocol with deadlines: a request's headers within
                         ``--header-timeout`` of the connection opening (or of the request's
                         first byte, on a kept-alive one), its body within ``--body-timeout``
    serve_forever        uvicorn on the listener with all of the above; SIGTERM drains and
                         returns (exit 0), the log says what was closed, at most every 10 s

uvicorn itself times out idle kept-alive connections only (``--idle-timeout``); a client
that sends half a request and waits would otherwise hold its socket for ever, and enough
of them exhaust the open-file limit (``accept()`` fails with EMFILE, good clients wait).
"""

from __future__ import annotations

import asyncio
import collections
import errno
import json
import logging
import os
import signal
import socket
import threading
from dataclasses import dataclass
from typing import Dict, Optional

log = logging.getLogger("medcap.serve")

SLACK = 16  # connections displaced but not yet closed (they close on the next loop turn)
RESERVE_FDS = 128  # the server's own files: image decodes in the thread pool, the page's uploads, logs
REPORT_EVERY_S = 10.0
_BUSY = json.dumps({"error": {"message": "the server is at its connection limit and every connection is being "
                                         "answered; retry shortly", "type": "server_error", "param": None,
                              "code": "too_many_connections"}}).encode()
BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 2\r\n"
                 b"connection: close\r\ncontent-length: " + str(len(_BUSY)).encode() + b"\r\n\r\n" + _BUSY)


class ListenError(Exception):
    """The address cannot be served (one line for the user)."""


@dataclass(frozen=True)
class ConnectionLimits:
    """``medcap serve``'s connection flags (defaults documented there)."""

    max_connections: int = 1000
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    idle_timeout_s: float = 5.0
    drain_timeout_s: float = 25.0


# ---- the flags


def add_connection_flags(p) -> None:
    """``--max-connections``, the timeouts and ``--no-access-log`` on ``medcap serve``'s parser."""
    d = ConnectionLimits()
    p.add_argument("--max-connections", type=int, default=d.max_connections,
                   help=f"open connections at most (default {d.max_connections}, lowered to fit the open-file limit); "
                   "at the cap a new connection displaces the oldest one not being answered, else gets a 503")
    p.add_argument("--header-timeout", type=float, default=d.header_timeout_s,
                   help=f"seconds a connection has to send a request's headers, from opening (a kept-alive one: "
                   f"from the request's first byte) (default {d.header_timeout_s:g})")
    p.add_argument("--body-timeout", type=float, default=d.body_timeout_s,
                   help=f"seconds a request's body may take to arrive after its headers (default {d.body_timeout_s:g})")
    p.add_argument("--idle-timeout", type=float, default=d.idle_timeout_s,
                   help=f"seconds a kept-alive connection may wait for its next request (default {d.idle_timeout_s:g})")
    p.add_argument("--drain-timeout", type=float, default=d.drain_timeout_s,
                   help=f"on SIGTERM or Ctrl-C, seconds to finish the requests in progress (default "
                   f"{d.drain_timeout_s:g}); after SIGTERM the exit status is 0 when all finished, 1 when some "
                   "were cut")
    p.add_argument("--no-access-log", action="store_true",
                   help="no log line for answered requests (refusals and faults are still logged, one line each)")


def connection_limits(args) -> ConnectionLimits:
    """The flags checked (``ListenError`` names the bad one)."""
    if args.max_connections < 1:
        raise ListenError(f"--max-connections must be >= 1, got {args.max_connections}")
    for flag in ("header_timeout", "body_timeout", "idle_timeout", "drain_timeout"):
        value = getattr(args, flag)
        if not value > 0 or value == float("inf"):
            raise ListenError(f"--{flag.replace('_', '-')} must be a number of seconds > 0, got {value}")
    return ConnectionLimits(args.max_connections, args.header_timeout, args.body_timeout, args.idle_timeout,
                            args.drain_timeout)


# ---- the address and the open-file budget


def _shown(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _why(e: BaseException) -> str:
    if isinstance(e, socket.gaierror):
        return f"the host name does not resolve ({e.strerror})"
    if isinstance(e, OverflowError):
        return "the port must be 0-65535"
    return {
        errno.EADDRINUSE: "the port is in use by another program (stop it, or choose another --port)",
        errno.EACCES: "permission denied (ports below 1024 need privileges: use --port 8000 or higher)",
        errno.EADDRNOTAVAIL: "this machine has no such address (--host)",
    }.get(getattr(e, "errno", None), getattr(e, "strerror", None) or str(e))


def open_listener(host: str, port: int) -> "GuardedListener":
    """A TCP socket bound to ``host:port``, not yet listening (``serve_forever`` listens)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = GuardedListener(family, socket.SOCK_STREAM)
    sock.host = host
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Inherited by each accepted connection: without it a kept-alive client waits ~40 ms
        # per response (Nagle's algorithm against the client's delayed ACK).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
    except (OSError, OverflowError) as e:
        sock.close()
        raise ListenError(f"cannot listen on {_shown(host, port)}: {_why(e)}") from None
    return sock


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 64


def connection_room() -> int:
    """How many connections fit under the open-file limit, after raising the soft limit
    to the hard one (as Go's runtime does; the soft 1024 only guards ``select()``, which
    asyncio does not use) and keeping ``RESERVE_FDS`` for the server's own files."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return soft - _open_fds() - RESERVE_FDS - SLACK


def connection_cap(requested: int, *, warn: bool = True) -> int:
    """``--max-connections``, lowered (and said so) to what the open-file limit allows."""
    room = connection_room()
    if room < 8:
        raise ListenError(f"the open-file limit (ulimit -n) leaves room for {max(room, 0)} connections beside the "
                          f"{RESERVE_FDS} files the server keeps for itself: raise it (ulimit -n 4096)")
    if warn and room < requested:
        log.warning("--max-connections %d lowered to %d to fit the open-file limit (ulimit -n)", requested, room)
    return min(requested, room)


# ---- the cap, counted where connections are accepted


class ConnectionGuard:
    """How many connections are open, which may make room, and what was closed."""

    def __init__(self, limits: ConnectionLimits, cap: int):
        self.cap = int(cap)
        self.header_timeout = float(limits.header_timeout_s)
        self.body_timeout = float(limits.body_timeout_s)
        self._socks: set = set()  # accepted sockets, until closed
        self._waiting: Dict[object, None] = {}  # protocols not being answered, oldest first
        self.counts: collections.Counter = collections.Counter()  # since the start
        self._reported: collections.Counter = collections.Counter()
        self._report: Optional[asyncio.TimerHandle] = None

    def open(self) -> int:
        if len(self._socks) >= self.cap:
            self._socks = {s for s in self._socks if s.fileno() != -1}
        return len(self._socks)

    def must_wait(self) -> bool:
        """Displaced connections are still closing: leave new ones in the kernel's queue a turn."""
        return self.open() >= self.cap + SLACK

    def admit(self, conn: socket.socket) -> bool:
        """A just-accepted socket: kept (True), or answered 503 and closed (False)."""
        self._socks.add(conn)
        if self.open() <= self.cap or self._displace_oldest():
            return True
        self._socks.discard(conn)
        try:
            conn.setblocking(False)
            conn.recv(1 << 16)  # what it sent already: closing with unread input would reset, losing the 503
        except OSError:
            pass
        try:
            conn.send(BUSY_RESPONSE)
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        conn.close()
        self.note("refused")
        return False

    def _displace_oldest(self) -> bool:
        while self._waiting:
            proto = next(iter(self._waiting))
            del self._waiting[proto]
            transport = getattr(proto, "transport", None)
            if transport is not None:
                transport.abort()  # closes on the next loop turn, unflushed output or not
                self.note("displaced")
                return True
        return False

    # ---- the protocols tell it what they are doing
    def waiting(self, proto) -> None:
        self._waiting.pop(proto, None)
        self._waiting[proto] = None  # the newest

    def forget(self, proto) -> None:
        """Being answered, closed, or no longer HTTP: never displaced."""
        self._waiting.pop(proto, None)

    def note(self, what: str) -> None:
        self.counts[what] += 1
        if self._report is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._report = loop.call_later(REPORT_EVERY_S, self.report)

    def report(self) -> None:
        """One log line for what was closed since the last one (never one per connection)."""
        self._report = None
        new = self.counts - self._reported
        self._reported = collections.Counter(self.counts)
        parts = []
        if new["slow"]:
            parts.append(f"closed {new['slow']} that sent no complete request in time (--header-timeout "
                         f"{self.header_timeout:g} s, --body-timeout {self.body_timeout:g} s)")
        if new["displaced"]:
            parts.append(f"closed {new['displaced']} idle or unfinished ones to make room at the cap of "
                         f"{self.cap} (--max-connections)")
        if new["refused"]:
            parts.append(f"refused {new['refused']} with 503: all {self.cap} connections were being answered")
        if parts:
            log.warning("connections: %s", "; ".join(parts))


class GuardedListener(socket.socket):
    """The listening socket; asyncio's accept loop calls ``accept()``, which asks the guard."""

    guard: Optional[ConnectionGuard] = None
    host = ""  # as the user wrote it, for the "listening on" line

    def accept(self):
        guard = self.guard
        if guard is not None and guard.must_wait():
            raise BlockingIOError(errno.EAGAIN, "displaced connections are closing")
        conn, addr = super().accept()
        if guard is None or guard.admit(conn):
            return conn, addr
        raise BlockingIOError(errno.EAGAIN, "refused at the connection cap")  # ends this round of accepts


# ---- deadlines for a request's headers and body


def deadline_protocol(guard: ConnectionGuard):
    """uvicorn's h11 protocol class, timed and counted by ``guard`` (``Config(http=...)``)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    waiting, reading, answering = "waiting", "reading", "answering"
    phases = {h11.IDLE: waiting, h11.SEND_BODY: reading}  # the client's side of h11's state machine

    class DeadlineH11(H11Protocol):
        """Waiting (for headers), reading (a body) or answering; the first two are timed."""

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._timer, self._phase = None, None
            self._follow(start=True)  # a new connection's first request is timed from its opening

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._follow(start=True)  # a kept-alive connection's next request: from its first byte

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._follow(start=False)  # idle until then: uvicorn's --idle-timeout

        def connection_lost(self, exc) -> None:
            self._stop_timer()
            guard.forget(self)
            super().connection_lost(exc)

        def _follow(self, start: bool) -> None:
            if self.transport.is_closing() or self.transport.get_protocol() is not self:  # closed, or a websocket now
                self._stop_timer()
                guard.forget(self)
                return
            phase = phases.get(self.conn.their_state, answering)
            if phase != self._phase:
                self._stop_timer()
                self._phase = phase
                (guard.forget if phase == answering else guard.waiting)(self)
            if phase != answering and self._timer is None and (start or phase == reading):
                seconds = guard.header_timeout if phase == waiting else guard.body_timeout
                self._timer = self.loop.call_later(seconds, self._too_slow)

        def _stop_timer(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _too_slow(self) -> None:
            self._timer = None
            if self._phase == reading and self.scope is not None:
                self.scope.setdefault("state", {})["medcap_note"] = "its body did not arrive in time (--body-timeout)"
            guard.forget(self)
            guard.note("slow")
            self.transport.abort()

    return DeadlineH11


# ---- uvicorn, until SIGTERM


def _quiet_fd_exhaustion(loop, context) -> None:
    """The event loop's error handler: running out of files is one line, not a traceback."""
    exc = context.get("exception")
    if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
        log.warning("out of open files (%s): new connections wait; lower --max-connections or raise ulimit -n",
                    exc.strerror)
        return
    loop.default_exception_handler(context)


def make_server(app, listener: GuardedListener, limits: ConnectionLimits, cap: int):
    """(uvicorn.Server, ConnectionGuard) for ``app`` on ``listener``."""
    import uvicorn

    guard = ConnectionGuard(limits, cap)
    listener.guard = guard
    config = uvicorn.Config(app, http=deadline_protocol(guard), log_level="warning", access_log=False,
                            timeout_keep_alive=limits.idle_timeout_s,
                            timeout_graceful_shutdown=limits.drain_timeout_s)
    return uvicorn.Server(config), guard


async def run_server(server, listener: GuardedListener, guard: ConnectionGuard) -> None:
    """``server.serve`` on ``listener``; the loop's fd errors quiet, the last report flushed."""
    asyncio.get_running_loop().set_exception_handler(_quiet_fd_exhaustion)
    try:
        await server.serve(sockets=[listener])
    finally:
        guard.report()


def serve_forever(app, listener: GuardedListener, limits: ConnectionLimits, cap: int) -> bool:
    """Serve until stopped; True when SIGTERM stopped it. uvicorn drains on SIGTERM and then
    re-raises the signal to the handler it found, which here records it instead of dying
    with status 143: supervisors (systemd, Kubernetes) read exit 0 as a clean stop."""
    server, guard = make_server(app, listener, limits, cap)
    stopped = []
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda sig, _frame: stopped.append(sig)) if main else None
    listener.listen(2048)  # connections wait in the backlog from now on, until uvicorn accepts them
    where = _shown(listener.host, listener.getsockname()[1])
    print(f"medcap serve: listening on http://{where}/ (API under /v1)", flush=True)
    try:
        asyncio.run(run_server(server, listener, guard))
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
    return bool(stopped)
