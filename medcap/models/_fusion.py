"""The fused model: a frozen torchtune Llama decoder with image soft tokens spliced in.

Built on torchtune's ``EarlyFusionModel``, which embeds the text tokens and
``masked_scatter``s encoder outputs at the image token's positions. We add
what a silent splice cannot give: a check that the number of placeholders
equals the number of image vectors, and a way to run the decoder without the
vocabulary projection so the loss can compute logits only where labels are.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn
from torchtune.modules import TransformerDecoder
from torchtune.modules.model_fusion import EarlyFusionModel

from medcap.models._vision import VisionEncoder


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

    def trainable_parameters(self) -> Dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}


def assert_only_vision_trainable(model: MedcapModel) -> None:
    """Fail loudly if anything outside the vision encoder would train."""
    bad = [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("encoders.image.")]
    if bad:
        raise RuntimeError(f"the LLM must stay frozen, but these parameters require grad: {bad[:10]}")
    if not any(p.requires_grad for p in model.vision.parameters()):
        raise RuntimeError("no vision parameter requires grad: nothing would train")
