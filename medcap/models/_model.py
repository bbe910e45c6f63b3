"""The model: BiomedCLIP's image tower and the projector, the frozen Llama decoder they
feed, and the builders that configs name in ``_component_``. In order:

* the vision side: ``ImageTower`` (open_clip's ``TimmModel`` layout, so the reference's
  checkpoints load unchanged), the projector ``Linear, GELU, Linear`` into
  ``num_image_tokens`` soft tokens, ``VisionEncoder`` (both), BiomedCLIP's weights;
* the fused model: ``MedcapModel``, torchtune's ``EarlyFusionModel`` with a check that
  placeholders and image vectors pair up, and the decoder runnable without the
  vocabulary projection (``hidden_states`` / ``logits``, so the loss projects only label
  positions);
* the builders, torchtune style: ``medcap_fusion`` (fully parameterised),
  ``medcap_llama3_1_8b`` (the real sizes), ``medcap_tiny``, and ``hf_llama3_1_config``
  for writing small decoders in Hugging Face format.

Why one file for the three: ``docs/internals.md``.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Optional

import timm
import torch
from torch import nn
from torchtune.models.llama3_1 import llama3_1
from torchtune.modules import TransformerDecoder
from torchtune.modules.model_fusion import EarlyFusionModel

# ---- The vision side: image tower and projector

# BiomedCLIP's evaluation transform (the OpenAI CLIP statistics).
BIOMEDCLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
BIOMEDCLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageTower(nn.Module):
    """A timm ViT trunk with a linear head, laid out like open_clip's ``TimmModel``.

    Built here rather than through ``TimmModel`` because that class cannot take
    timm's size arguments (``img_size``, ``embed_dim``, ``depth`` ...), which the
    tiny test and demo towers need. The default arguments give BiomedCLIP's tower.
    ``timm_kwargs`` go to ``timm.create_model`` (there ``embed_dim`` is the ViT width).
    """

    def __init__(
        self,
        model_name: str = "vit_base_patch16_224",
        output_dim: int = 512,
        drop: float = 0.0,
        **timm_kwargs,
    ):
        super().__init__()
        # num_classes=0 drops timm's classifier; the default 'token' pool keeps
        # the class-token output, as TimmModel(pool='') does.
        self.trunk = timm.create_model(model_name, pretrained=False, num_classes=0, **timm_kwargs)
        self.head = nn.Sequential(
            OrderedDict(drop=nn.Dropout(drop), proj=nn.Linear(self.trunk.num_features, output_dim, bias=False))
        )
        self.output_dim = output_dim
        self.image_size = int(self.trunk.patch_embed.img_size[0])
        # how to build it again (recorded in checkpoints; medcap export's model code builds it from this)
        self.timm_spec = {"timm_model": model_name, "timm_kwargs": dict(timm_kwargs), "output_dim": int(output_dim)}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # images: [n, 3, H, W] -> [n, output_dim]
        return self.head(self.trunk(images))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)


def biomedclip_tower(pretrained: Optional[str] = None) -> ImageTower:
    """BiomedCLIP's image tower: ViT-B/16 at 224 px, 512-d output, 86 M parameters.

    ``pretrained`` is a local ``open_clip_pytorch_model.bin`` (or a folder holding
    one), or ``hf-hub:microsoft/BiomedCLIP-...`` to fetch it when online; ``None``
    leaves random weights (for when a medcap vision checkpoint follows).
    """
    tower = ImageTower("vit_base_patch16_224", output_dim=512)
    if pretrained:
        load_open_clip_visual(tower, pretrained)
    return tower


def tiny_tower(
    image_size: int = 32,
    patch_size: int = 8,
    width: int = 32,
    depth: int = 2,
    heads: int = 2,
    output_dim: int = 24,
) -> ImageTower:
    """A small ViT of the same design (class token, linear head), for tests and the demo."""
    return ImageTower(
        "vit_base_patch16_224",
        output_dim=output_dim,
        img_size=image_size,
        patch_size=patch_size,
        embed_dim=width,
        depth=depth,
        num_heads=heads,
    )


def projector(in_dim: int, hidden_dim: int, embed_dim: int, num_image_tokens: int) -> nn.Sequential:
    """Linear(in -> hidden), GELU, Linear(hidden -> embed_dim * num_image_tokens).

    The reference's sizes are 512 -> 4096 -> 4096 x 50 (about 840 M parameters,
    nearly all in the second layer).
    """
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.GELU(),
        nn.Linear(hidden_dim, embed_dim * num_image_tokens),
    )


class VisionEncoder(nn.Module):
    """Image tower + projector: images -> ``num_image_tokens`` soft tokens for the LLM."""

    def __init__(self, visual: nn.Module, projector: nn.Module, num_image_tokens: int, embed_dim: int):
        super().__init__()
        self.visual = visual
        self.projector = projector
        self.num_image_tokens = num_image_tokens
        self.embed_dim = embed_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.visual(images)  # [n, vision_dim]
        out = self.projector(feats)  # [n, embed_dim * num_image_tokens]
        return out.view(images.shape[0], self.num_image_tokens, self.embed_dim)  # [n, T, D]


def open_clip_weights_file(source: str) -> Path:
    """A local path to an open_clip checkpoint (BiomedCLIP's): a file, a folder holding
    ``open_clip_pytorch_model.bin``, or an ``hf-hub:`` name, fetched now."""
    if source.startswith("hf-hub:"):
        try:
            from huggingface_hub import hf_hub_download
        except ImportError as e:  # pragma: no cover - huggingface_hub ships with transformers
            raise RuntimeError("huggingface_hub is needed for hf-hub: sources") from e
        repo = source[len("hf-hub:"):]
        try:
            return Path(hf_hub_download(repo, "open_clip_pytorch_model.bin"))
        except Exception as e:
            raise RuntimeError(
                f"could not fetch {source!r} ({type(e).__name__}: {e}). Offline, download "
                "open_clip_pytorch_model.bin once and pass its local path instead."
            ) from e
    path = Path(source)
    if path.is_dir():
        path = path / "open_clip_pytorch_model.bin"
    if not path.is_file():
        raise FileNotFoundError(f"BiomedCLIP weights not found: {str(path)!r}")
    return path


def load_open_clip_visual(tower: nn.Module, source: str) -> None:
    """Load the image tower of an open_clip checkpoint (keys ``visual.trunk.*``,
    ``visual.head.proj.weight``) into ``tower``; the text tower is ignored.

    The file is read with ``weights_only=True``: no code is unpickled.
    """
    path = open_clip_weights_file(source)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    if not visual:
        raise ValueError(f"{str(path)!r} holds no 'visual.*' weights: is it an open_clip checkpoint?")
    missing, unexpected = tower.load_state_dict(visual, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{str(path)!r} does not fit the image tower: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )


# ---- The fused model

class ImageTokenMismatchError(ValueError):
    """The prompt's image placeholders and the image vectors do not pair up."""


class MedcapModel(EarlyFusionModel):
    """``EarlyFusionModel`` with one encoder, ``"image"``; the decoder is frozen,
    the vision encoder (tower + projector) trainable.

    Call it like a torchtune decoder, with the images as ``images=[n, 3, H, W]``
    (or torchtune's ``encoder_input={"image": {"images": ...}}``). ``n`` is the
    number of samples in the batch that hold an image; their placeholders are
    filled in batch order.
    """

    def __init__(self, decoder: TransformerDecoder, encoder: VisionEncoder, image_token_id: int):
        super().__init__(
            decoder,
            encoders={"image": encoder},
            encoder_tokens={"image": image_token_id},
            decoder_trainable=False,
            encoders_trainable=True,
            fusion_trainable=True,
        )
        self.image_token_id = image_token_id
        self.num_image_tokens = encoder.num_image_tokens

    @property
    def vision(self) -> VisionEncoder:
        return self.encoders["image"]

    def check_placeholders(self, tokens: torch.Tensor, num_images: int) -> None:
        """Raise :class:`ImageTokenMismatchError` unless every row holds whole images
        and the batch holds exactly ``num_images`` of them."""
        per_row = (tokens == self.image_token_id).sum(dim=1)  # [b]
        total = int(per_row.sum())
        t = self.num_image_tokens
        if total != num_images * t or bool((per_row % t).any()):
            raise ImageTokenMismatchError(
                f"the batch has {total} image placeholder tokens (per row: {per_row.tolist()}) "
                f"but {num_images} image(s) x {t} image tokens = {num_images * t} image vectors. "
                "Each image needs exactly one run of placeholders; was a sample truncated into its image?"
            )
        if total:
            # Counts can add up while a run is split by text (the vectors would land in two
            # places): every group of t placeholders, in row order, must be contiguous.
            cols = (tokens == self.image_token_id).nonzero()[:, 1].view(-1, t)  # [n_img, t]
            split = (cols[:, -1] - cols[:, 0]) != t - 1  # [n_img]
            if bool(split.any()):
                raise ImageTokenMismatchError(
                    f"image placeholder runs are split by other tokens (image(s) {split.nonzero()[:, 0].tolist()} "
                    f"in batch order): each image needs one unbroken run of {t} placeholders"
                )

    def embed(self, tokens: torch.Tensor, images: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token embeddings with the image vectors at the placeholders: [b, s] -> [b, s, d]."""
        n_img = 0 if images is None else images.shape[0]
        self.check_placeholders(tokens, n_img)
        is_text, text_embeds = self._decoder_embed(tokens)  # [b, s], [n_text, d]
        b, s = tokens.shape
        d = text_embeds.shape[-1]
        fused = torch.empty(b, s, d, dtype=text_embeds.dtype, device=text_embeds.device)
        fused = fused.masked_scatter(is_text.unsqueeze(-1), text_embeds)
        if n_img:
            img = self.vision(images).to(text_embeds.dtype)  # [n, T, d]
            fused = fused.masked_scatter(~is_text.unsqueeze(-1), img.reshape(-1, d))
        return fused

    @staticmethod
    def _images_from(images, encoder_input) -> Optional[torch.Tensor]:
        if encoder_input:
            if set(encoder_input) != {"image"}:
                raise ValueError(f"encoder_input keys must be {{'image'}}, got {set(encoder_input)}")
            return encoder_input["image"]["images"]
        return images

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        mask: Optional[torch.Tensor] = None,
        encoder_input: Optional[Dict[str, Dict[str, Any]]] = None,
        input_pos: Optional[torch.Tensor] = None,
        images: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Logits ``[b, s, vocab]`` (float32), as torchtune's decoder returns them."""
        fused = self.embed(tokens, self._images_from(images, encoder_input))
        return self.decoder(fused, mask=mask, input_pos=input_pos)

    def hidden_states(
        self,
        tokens: torch.Tensor,
        *,
        images: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
        input_pos: Optional[torch.Tensor] = None,
        embeds: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The decoder's final normed hidden states ``[b, s, d]``, without the
        vocabulary projection (apply :meth:`logits` where it is needed)."""
        h = self.embed(tokens, images) if embeds is None else embeds
        for layer in self.decoder.layers:
            h = layer(h, mask=mask, input_pos=input_pos)
        return self.decoder.norm(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary projection of (selected) hidden states, in float32."""
        return self.decoder.output(hidden).float()

    def setup_caches(
        self, batch_size: int, dtype: torch.dtype, *, decoder_max_seq_len: Optional[int] = None
    ) -> None:
        """KV caches sized to ``decoder_max_seq_len`` (torchtune 0.6.1's fusion model
        drops that argument and sizes them for the model's full context)."""
        self.decoder.setup_caches(batch_size, dtype, decoder_max_seq_len=decoder_max_seq_len)


def assert_only_vision_trainable(model: MedcapModel) -> None:
    """Fail loudly if anything outside the vision encoder would train."""
    bad = [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("encoders.image.")]
    if bad:
        raise RuntimeError(f"the LLM must stay frozen, but these parameters require grad: {bad[:10]}")
    if not any(p.requires_grad for p in model.vision.parameters()):
        raise RuntimeError("no vision parameter requires grad: nothing would train")


# ---- Builders

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
