"""Continuous batching: ``slots`` rows decoded together, a finished row's slot refilled
at once with the next waiting prompt (its image included) while the others decode.

In order:

* ``Request``: one row's work and result (``tokens`` grows, ``done`` when it stops);
* ``ContinuousBatcher``: ``submit`` (from any thread), then ``step`` (admit waiting rows
  into free slots, sample every slot, one decode pass) or ``run_until_done``;
  ``refill=False`` is static batching on the same steps (for comparison).

The forward passes (``prefill_slots``, ``decode_step``) and the cache (``SlotKVCache``,
a slot's token at position ``p`` in column ``p``) are in ``_slots``.

``GenerationEngine.open`` gives one to a server; the evaluation goes through the engine.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional, Sequence, Union

import torch
from torch import nn
from torchtune.modules.attention import MultiHeadAttention

from medcap.generation._sampling import is_greedy, sample
from medcap.generation._slots import SlotKVCache, decode_step, prefill_slots, vocab_weight_for_cpu
from medcap.generation._static import check_fits, model_dtype

@dataclass
class Request:
    """One row's work and result; ``tokens`` grows as it decodes, ``done`` when it stops."""

    prompt: List[int]
    image: Optional[torch.Tensor]
    max_new_tokens: int
    generator: Optional[torch.Generator] = None
    tokens: List[int] = field(default_factory=list)
    done: bool = False


