"""``medcap serve --backend vllm``: the batching worker's interface, each job forwarded to vLLM.

``VllmWorker`` takes the same ``Job`` as ``_worker.BatchWorker`` (``submit``, ``wake``,
``load``, ``start``, ``stop``), so the routes, the page, streaming and cancellation are
unchanged. Each job runs on one of ``batch_size`` threads: medcap builds its prompt's
embeddings (one at a time, under a lock: the vision tower is not shared between threads),
then streams a ``/v1/completions`` request carrying them from vLLM's server, which
batches the concurrent requests itself. New tokens reach the job as vLLM sends them; a
cancelled job closes its stream between tokens, and vLLM aborts the request. Jobs beyond
``batch_size`` wait in a queue of ``queue_size`` (``QueueFull`` past it), as with the
native worker. A sampled job without a seed gets a random one (vLLM's stream for it).
"""

from __future__ import annotations

import logging
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List

import torch

from medcap.serve._worker import Job, QueueFull

log = logging.getLogger("medcap.serve")


class VllmWorker:
    """``submit(job)`` from any thread; ``batch_size`` jobs stream from vLLM at once."""

    def __init__(self, engine, *, cache_len: int, queue_size: int):
        self.engine = engine
        self.cache_len = int(cache_len)
        self.queue_size = int(queue_size)
        self._lock = threading.Lock()
        self._embed_lock = threading.Lock()
        self._waiting = 0
        self._running: List[Job] = []
        self._pool = ThreadPoolExecutor(max_workers=engine.batch_size, thread_name_prefix="medcap-vllm")
        self.counts = dict(served=0, failed=0, cancelled=0)

    # ---- any thread
    def start(self) -> "VllmWorker":
        return self

    def stop(self) -> None:
        with self._lock:
            for job in self._running:
                job.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._waiting >= self.queue_size:
                raise QueueFull(f"{self._waiting} requests are waiting (the queue's limit)")
            self._waiting += 1
        try:
            self._pool.submit(self._run, job)
        except RuntimeError:  # shutting down
            with self._lock:
                self._waiting -= 1
            raise QueueFull("the server is shutting down") from None

    def wake(self) -> None:
        """Nothing to do: a cancelled job is seen by its thread at its next token."""

    def load(self) -> Dict[str, int]:
        with self._lock:
            return {"waiting": self._waiting, "running": len(self._running), "slots": self.engine.batch_size,
                    **self.counts}

    # ---- a job's thread
    def _run(self, job: Job) -> None:
        with self._lock:
            self._waiting -= 1
            self._running.append(job)
        try:
            if not job.cancelled:
                self._stream(job)
            self._end(job, "cancelled" if job.cancelled else "served")
        except Exception as e:  # this request fails; the server goes on
            log.warning("vLLM request failed: %s: %s", type(e).__name__, e)
            job.error = f"generation failed: {type(e).__name__}: {e}"
            self._end(job, "failed")
        finally:
            with self._lock:
                self._running.remove(job)

    def _stream(self, job: Job) -> None:
        from medcap.generation._vllm import prompt_embeds

        engine = self.engine
        with self._embed_lock, torch.inference_mode():
            embeds = prompt_embeds(engine.model, job.prompt, job.image)  # [s, d], checked
        temperature, top_k = job.setting
        seed = None
        if temperature > 0:
            seed = job.seed if job.seed is not None else secrets.randbits(63)
        stream = engine.client.stream(embeds, max_tokens=job.max_tokens, stop_token_ids=engine.tokenizer.stop_tokens,
                                      temperature=temperature, top_k=top_k, seed=seed)
        with stream:
            for ids in stream:
                job.tokens = job.tokens + ids
                if job.cancelled:
                    return  # closing the stream ends vLLM's request
                if job.each_token:
                    job.notify(job)

    def _end(self, job: Job, outcome: str) -> None:
        job.done = True
        with self._lock:
            self.counts[outcome] += 1
        job.notify(job)
