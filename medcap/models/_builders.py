"""Model builders, torchtune style: one fully parameterised component builder and
builders with fixed sizes (the real model and tiny ones) for configs' ``_component_``."""

from __future__ import annotations

from typing import Any, Optional

from torchtune.models.llama3_1 import llama3_1

from medcap.models._fusion import MedcapModel
from medcap.models._tokenizer import IMAGE_TOKEN
from medcap.models._vision import VisionEncoder, biomedclip_tower, load_open_clip_visual, projector, tiny_tower

# One value owns the number of image tokens; configs pass it to both the
# data transform and the model.
NUM_IMAGE_TOKENS = 50
LLAMA3_IMAGE_TOKEN_ID = 128256  # `<|image|>` in the Llama 3 tokenizer: one past the 8B vocabulary

VISION_CHOICES = ("biomedclip",)


def check_vision(vision: str) -> str:
    """The reference accepts only ``biomedclip``; anything else is an error."""
    if vision not in VISION_CHOICES:
        raise ValueError(f"vision={vision!r} is not supported; choose one of {list(VISION_CHOICES)}")
    return vision


def medcap_fusion(
    *,
    decoder,
    visual,
    embed_dim: int,
    num_image_tokens: int,
    projector_hidden_dim: int,
    image_token_id: int,
) -> MedcapModel:
    """Component builder: wire a decoder and an image tower into a :class:`MedcapModel`."""
    proj = projector(visual.output_dim, projector_hidden_dim, embed_dim, num_image_tokens)
    encoder = VisionEncoder(visual, proj, num_image_tokens=num_image_tokens, embed_dim=embed_dim)
    return MedcapModel(decoder, encoder, image_token_id=image_token_id)


def medcap_llama3_1_8b(
    num_image_tokens: int = NUM_IMAGE_TOKENS,
    image_token_id: int = LLAMA3_IMAGE_TOKEN_ID,
    vision: str = "biomedclip",
    vision_pretrained: Optional[str] = None,
    projector_hidden_dim: int = 4096,
    max_seq_len: int = 131072,
) -> MedcapModel:
    """Llama-3.1-8B(-Instruct) + BiomedCLIP ViT-B/16 + projector 512 -> 4096 -> 4096 x 50.

    ``vision_pretrained``: BiomedCLIP's ``open_clip_pytorch_model.bin`` (path or
    ``hf-hub:``) to start the tower from; leave it out when a medcap vision
    checkpoint will be loaded over it.
    """
    check_vision(vision)
    decoder = llama3_1(
        vocab_size=128_256,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        embed_dim=4096,
        max_seq_len=max_seq_len,
        intermediate_dim=14336,
        attn_dropout=0.0,
        norm_eps=1e-5,
        rope_base=500_000,
    )
    return medcap_fusion(
        decoder=decoder,
        visual=biomedclip_tower(vision_pretrained),
        embed_dim=4096,
        num_image_tokens=num_image_tokens,
        projector_hidden_dim=projector_hidden_dim,
        image_token_id=image_token_id,
    )


def medcap_tiny(
    vocab_size: int,
    image_token_id: int,
    num_image_tokens: int = 4,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    embed_dim: int = 64,
    intermediate_dim: int = 128,
    max_seq_len: int = 512,
    image_size: int = 32,
    patch_size: int = 8,
    vision_width: int = 32,
    vision_depth: int = 2,
    vision_heads: int = 2,
    vision_dim: int = 24,
    projector_hidden_dim: int = 64,
    vision: str = "biomedclip",
    vision_pretrained: Optional[str] = None,
) -> MedcapModel:
    """A Llama-3.1-architecture decoder and a ViT of BiomedCLIP's design at small sizes.

    ``vision_pretrained`` (an open_clip checkpoint whose tower has these sizes) is
    accepted so that configs written for the real model keep working when only
    ``model._component_`` is overridden."""
    check_vision(vision)
    decoder = llama3_1(
        vocab_size=vocab_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        embed_dim=embed_dim,
        max_seq_len=max_seq_len,
        intermediate_dim=intermediate_dim,
    )
    visual = tiny_tower(
        image_size=image_size,
        patch_size=patch_size,
        width=vision_width,
        depth=vision_depth,
        heads=vision_heads,
        output_dim=vision_dim,
    )
    if vision_pretrained:
        load_open_clip_visual(visual, vision_pretrained)
    return medcap_fusion(
        decoder=decoder,
        visual=visual,
        embed_dim=embed_dim,
        num_image_tokens=num_image_tokens,
        projector_hidden_dim=projector_hidden_dim,
        image_token_id=image_token_id,
    )


def hf_llama3_1_config(vocab_size: int, **sizes: Any):
    """The transformers ``LlamaConfig`` of the decoder ``llama3_1`` builds at these sizes
    (``num_layers``, ``num_heads``, ``num_kv_heads``, ``embed_dim``, ``intermediate_dim``,
    ``max_seq_len``): rope theta 5e5, llama3 rope scaling, rms eps 1e-5, untied embeddings.
    For writing small decoders in Hugging Face format (the demo's LM, tests' tiny LLMs)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=sizes.get("embed_dim", 64),
        intermediate_size=sizes.get("intermediate_dim", 128),
        num_hidden_layers=sizes.get("num_layers", 2),
        num_attention_heads=sizes.get("num_heads", 4),
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
