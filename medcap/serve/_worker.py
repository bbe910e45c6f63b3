"""One thread that owns the model: requests from any thread go in, tokens come out.

It drives the engine's continuous batcher (``GenerationEngine.open`` / ``submit`` /
``step``): a request joins the running batch as soon as a slot is free, and leaves
it when it stops, so a short answer never waits for a long one. The batcher samples
every row with one temperature / top-k, so each distinct sampling setting gets its
own batcher (the greedy one is the engine's own, kept; the others are dropped when
idle, freeing their KV cache).

Requests wait in this worker's own queue (bounded: ``submit`` raises
:class:`QueueFull`) and enter a batcher only when it has a free slot, so a request
cancelled while waiting (its client went away) costs nothing. A cancelled running
request is ended at the next step: its budget is cut to the tokens it has.

    QueueFull, Job   a refused request; one request's prompt, budget, tokens and state
    BatchWorker      the thread: ``submit``, ``wake``, ``load``; its loop admits, steps, ends
"""

from __future__ import annotations

import collections
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional, Tuple

import torch

log = logging.getLogger("medcap.serve")

Setting = Tuple[float, Optional[int]]  # (temperature, top_k); (0.0, None) is greedy
MAX_SAMPLING_BATCHERS = 4  # distinct sampling settings decoding at once (each has its own KV cache)


class QueueFull(Exception):
    pass


@dataclass
class Job:
    """One request's work and progress. ``notify(job)`` is called from the worker
    thread when it is done or failed, and with ``each_token`` after every new token."""

    prompt: List[int]
    image: Optional[torch.Tensor]
    max_tokens: int
    setting: Setting
    seed: Optional[int] = None
    notify: Callable[["Job"], None] = lambda job: None
    each_token: bool = False  # notify at every new token (streams), else only when done
    tokens: List[int] = field(default_factory=list)
    done: bool = False
    error: Optional[str] = None
    cancelled: bool = False
    submitted: float = field(default_factory=time.monotonic)
    _req: object = None

    @property
    def finish_reason(self) -> str:
        return "length" if len(self.tokens) >= self.max_tokens else "stop"

    def cancel(self) -> None:
        self.cancelled = True  # read by the worker thread between steps


class BatchWorker:
    """``submit(job)`` from any thread; the worker thread runs the batch."""

    def __init__(self, engine, *, cache_len: int, queue_size: int):
        self.engine = engine
        self.cache_len = int(cache_len)
        self.queue_size = int(queue_size)
        self._pending: Deque[Job] = collections.deque()
        self._running: Dict[Setting, List[Job]] = {}
        self._batchers: Dict[Setting, object] = {}
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="medcap-batch-worker", daemon=True)
        # steps and rows decoded: rows / steps is the mean batch the clients made
        self.counts = dict(served=0, failed=0, cancelled=0, steps=0, rows=0, step_ms=0)

    # ---- any thread
    def start(self) -> "BatchWorker":
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        with self._cond:
            if len(self._pending) >= self.queue_size:
                raise QueueFull(f"{len(self._pending)} requests are waiting (the queue's limit)")
            self._pending.append(job)
            self._cond.notify()

    def wake(self) -> None:
        """Have the worker look at its jobs now (a job was cancelled)."""
        with self._cond:
            self._cond.notify()

    def load(self) -> Dict[str, int]:
        return {"waiting": len(self._pending), "running": sum(len(v) for v in self._running.values()),
                "slots": self.engine.batch_size, **self.counts}

    # ---- the worker thread
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while not self._stop and not self._pending and not any(self._running.values()):
                    self._cond.wait()
                if self._stop:
                    return
            self._admit()
            self._step_all()

    def _admit(self) -> None:
        with self._cond:
            waiting = list(self._pending)
            self._pending.clear()
        keep: List[Job] = []
        for job in waiting:
            if job.cancelled:
                self._end(job, cancelled=True)
                continue
            running = self._running.setdefault(job.setting, [])
            can_open = job.setting in self._batchers or len(self._batchers) < MAX_SAMPLING_BATCHERS + 1
            if len(running) >= self.engine.batch_size or not can_open:
                keep.append(job)
                continue
            try:
                job._req = self._batcher(job.setting).submit(job.prompt, job.image, job.max_tokens, self._generator(job))
            except Exception as e:  # a request the batcher refuses must not stop the others
                self._fail([job], f"{type(e).__name__}: {e}")
                continue
            running.append(job)
        if keep:
            with self._cond:
                self._pending.extendleft(reversed(keep))  # still first in line

    def _batcher(self, setting: Setting):
        b = self._batchers.get(setting)
        if b is None:
            from medcap.generation import GenerationEngine

            e = self.engine
            if setting != (0.0, None):
                e = GenerationEngine(e.model, e.tokenizer, batch_size=e.batch_size, temperature=setting[0],
                                     top_k=setting[1], seed=e.seed)
            b = self._batchers[setting] = e.open(self.cache_len)
        return b

    def _generator(self, job: Job) -> Optional[torch.Generator]:
        if job.setting == (0.0, None):
            return None
        g = torch.Generator(device=self.engine.device)
        g.manual_seed(job.seed if job.seed is not None else secrets.randbits(63))
        return g

    def _step_all(self) -> None:
        for setting, jobs in list(self._running.items()):
            for job in jobs:
                if job.cancelled and not job._req.done:
                    job._req.max_new_tokens = len(job._req.tokens)  # ends at the next sample
            batcher = self._batchers.get(setting)
            if batcher is not None and batcher.busy():
                self.counts["steps"] += 1
                self.counts["rows"] += len(jobs)
                t0 = time.perf_counter()
                try:
                    batcher.step()
                except Exception as e:  # e.g. out of memory: fail this batch, keep serving
                    log.exception("generation step failed")
                    self._fail(jobs, f"generation failed: {type(e).__name__}: {e}")
                    self._running[setting] = []
                    del self._batchers[setting]  # its cache may be half written
                    continue
                self.counts["step_ms"] += round(1000 * (time.perf_counter() - t0))
            still: List[Job] = []
            for job in jobs:
                if len(job._req.tokens) != len(job.tokens) or job._req.done:
                    job.tokens = list(job._req.tokens)
                    if job._req.done:
                        self._end(job, cancelled=job.cancelled)
                        continue
                    if job.each_token:
                        job.notify(job)
                still.append(job)
            self._running[setting] = still
            if not still and setting != (0.0, None):
                self._batchers.pop(setting, None)
                del self._running[setting]

    def _end(self, job: Job, *, cancelled: bool) -> None:
        job.done = True
        self.counts["cancelled" if cancelled else "served"] += 1
        job.notify(job)

    def _fail(self, jobs: List[Job], message: str) -> None:
        for job in jobs:
            job.error, job.done = message, True
            self.counts["failed"] += 1
            job.notify(job)
