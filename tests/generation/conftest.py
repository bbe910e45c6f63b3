"""Fixtures for the generation tests: the tiny LLM's tokenizer and a tiny fused model
holding its weights (vision side seeded), plus a few synthetic images."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def gen_tok(tiny_llm):
    from medcap.models import llama3_tokenizer

    return llama3_tokenizer(tiny_llm["tokenizer_path"], tiny_llm["special_tokens_path"])


@pytest.fixture(scope="session")
def gen_model(tiny_model):
    """A tiny MedcapModel in eval mode, 4 image tokens, fp32 (read-only: do not train)."""
    model = tiny_model(num_image_tokens=4, seed=3)
    model.requires_grad_(False)
    return model.eval()


@pytest.fixture(scope="session")
def gen_images(gen_model):
    """Six distinct image tensors [6, 3, S, S] at the tiny tower's size."""
    size = gen_model.vision.visual.image_size
    g = torch.Generator().manual_seed(11)
    return torch.randn(6, 3, size, size, generator=g)
