"""Pieces of the loop that the recipe tests do not reach directly."""

from __future__ import annotations

import torch
from medcap.training import LabelTokenCrossEntropy, TrainForward, peak_memory_gib


def _text_only_batch(model, b=2, s=10):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 200, (b, s), generator=g)
    labels = tokens.clone()
    labels[:, :4] = -100
    return tokens, labels


def test_keep_graph_lets_every_rank_run_backward_without_images(tiny_model):
    """A rank whose batch has no image must still run backward through the (sharded)
    decoder layers, or the other ranks would wait for its all-gathers forever."""
    model = tiny_model()
    model.requires_grad_(False)
    model.vision.requires_grad_(True)
    tokens, labels = _text_only_batch(model)
    plain_total, _ = TrainForward(model, LabelTokenCrossEntropy())(tokens, labels)
    assert not plain_total.requires_grad  # single device: nothing to learn, backward skipped
    seen = []
    hooks = [layer.register_full_backward_hook(lambda m, gi, go: seen.append(m)) for layer in model.decoder.layers]
    total, count = TrainForward(model, LabelTokenCrossEntropy(), keep_graph=True)(tokens, labels)
    assert total.requires_grad and int(count) == int((labels[:, 1:] != -100).sum())
    total.backward()
    for h in hooks:
        h.remove()
    assert len(seen) == len(model.decoder.layers)  # backward went through every layer
    torch.testing.assert_close(total.detach(), plain_total)


def test_peak_memory_is_reported_on_cpu():
    before = peak_memory_gib(torch.device("cpu"))
    x = torch.ones(64, 2**20, dtype=torch.uint8)  # 64 MiB, touched
    x += 1
    after = peak_memory_gib(torch.device("cpu"))
    assert 0 < before <= after
