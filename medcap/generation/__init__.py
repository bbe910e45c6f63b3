"""Generation: prompts with the real special tokens, and batched KV-cached decoding with
image prefill (``GenerationEngine`` for images on disk, ``generate`` for tensors).

Where each lives: ``_prompt`` (prompts and their text form), ``_sampling`` (the next
token, one random stream per row), ``_static`` (gpt-fast style ``prefill``,
``decode_one_token``, the static batched ``generate`` and the slow reference path),
``_continuous`` (the continuous batcher: a finished row's slot is refilled at once),
``_score`` (options scored by log-likelihood), ``_engine`` (``GenerationEngine``, which
the evaluation, ``medcap caption`` and the server call; ``engine.open(cache_len)``
takes requests at any time, for a server); the vLLM backend: ``_vllm`` (the embeddings
sent and the client), ``_vllm_server`` (vLLM's server as a child process),
``_vllm_engine`` (``VllmEngine``: the same interface, vLLM decoding).
"""

from medcap.generation._continuous import ContinuousBatcher
from medcap.generation._engine import GenerationEngine
from medcap.generation._prompt import (
    build_prompt,
    clean_text,
    decode_text,
    prompt_text,
    prompt_tokens_from_text,
    question_from_instruction,
    question_messages,
)
from medcap.generation._static import generate
from medcap.generation._vllm import VllmError
from medcap.generation._vllm_engine import VllmEngine

__all__ = [
    "ContinuousBatcher",
    "GenerationEngine",
    "VllmEngine",
    "VllmError",
    "build_prompt",
    "clean_text",
    "decode_text",
    "generate",
    "prompt_text",
    "prompt_tokens_from_text",
    "question_from_instruction",
    "question_messages",
]
