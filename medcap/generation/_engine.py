"""``GenerationEngine``: a model, its tokenizer and the sampling settings, bundled for the
evaluation, ``medcap caption`` and the server: prompts in, texts out.

In order: the settings (``__init__``), ``prompt``, ``generate_tokens`` (the slow
reference path, the continuous batcher, or the static batches), ``open`` and
``submit`` (a batcher that takes requests at any time, for a server),
``generate_texts`` and ``score_options``.

Each row carries a ``key`` (e.g. its question id); with sampling, row ``key`` draws
from a generator seeded by ``row_seed(seed, key)``, so its text does not depend on
the batch it happens to share.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from medcap.generation._continuous import ContinuousBatcher, Request
from medcap.generation._prompt import build_prompt, decode_text
from medcap.generation._sampling import is_greedy, make_generators, row_seed
from medcap.generation._score import score_options
from medcap.generation._static import generate_reference

class GenerationEngine:
    """Batched text generation over a :class:`~medcap.models.MedcapModel`.

    Each row carries a ``key`` (e.g. its question id); with sampling, row ``key``
    draws from a generator seeded by ``row_seed(seed, key)``, so its text does not
    depend on the batch it happens to share. ``use_cache=False`` takes the
    reference's slow path (batch 1, no KV cache).

    With the cache, rows are continuously batched (``batch_size`` slots kept busy, a
    finished row's slot refilled at once; see ``ContinuousBatcher``); ``continuous=False``
    batches statically on the same steps (a batch runs until its longest row is done),
    kept for comparison. ``compile=True`` compiles the continuous decode step. ``open`` gives
    a batcher that accepts requests at any time (for a server).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        batch_size: int = 8,
        temperature: float = 0.0,
        top_k: Optional[int] = None,
        seed: int = 0,
        use_cache: bool = True,
        continuous: bool = True,
        compile: Union[bool, str] = False,
        chunk_size: Optional[int] = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.temperature = float(temperature or 0.0)
        self.top_k = None if top_k is None else int(top_k)
        self.seed = int(seed or 0)
        self.use_cache = bool(use_cache)
        self.continuous = bool(continuous)
        self.compile = compile  # True, or a torch.compile backend name
        # Rows the evaluation loop hands to one call (default: one batch). Continuous
        # batching refills a slot only from the rows of the same call: give it several
        # batches (e.g. 8 x batch_size) to keep the slots busy.
        self.chunk_size = int(chunk_size or batch_size)
        self._batcher: Optional[ContinuousBatcher] = None
        # what the last generate_tokens call cost (decode passes, slot-steps, ...)
        self.last_stats: Dict[str, int] = {}

    @property
    def num_image_tokens(self) -> int:
        return int(self.model.num_image_tokens)

    @property
    def device(self) -> torch.device:
        return self.model.decoder.norm.scale.device

    def prompt(self, question_or_messages, *, has_image: bool = True) -> List[int]:
        return build_prompt(
            self.tokenizer, question_or_messages, num_image_tokens=self.num_image_tokens, has_image=has_image
        )

    def generate_tokens(
        self,
        prompts: Sequence[Sequence[int]],
        images: Sequence[Optional[torch.Tensor]],
        max_new_tokens: Union[int, Sequence[int]],
        keys: Sequence[str],
    ) -> List[List[int]]:
        n = len(prompts)
        if len(images) != n or len(keys) != n:
            raise ValueError("prompts, images and keys must have the same length")
        budgets = [int(max_new_tokens)] * n if isinstance(max_new_tokens, int) else [int(x) for x in max_new_tokens]
        greedy = is_greedy(self.temperature, self.top_k)
        seeds = [row_seed(self.seed, k) for k in keys]
        out: List[List[int]] = []
        if not self.use_cache:
            for p, img, m, s in zip(prompts, images, budgets, seeds):
                gen = None if greedy else make_generators([s], self.device)[0]
                out.append(
                    generate_reference(
                        self.model, self.tokenizer, p, img, max_new_tokens=m,
                        temperature=self.temperature, top_k=self.top_k, generator=gen,
                    )
                )
            return out
        if n == 0:
            return []
        return self._generate_batched(prompts, images, budgets, seeds, greedy)

    def open(self, cache_len: int, slots: Optional[int] = None) -> ContinuousBatcher:
        """A batcher with ``slots`` (default ``batch_size``) slots of ``cache_len``
        positions (prompt + new tokens): ``submit`` requests at any time, drive it with
        ``step``/``run_until_done``. Reused while it fits (a compiled step is kept)."""
        slots = self.batch_size if slots is None else slots
        b = self._batcher
        keep = b is not None and b.slots == slots and (
            b.cache_len >= cache_len if self.compile else b.cache_len == cache_len)
        if not keep:
            b = self._batcher = ContinuousBatcher(
                self.model, self.tokenizer.stop_tokens, slots=slots, cache_len=cache_len,
                temperature=self.temperature, top_k=self.top_k, compile=self.compile,
            )
        return b

    def submit(self, batcher: ContinuousBatcher, prompt: Sequence[int], image: Optional[torch.Tensor],
               max_new_tokens: int, key: str) -> Request:
        """Queue one row on ``batcher`` with its own random stream (seeded by ``key``)."""
        gen = None
        if not is_greedy(self.temperature, self.top_k):
            gen = make_generators([row_seed(self.seed, key)], self.device)[0]
        return batcher.submit(prompt, image, max_new_tokens, gen)

    def _generate_batched(self, prompts, images, budgets, seeds, greedy) -> List[List[int]]:
        need = max(len(p) + m for p, m in zip(prompts, budgets)) if prompts else 1
        # A compiled step is specialised to the cache length: round it up so calls share it.
        if self.compile:  # one shape for every call
            batcher = self.open(-(-need // 256) * 256)
        else:  # a small call need not decode idle slots
            batcher = self.open(need, min(self.batch_size, len(prompts)))
        batcher.refill = self.continuous  # static batching: the same steps, a batch at a time
        before = dict(batcher.stats)
        gens = [None] * len(prompts) if greedy else make_generators(seeds, self.device)
        reqs = [batcher.submit(p, im, m, g) for p, im, m, g in zip(prompts, images, budgets, gens)]
        batcher.run_until_done()
        self.last_stats = {k: v - before.get(k, 0) for k, v in batcher.stats.items()}
        return [r.tokens for r in reqs]

    def generate_texts(
        self,
        prompts: Sequence[Sequence[int]],
        images: Sequence[Optional[torch.Tensor]],
        max_new_tokens: Union[int, Sequence[int]],
        keys: Sequence[str],
    ) -> List[str]:
        """Texts generated for ``prompts`` (each cut at its first special token, stripped)."""
        return [decode_text(self.tokenizer, t) for t in self.generate_tokens(prompts, images, max_new_tokens, keys)]

    def score_options(
        self,
        prompts: Sequence[Sequence[int]],
        images: Sequence[Optional[torch.Tensor]],
        options: Sequence[Sequence[str]],
        *,
        reduction: str = "sum",
    ) -> List[List[float]]:
        """Log-likelihood of each option after its prompt, ``batch_size`` prompts per forward."""
        out: List[List[float]] = []
        for lo in range(0, len(prompts), self.batch_size):
            hi = min(len(prompts), lo + self.batch_size)
            imgs = [im for im in images[lo:hi] if im is not None]
            out.extend(
                score_options(
                    self.model, self.tokenizer, prompts[lo:hi], torch.stack(imgs) if imgs else None,
                    options[lo:hi], reduction=reduction,
                )
            )
        return out
