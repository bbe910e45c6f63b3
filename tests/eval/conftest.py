"""Fixtures for the evaluation tests: the tiny tokenizer, a scripted stand-in for the
generation engine (records every call, answers by rule), and the real tiny engine."""

from __future__ import annotations

from typing import Callable, List, Optional

import pytest
import torch

from medcap.generation import build_prompt, prompt_text


class ScriptedEngine:
    """Quacks like ``GenerationEngine``: real prompts, scripted texts.

    ``reply(prompt_text, key, budget) -> str`` decides each text; every call is
    recorded in ``calls`` as ``(texts of the prompts, images given?, budgets, keys)``.
    """

    def __init__(self, tokenizer, reply: Callable[[str, str, int], str], batch_size: int = 3, num_image_tokens: int = 4):
        self.tokenizer = tokenizer
        self.reply = reply
        self.batch_size = batch_size
        self.num_image_tokens = num_image_tokens
        self.calls: List[tuple] = []

    def prompt(self, question_or_messages, *, has_image: bool = True) -> List[int]:
        return build_prompt(self.tokenizer, question_or_messages, num_image_tokens=self.num_image_tokens, has_image=has_image)

    def generate_texts(self, prompts, images, max_new_tokens, keys) -> List[str]:
        budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        texts = [prompt_text(self.tokenizer, p) for p in prompts]
        self.calls.append((texts, [im is not None for im in images], budgets, list(keys)))
        for p, im in zip(prompts, images):
            assert (self.tokenizer.image_id in p) == (im is not None), "image and placeholders disagree"
        return [self.reply(t, k, b) for t, k, b in zip(texts, keys, budgets)]

    def score_options(self, prompts, images, options, *, reduction="sum"):
        raise AssertionError("not scripted")


@pytest.fixture(scope="session")
def ev_tok(tiny_llm):
    from medcap.models import llama3_tokenizer

    return llama3_tokenizer(tiny_llm["tokenizer_path"], tiny_llm["special_tokens_path"])


@pytest.fixture
def scripted(ev_tok):
    """``scripted(reply, batch_size=3)`` -> a ScriptedEngine on the tiny tokenizer."""

    def make(reply, batch_size: int = 3):
        return ScriptedEngine(ev_tok, reply, batch_size=batch_size)

    return make


@pytest.fixture
def fake_image_loader():
    """Image path -> a fixed tensor (checks the file exists); counts loads."""
    from pathlib import Path

    from medcap.data import BadSample

    loads: List[str] = []

    def load(path: str) -> torch.Tensor:
        if not Path(path).is_file():
            raise BadSample(f"image not found: {path}")
        loads.append(path)
        return torch.zeros(3, 32, 32)

    load.loads = loads
    return load


@pytest.fixture(scope="session")
def ev_engine_factory(tiny_model, ev_tok):
    """``ev_engine_factory(batch_size=3, **kw)`` -> a real GenerationEngine on a tiny model."""
    from medcap.generation import GenerationEngine

    model = tiny_model(num_image_tokens=4, seed=1).eval()
    model.requires_grad_(False)

    def make(batch_size: int = 3, **kw):
        return GenerationEngine(model, ev_tok, batch_size=batch_size, **kw)

    return make
