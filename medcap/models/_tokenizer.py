"""Llama 3 tokenizers: the real one, and small tiktoken-format ones made locally.

The real Llama 3 tokenizer hard-codes its special tokens at ids 128000+ and
``<|image|>`` at 128256, one past Llama-3.1-8B's vocabulary. A small tiktoken
file needs its special tokens remapped right after its base vocabulary, else
its vocabulary would still count 128,257 ids. We keep the same shape: every
special token inside the vocabulary except ``<|image|>``, which sits one past
the end, exactly like the real model.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from torchtune.models.llama3 import Llama3Tokenizer
from torchtune.models.llama3 import llama3_tokenizer as _tt_llama3_tokenizer

IMAGE_TOKEN = "<|image|>"

# The special tokens Llama3Tokenizer reads by name, in the real tokenizer's order.
_SPECIAL_NAMES: Sequence[str] = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|video|>",
)


def llama3_tokenizer(
    path: str,
    special_tokens_path: Optional[str] = None,
    max_seq_len: Optional[int] = None,
) -> Llama3Tokenizer:
    """The Llama 3 tokenizer from a tiktoken ``tokenizer.model``.

    ``special_tokens_path`` is a Hugging Face ``tokenizer.json`` (or a JSON file
    with the same ``added_tokens`` list); without it the canonical Llama 3 ids are
    used. A missing file is reported with its path before torchtune sees it.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"tokenizer file not found: {path!r} (for Llama-3.1-8B-Instruct it is "
            "<checkpoint dir>/original/tokenizer.model)"
        )
    if special_tokens_path is not None and not Path(special_tokens_path).is_file():
        raise FileNotFoundError(f"special tokens file not found: {special_tokens_path!r}")
    return _tt_llama3_tokenizer(path, special_tokens_path=special_tokens_path, max_seq_len=max_seq_len)


def special_token_map(base_vocab_size: int) -> Dict[str, int]:
    """Special tokens remapped to follow a base vocabulary of ``base_vocab_size``.

    All sit inside the model's vocabulary except ``<|image|>``, which is
    ``model_vocab_size(base_vocab_size)``: outside, as in Llama-3.1-8B.
    """
    mapping = {name: base_vocab_size + i for i, name in enumerate(_SPECIAL_NAMES)}
    mapping[IMAGE_TOKEN] = base_vocab_size + len(_SPECIAL_NAMES)
    return mapping


def model_vocab_size(base_vocab_size: int) -> int:
    """Embedding rows a model needs for a tokenizer made by :func:`write_tiktoken_tokenizer`."""
    return base_vocab_size + len(_SPECIAL_NAMES)


def write_tiktoken_tokenizer(
    out_dir: str | Path,
    merges: Iterable[bytes] = (),
) -> Dict[str, Path]:
    """Write a tiktoken-format tokenizer and its remapped special tokens.

    The base vocabulary is the 256 single bytes (so every text encodes) followed by
    ``merges`` in rank order; each merge must be the concatenation of two earlier
    tokens for tiktoken's BPE to reach it. Returns the paths of ``tokenizer.model``
    and ``special_tokens.json``; load them with :func:`llama3_tokenizer`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab: List[bytes] = [bytes([b]) for b in range(256)]
    seen = set(vocab)
    for m in merges:
        if m not in seen:
            vocab.append(m)
            seen.add(m)
    model_path = out / "tokenizer.model"
    with open(model_path, "w") as f:
        for rank, tok in enumerate(vocab):
            f.write(f"{base64.b64encode(tok).decode()} {rank}\n")
    special = special_token_map(len(vocab))
    special_path = out / "special_tokens.json"
    with open(special_path, "w") as f:
        json.dump({"added_tokens": [{"content": k, "id": v} for k, v in special.items()]}, f, indent=1)
    return {"path": model_path, "special_tokens_path": special_path}
