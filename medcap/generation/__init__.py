"""Generation: prompts with real special tokens, and batched KV-cached decoding with
image prefill (``GenerationEngine`` for images on disk, ``generate`` for tensors).
The engine batches continuously (a finished row's slot is refilled
at once; ``engine.open(cache_len)`` takes requests at any time, for a server).
The pieces (``prefill``, ``decode_one_token``, ``sample``, option scoring, the slow
reference path) live in ``_generate``; prompts and the batcher in ``_engine``."""

from medcap.generation._engine import (
    ContinuousBatcher,
    GenerationEngine,
    build_prompt,
    clean_text,
    decode_text,
    prompt_text,
    prompt_tokens_from_text,
    question_from_instruction,
    question_messages,
)
from medcap.generation._generate import generate

__all__ = [
    "ContinuousBatcher",
    "GenerationEngine",
    "build_prompt",
    "clean_text",
    "decode_text",
    "generate",
    "prompt_text",
    "prompt_tokens_from_text",
    "question_from_instruction",
    "question_messages",
]
