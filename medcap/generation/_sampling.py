"""The next token: greedy, or top-k sampling with one random stream per row.

In order: ``row_seed`` (a row's seed from the run's seed and the row's key),
``make_generators``, ``is_greedy``, ``sample``.

One ``torch.Generator`` per row makes a row's samples depend only on its own seed,
not on which other rows share its batch, so a resumed run (whose batches are cut
differently) draws the same tokens as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
from typing import List, Optional, Sequence

import torch

def row_seed(seed: int, key: str) -> int:
    """A stable 63-bit seed for one row from the run's seed and the row's key."""
    digest = hashlib.sha256(f"{int(seed)}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_generators(seeds: Sequence[int], device: torch.device | str = "cpu") -> List[torch.Generator]:
    gens = []
    for s in seeds:
        g = torch.Generator(device=device)
        g.manual_seed(int(s))
        gens.append(g)
    return gens


def is_greedy(temperature: float, top_k: Optional[int]) -> bool:
    return temperature is None or float(temperature) <= 0.0 or top_k == 1


def sample(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    generators: Optional[Sequence[torch.Generator]] = None,
) -> torch.Tensor:
    """``logits [b, V]`` -> next tokens ``[b]``.

    ``temperature <= 0`` (or ``top_k == 1``) is greedy. Otherwise the logits are
    scaled, cut to the ``top_k`` largest (all when ``None``) and sampled with the
    exponential race ``argmax(p / q), q ~ Exp(1)``, one ``q`` row per generator.
    """
    if is_greedy(temperature, top_k):
        return logits.argmax(dim=-1)
    if generators is None or len(generators) != logits.shape[0]:
        raise ValueError("sampling needs one torch.Generator per row")
    scaled = logits.float() / float(temperature)
    if top_k is not None:
        k = min(int(top_k), scaled.shape[-1])
        kth = torch.topk(scaled, k, dim=-1).values[:, -1:]  # [b, 1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)  # [b, V]
    q = torch.stack(
        [torch.empty(probs.shape[-1], device=probs.device).exponential_(1.0, generator=g) for g in generators]
    )  # [b, V]
    return (probs / q).argmax(dim=-1)
