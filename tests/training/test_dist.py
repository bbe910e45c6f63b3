"""The process world's pieces that the recipe tests do not reach directly."""

from __future__ import annotations

import torch

from medcap.training import peak_memory_gib


def test_peak_memory_is_reported_on_cpu():
    before = peak_memory_gib(torch.device("cpu"))
    x = torch.ones(64, 2**20, dtype=torch.uint8)  # 64 MiB, touched
    x += 1
    after = peak_memory_gib(torch.device("cpu"))
    assert 0 < before <= after
