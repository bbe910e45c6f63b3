"""The next token: greedy, top-k, and one random stream per row."""

from __future__ import annotations

import pytest
import torch

from medcap.generation._sampling import make_generators, sample


def test_sample_greedy_topk_and_determinism():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    assert torch.equal(sample(logits), logits.argmax(-1))
    assert torch.equal(sample(logits, temperature=1.0, top_k=1), logits.argmax(-1))
    top = torch.topk(logits, 5, dim=-1).indices
    draws = []
    gens = make_generators([1, 2, 3])
    for _ in range(200):
        d = sample(logits, temperature=1.0, top_k=5, generators=gens)
        assert all(int(d[i]) in top[i].tolist() for i in range(3))
        draws.append(d)
    assert len({tuple(d.tolist()) for d in draws}) > 1
    again = make_generators([1, 2, 3])
    assert torch.equal(sample(logits, temperature=1.0, top_k=5, generators=again), draws[0])
    with pytest.raises(ValueError, match="Generator"):
        sample(logits, temperature=1.0, top_k=5)