class ContinuousBatcher:
    """``slots`` rows decoded together; waiting requests fill slots as they free up.

    ``refill=False`` is static batching on the same steps: waiting requests are admitted
    only once every slot is free, so a batch runs until its longest row is done.
    ``compile=True`` compiles the decode step with ``torch.compile`` (fixed shapes;
    ``mode="reduce-overhead"``, i.e. CUDA graphs, on a GPU); a string names another
    backend (tests use ``"aot_eager"``: the same graph capture, no code generation). ``stats`` counts the
    hardware-independent work: decode forward passes, slot-steps (slots x passes)
    and the slot-steps spent on idle slots, prefill passes and prefilled positions.
    """

    def __init__(
        self,
        model: nn.Module,
        stop_tokens: Sequence[int],
        *,
        slots: int,
        cache_len: int,
        temperature: float = 0.0,
        top_k: Optional[int] = None,
        compile: Union[bool, str] = False,
        refill: bool = True,
    ):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.model = model
        self.stop = set(int(t) for t in stop_tokens)
        self.slots = self.max_slots = int(slots)
        self.compiled = bool(compile)
        self.refill = bool(refill)  # False: static batching (a batch is admitted once all slots are free)
        self.cache_len = min(int(cache_len), int(model.decoder.max_seq_len))
        self.temperature, self.top_k = temperature, top_k
        self.device = model.decoder.norm.scale.device
        vocab_weight_for_cpu(model)
        attns = [m for m in model.decoder.modules() if isinstance(m, MultiHeadAttention)]
        dtype = model_dtype(model)
        with torch.device(self.device):
            self.caches = [SlotKVCache(self.slots, self.cache_len, a.num_kv_heads, a.head_dim, dtype) for a in attns]
        self._waiting: Deque[Request] = collections.deque()
        self._lock = threading.Lock()
        self._active: List[Optional[Request]] = [None] * self.slots
        self._pos = [0] * self.slots  # position of each slot's next token
        self._last = [0] * self.slots  # each slot's last sampled token (the next decode input)
        self._logits: Optional[torch.Tensor] = None  # [slots, V]: next-token logits per slot
        self._fresh: List[bool] = [False] * self.slots  # slot has logits not yet sampled
        self._decode = decode_step
        if compile:
            backend = compile if isinstance(compile, str) else "inductor"
            mode = "reduce-overhead" if self.device.type == "cuda" and backend == "inductor" else None
            # fullgraph: a graph break would silently fall back to slow eager pieces
            self._decode = torch.compile(decode_step, backend=backend, mode=mode, fullgraph=True, dynamic=False)
        self.stats: Dict[str, int] = dict(
            decode_passes=0, slot_steps=0, idle_slot_steps=0, prefill_passes=0, prefill_positions=0
        )

    # ---- work in
    def submit(
        self, prompt: Sequence[int], image: Optional[torch.Tensor], max_new_tokens: int,
        generator: Optional[torch.Generator] = None,
    ) -> Request:
        """Queue one prompt (``image [3, H, W]`` or ``None``); returns its :class:`Request`."""
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("empty prompt")
        check_fits(self.model, len(prompt), int(max_new_tokens))
        if len(prompt) + int(max_new_tokens) > self.cache_len:
            raise ValueError(
                f"a prompt of {len(prompt)} tokens plus {max_new_tokens} new tokens exceeds this batcher's "
                f"cache_len of {self.cache_len}"
            )
        if not is_greedy(self.temperature, self.top_k) and generator is None:
            raise ValueError("sampling (temperature > 0) needs a generator per request")
        req = Request(prompt, image, int(max_new_tokens), generator)
        if req.max_new_tokens <= 0:
            req.done = True
            return req
        with self._lock:
            self._waiting.append(req)
        return req

    def busy(self) -> bool:
        return any(r is not None for r in self._active) or bool(self._waiting)

    # ---- the loop
    @torch.inference_mode()
    def run_until_done(self) -> None:
        while self.busy():
            self.step()

    @torch.inference_mode()
    def step(self) -> None:
        """Admit waiting requests into free slots, sample every slot with fresh
        logits, then one decode pass over all slots."""
        self._admit()
        self._sample()
        if not self.compiled:
            self._shrink_tail()
        if any(r is not None for r in self._active):
            self._decode_all()

    def _regroup(self, keep: List[int], slots: int) -> None:
        """Slots ``keep`` become slots ``0..len(keep)-1`` of ``slots`` (cache rows included)."""
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        for c in self.caches:
            c.regroup(idx, slots)
        pad = slots - len(keep)
        self._active = [self._active[s] for s in keep] + [None] * pad
        self._pos = [self._pos[s] for s in keep] + [0] * pad
        self._last = [self._last[s] for s in keep] + [0] * pad
        self._fresh = [self._fresh[s] for s in keep] + [False] * pad
        if self._logits is not None:
            logits = self._logits.new_zeros((slots, self._logits.shape[-1]))
            logits[: len(keep)] = self._logits.index_select(0, idx)
            self._logits = logits
        self.slots = slots

    def _shrink_tail(self) -> None:
        """Nothing can be admitted now and a quarter of the slots are idle: drop the idle
        ones, as the static path does with finished rows (a CPU step costs in proportion
        to its rows). Eager only: a compiled step keeps its shapes; new work grows it back."""
        busy = [s for s, r in enumerate(self._active) if r is not None]
        waits = bool(self._waiting) and self.refill
        if busy and not waits and self.slots - len(busy) >= max(1, self.slots // 4):
            self._regroup(busy, len(busy))

    def _admit(self) -> None:
        if not self.refill and any(r is not None for r in self._active):
            return  # static batching: the batch runs to its end
        if self.slots < self.max_slots and self._waiting:
            self._regroup(list(range(self.slots)), self.max_slots)
        free = [i for i, r in enumerate(self._active) if r is None]
        new: List[Request] = []
        with self._lock:
            while free[len(new):] and self._waiting:
                new.append(self._waiting.popleft())
        if not new:
            return
        slots = free[: len(new)]
        logits = prefill_slots(self.model, self.caches, [r.prompt for r in new], [r.image for r in new],
                               slots)  # [n, V]
        self.stats["prefill_passes"] += 1
        self.stats["prefill_positions"] += len(new) * max(len(r.prompt) for r in new)
        if self._logits is None:
            self._logits = torch.zeros(self.slots, logits.shape[-1], dtype=logits.dtype, device=self.device)
        self._logits[torch.tensor(slots, device=self.device)] = logits
        for s, r in zip(slots, new):
            self._active[s], self._pos[s], self._fresh[s] = r, len(r.prompt), True

    def _sample(self) -> None:
        rows = [s for s in range(self.slots) if self._fresh[s]]
        if not rows:
            return
        gens = None
        if not is_greedy(self.temperature, self.top_k):
            gens = [self._active[s].generator for s in rows]
        idx = torch.tensor(rows, device=self.device)
        nxt = sample(self._logits[idx], temperature=self.temperature, top_k=self.top_k, generators=gens).tolist()
        for s, t in zip(rows, nxt):
            r = self._active[s]
            self._fresh[s] = False
            if t in self.stop:
                self._finish(s)
                continue
            r.tokens.append(int(t))
            self._last[s] = int(t)
            if len(r.tokens) >= r.max_new_tokens:
                self._finish(s)

    def _finish(self, s: int) -> None:
        self._active[s].done = True
        self._active[s], self._pos[s], self._last[s] = None, 0, 0

    def _decode_all(self) -> None:
        busy = [r is not None for r in self._active]
        token = torch.tensor(self._last, device=self.device).view(-1, 1)  # [B, 1]
        pos = torch.tensor(self._pos, device=self.device).view(-1, 1)  # [B, 1]
        # eager: attention reads the columns up to the longest position; compiled: all (fixed shapes)
        live = None if self.compiled else max(self._pos) + 1
        self._logits = self._decode(self.model, self.caches, token, pos, live).clone()  # [B, V]
        for s in range(self.slots):
            if busy[s]:
                self._pos[s] += 1
                self._fresh[s] = True
        self.stats["decode_passes"] += 1
        self.stats["slot_steps"] += self.slots
        self.stats["idle_slot_steps"] += self.slots - sum(busy)
