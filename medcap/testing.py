"""Small, locally made stand-ins for the real assets, for tests, benchmarks and the demo.

Everything here is made on the spot, offline, in the same file formats as the
real thing: a tiktoken ``tokenizer.model`` with remapped special tokens, an HF
checkpoint directory of a Llama-3.1-architecture model (``config.json`` +
safetensors), synthetic images, and sharegpt JSON in the reference's layout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from medcap.models._tokenizer import model_vocab_size, write_tiktoken_tokenizer

PLACEHOLDER_CHAR = "\u2460"  # '①', the reference's image placeholder character


def tiny_llama_hf_config(vocab_size: int, **sizes: Any):
    """A transformers ``LlamaConfig`` equal to torchtune's ``llama3_1`` builder at small
    sizes: rope theta 5e5, llama3 rope scaling, rms eps 1e-5, untied embeddings."""
    from transformers import LlamaConfig

    num_layers = sizes.get("num_layers", 2)
    num_heads = sizes.get("num_heads", 4)
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=sizes.get("embed_dim", 64),
        intermediate_size=sizes.get("intermediate_dim", 128),
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=sizes.get("num_kv_heads", 2),
        max_position_embeddings=sizes.get("max_seq_len", 512),
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
    )


def make_tiny_llm(
    out_dir: str | Path,
    *,
    merges: Optional[List[bytes]] = None,
    seed: int = 0,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    embed_dim: int = 64,
    intermediate_dim: int = 128,
    max_seq_len: int = 512,
) -> Dict[str, Any]:
    """Write a tokenizer and an HF-format tiny Llama (random weights, fixed seed).

    Returns ``tokenizer_path``, ``special_tokens_path``, ``checkpoint_dir``,
    ``checkpoint_files``, ``image_token_id`` and ``model_kwargs`` (for
    :func:`medcap.models.medcap_tiny`: the decoder sizes and vocabulary).
    """
    import torch
    from transformers import LlamaForCausalLM

    out = Path(out_dir)
    tok = write_tiktoken_tokenizer(out / "original", merges or [])
    base = sum(1 for _ in open(tok["path"]))
    vocab = model_vocab_size(base)
    sizes = dict(
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        embed_dim=embed_dim,
        intermediate_dim=intermediate_dim,
        max_seq_len=max_seq_len,
    )
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(tiny_llama_hf_config(vocab, **sizes))
    hf.save_pretrained(out, safe_serialization=True)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    return {
        "tokenizer_path": str(tok["path"]),
        "special_tokens_path": str(tok["special_tokens_path"]),
        "checkpoint_dir": str(out),
        "checkpoint_files": files,
        "image_token_id": vocab,
        "model_kwargs": dict(vocab_size=vocab, image_token_id=vocab, **sizes),
    }


def make_image(path: str | Path, size: int = 40, seed: int = 0, mode: str = "RGB") -> Path:
    """A random-but-fixed synthetic image (no patient data), saved by Pillow."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB").convert(mode)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def make_caption_dataset(
    out_dir: str | Path,
    n: int = 8,
    *,
    image_size: int = 40,
    num_placeholders: int = 50,
    seed: int = 0,
    name: str = "train.json",
) -> Path:
    """A sharegpt JSON file in the reference's layout (``①`` x ``num_placeholders``,
    ``meta: dir=...``) over ``n`` synthetic images with short captions."""
    out = Path(out_dir)
    img_dir = out / "images"
    words = ["lesion", "mass", "opacity", "nodule", "left", "right", "upper", "lower", "small", "large"]
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        rel = f"img_{i:04d}.png"
        make_image(img_dir / rel, image_size, seed=seed * 1000 + i)
        caption = " ".join(rng.choice(words, size=int(rng.integers(3, 9))))
        records.append(
            {
                "conversations": [
                    {"from": "human", "value": PLACEHOLDER_CHAR * num_placeholders},
                    {"from": "gpt", "value": f"A {caption}."},
                ],
                "image": rel,
                "meta": f"dir={img_dir}",
            }
        )
    path = out / name
    path.write_text(json.dumps(records, indent=1))
    return path
