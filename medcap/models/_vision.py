"""The vision side: BiomedCLIP's image tower and the projector into the LLM.

Both are plain ``nn.Module`` trees whose parameter names match what the
reference saved, so that its checkpoints load unchanged:

* the tower matches open_clip's ``TimmModel`` (``trunk.*`` = a timm ViT,
  ``head.proj.weight`` = a bias-free linear head), class-token output;
* the projector is ``nn.Sequential(Linear, GELU, Linear)`` (keys ``0.*``, ``2.*``).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Optional

import timm
import torch
from torch import nn

# BiomedCLIP's evaluation transform (the OpenAI CLIP statistics).
BIOMEDCLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
BIOMEDCLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BIOMEDCLIP_HUB_ID = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"


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


def _resolve_open_clip_file(source: str) -> Path:
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
    path = _resolve_open_clip_file(source)
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
