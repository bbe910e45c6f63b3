"""Generation: prompts with real special tokens, and batched KV-cached decoding with
image prefill (``GenerationEngine`` for images on disk, ``generate`` for tensors).
The engine batches continuously (``_continuous``: a finished row's slot is refilled
at once; ``engine.open(cache_len)`` takes requests at any time, for a server).
The pieces (``prefill``, ``decode_one_token``, ``sample``, option scoring, the slow
reference path) live in the private modules."""

from medcap.generation._engine import GenerationEngine
from medcap.generation._generate import generate
from medcap.generation._prompt import (
    build_prompt,
    clean_text,
    prompt_text,
    prompt_tokens_from_text,
    question_from_instruction,
)

__all__ = [
    "GenerationEngine",
    "build_prompt",
    "clean_text",
    "generate",
    "prompt_text",
    "prompt_tokens_from_text",
    "question_from_instruction",
]
