"""The forward passes over a slot cache: prefill of newcomers and one decode step for every
slot, through our own layer loop and attention.

In order:

* ``SlotKVCache``: ``[slots, kv_heads, cache_len, head_dim]``; a slot's token at position
  ``p`` lives in column ``p``, so rows of any length share one step without left padding;
* ``prefill_slots``: new prompts (right padded, positions from 0) into their slots; each
  attends to its own columns ``0..L-1`` only, never to the rest of the cache;
* ``decode_step``: one token for every slot; attention reads the columns up to the longest
  live position (``live``), not the whole cache;
* ``vocab_weight_for_cpu``: the vocabulary projection's weight laid out for the CPU;
* ``run_layers`` and ``_attention``: torchtune's norms, projections, RoPE and MLP, our
  attention. Why not torchtune's ``MultiHeadAttention.forward``: with grouped KV heads it
  copies every layer's whole cache to the query heads' count (``expand`` + ``flatten``)
  and attends over every column on each decode step; here the query heads are grouped
  onto their KV head (``[b, kv, q_per_kv, d]``) and nothing is copied.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medcap.generation._static import model_dtype


class SlotKVCache(nn.Module):
    """A KV cache whose rows are independent slots, each token written at the column
    equal to its position."""

    def __init__(self, slots: int, cache_len: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype):
        super().__init__()
        shape = (slots, num_kv_heads, cache_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("slot_ids", torch.arange(slots), persistent=False)

    def regroup(self, keep: torch.Tensor, slots: int) -> None:
        """Rows ``keep`` become rows ``0..len(keep)-1`` of a cache of ``slots`` rows."""
        for name in ("k_cache", "v_cache"):
            old = getattr(self, name)
            new = old.new_zeros((slots, *old.shape[1:]))
            new[: keep.numel()] = old.index_select(0, keep)
            setattr(self, name, new)
        self.slot_ids = torch.arange(slots, device=self.slot_ids.device)


def vocab_weight_for_cpu(model: nn.Module) -> None:
    """On the CPU, store the vocabulary projection's weight transposed in memory (the same
    values and shape ``[V, d]``, strides ``(1, V)``). MKL multiplies a few rows by it 1.2x
    (64 rows) to 3x (one row) faster than by the row-major weight (V = 32k, d = 256 and
    1024, CPU time); the decoder's other weights gain nothing, so they stay as they are."""
    out = getattr(model.decoder, "output", None)
    if isinstance(out, nn.Linear) and out.weight.device.type == "cpu" and out.weight.is_contiguous():
        with torch.no_grad():
            out.weight.data = out.weight.data.t().contiguous().t()


# ---- the layer loop and its attention


def run_layers(model: nn.Module, h: torch.Tensor, caches: Sequence[SlotKVCache], *, pos: torch.Tensor,
               mask: torch.Tensor, slots: Optional[torch.Tensor], live: int) -> torch.Tensor:
    """``h [b, s, d]`` through every decoder layer (torchtune's ``TransformerSelfAttentionLayer``
    arithmetic, our attention) and the final norm. Prefill: ``slots [b]`` are the rows written,
    ``s`` columns from 0. Decode (``slots=None``): ``s = 1``, every slot writes column ``pos``."""
    for layer, cache in zip(model.decoder.layers, caches):
        attn_out = _attention(layer.attn, layer.sa_norm(h), cache, pos=pos, mask=mask, slots=slots, live=live)
        h = layer.sa_scale(attn_out) + h
        h = h + layer.mlp_scale(layer.mlp(layer.mlp_norm(h)))
    return model.decoder.norm(h)


