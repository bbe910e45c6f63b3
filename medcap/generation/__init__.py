"""Generation: prompts with real special tokens, batched KV-cached decoding with
image prefill, a slow reference path, and option log-likelihoods."""

from medcap.generation._engine import GenerationEngine
from medcap.generation._generate import decode_one_token, generate, generate_reference, left_pad, prefill
from medcap.generation._prompt import (
    IMAGE_PLACEHOLDER,
    build_prompt,
    clean_text,
    decode_text,
    message_has_image,
    message_text,
    parse_prompt_text,
    prompt_text,
    prompt_tokens_from_text,
    special_ids,
    question_from_instruction,
    question_messages,
)
from medcap.generation._sampling import is_greedy, make_generators, row_seed, sample
from medcap.generation._score import option_tokens, score_options

__all__ = [
    "GenerationEngine",
    "IMAGE_PLACEHOLDER",
    "build_prompt",
    "clean_text",
    "decode_one_token",
    "decode_text",
    "generate",
    "generate_reference",
    "is_greedy",
    "left_pad",
    "make_generators",
    "message_has_image",
    "message_text",
    "option_tokens",
    "parse_prompt_text",
    "prefill",
    "prompt_text",
    "prompt_tokens_from_text",
    "question_from_instruction",
    "question_messages",
    "row_seed",
    "sample",
    "score_options",
    "special_ids",
]