def _attention(attn: nn.Module, x: torch.Tensor, cache: SlotKVCache, *, pos: torch.Tensor, mask: torch.Tensor,
               slots: Optional[torch.Tensor], live: int) -> torch.Tensor:
    """Self-attention of ``x [b, s, d]`` with the module's weights; new keys and values go
    into ``cache``. ``mask [b, s, columns]``: True where a query may look."""
    b, s, _ = x.shape
    n_kv, hd = attn.num_kv_heads, attn.head_dim
    group = attn.num_heads // n_kv
    q = attn.q_proj(x).view(b, s, attn.num_heads, hd)
    k = attn.k_proj(x).view(b, s, n_kv, hd)
    v = attn.v_proj(x).view(b, s, n_kv, hd)
    if attn.pos_embeddings is not None:
        q = attn.pos_embeddings(q, input_pos=pos)
        k = attn.pos_embeddings(k, input_pos=pos)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [b, heads, s, hd]
    if attn.q_norm is not None:
        q = attn.q_norm(q)
    if attn.k_norm is not None:
        k = attn.k_norm(k)
    if slots is not None:  # prefill: the prompt attends to itself, columns 0..s-1
        cache.k_cache[slots, :, :s] = k
        cache.v_cache[slots, :, :s] = v
        # only the prompt's own columns are copied to the query heads' count
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1),
                                             attn_mask=mask[:, None])  # [b, heads, s, hd]
    else:  # decode: one query per slot over the live columns, heads grouped onto their KV head
        cache.k_cache[cache.slot_ids, :, pos[:, 0]] = k[:, :, 0]
        cache.v_cache[cache.slot_ids, :, pos[:, 0]] = v[:, :, 0]
        keys, values = cache.k_cache[:, :, :live], cache.v_cache[:, :, :live]  # [b, kv, live, hd]
        scores = torch.matmul(q.view(b, n_kv, group, hd), keys.transpose(-1, -2)) * hd ** -0.5  # [b, kv, g, live]
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
        out = torch.matmul(probs, values).view(b, attn.num_heads, 1, hd)  # [b, heads, 1, hd]
    return attn.output_proj(out.transpose(1, 2).reshape(b, s, -1))


# ---- prefill and decode


def prefill_slots(model: nn.Module, caches: Sequence[SlotKVCache], prompts: Sequence[Sequence[int]],
                  images: Sequence[Optional[torch.Tensor]], slots: Sequence[int]) -> torch.Tensor:
    """Run new prompts (right padded, positions from 0) into cache rows ``slots``;
    returns the logits after each prompt's last token ``[n, V]``."""
    device = model.decoder.norm.scale.device
    n, longest = len(prompts), max(len(p) for p in prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)  # [n]
    tokens = torch.zeros(n, longest, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    tokens = tokens.to(device)  # [n, L]
    imgs = [im for im in images if im is not None]
    batch_images = torch.stack(imgs).to(device=device, dtype=model_dtype(model)) if imgs else None  # [n_img, 3, H, W]
    q = torch.arange(longest, device=device)
    # query t of row i sees columns <= t that hold its own prompt
    mask = (q[None, None, :] <= q[None, :, None]) & (q[None, None, :] < lengths[:, None, None])  # [n, L, L]
    h = model.embed(tokens, batch_images)  # [n, L, d]
    h = run_layers(model, h, caches, pos=q.expand(n, longest), mask=mask,
                   slots=torch.tensor(list(slots), device=device), live=longest)
    return model.logits(h[torch.arange(n, device=device), lengths - 1])  # [n, V]


def decode_step(model: nn.Module, caches: Sequence[SlotKVCache], token: torch.Tensor, pos: torch.Tensor,
                live: Optional[int] = None) -> torch.Tensor:
    """One token for every slot: ``token [B, 1]`` at positions ``pos [B, 1]`` -> logits
    ``[B, V]``. ``live``: columns attention reads (every slot's position is below it); the
    whole cache when ``None``, which keeps the shapes fixed for ``torch.compile``."""
    if live is None:
        live = caches[0].k_cache.shape[2]
    col = torch.arange(live, device=pos.device)
    mask = col[None, None, :] <= pos[:, :, None]  # [B, 1, live]
    # Decoded tokens come from the vocabulary, never the image id: no placeholder check.
    h = run_layers(model, model.tok_embeddings(token), caches, pos=pos, mask=mask, slots=None, live=live)
    return model.logits(h[:, -1])  # [B, V]
