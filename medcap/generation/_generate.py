"""Batched generation with image prefill and a KV cache sized to the batch.

gpt-fast style: small functions (``left_pad``, ``prefill``, ``decode_one_token``)
over a static cache. The prompt batch is left padded so every row's next token
lands in the same cache slot; the padding mask turns into per-row attention
masks and right-shifted position ids. The images go in with the prefill only:
after it their vectors live in the cache like any other token.

The cache holds ``max prompt length + max new tokens`` positions, not the
model's 131k (torchtune's fusion model would size it for the full context,
~16 GiB per sequence for Llama-3.1-8B in bf16). Rows that stop early are
dropped from the cache when a quarter of the batch has stopped, so they stop
costing compute.

``generate_reference`` is the slow path the reference took: one sample at a
time, no cache, the whole sequence recomputed for every new token. Greedy
outputs of both are the same token for token (tested).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torchtune.generation import get_causal_mask_from_padding_mask, get_position_ids_from_padding_mask
from torchtune.modules import delete_kv_caches
from torchtune.modules.kv_cache import KVCache

from medcap.generation._sampling import is_greedy, make_generators, sample

IntOrList = Union[int, Sequence[int]]


def _per_row(value: Optional[IntOrList], n: int, name: str) -> List[Optional[int]]:
    if value is None or isinstance(value, int):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{name} has {len(value)} entries for {n} prompts")
    return value


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Left pad prompts: ``tokens [b, L]`` and ``padding_mask [b, L]`` (True = real token)."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt")
    longest = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, longest - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[i, longest - len(p) :] = True
    return tokens, mask


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.decoder.parameters()).dtype


def _max_seq_len(model: nn.Module) -> int:
    return int(model.decoder.max_seq_len)


def prefill(
    model: nn.Module,
    tokens: torch.Tensor,
    padding_mask: torch.Tensor,
    images: Optional[torch.Tensor],
    cache_len: int,
) -> torch.Tensor:
    """Run the padded prompts (with their images) through the model, filling the
    cache; returns the logits of each row's last position ``[b, V]``."""
    mask = get_causal_mask_from_padding_mask(padding_mask, target_seq_len=cache_len)  # [b, L, cache_len]
    input_pos = get_position_ids_from_padding_mask(padding_mask)  # [b, L]
    h = model.hidden_states(tokens, images=images, mask=mask, input_pos=input_pos)  # [b, L, d]
    return model.logits(h[:, -1])  # [b, V]


def decode_one_token(model: nn.Module, token: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One cached step: ``token [b, 1]`` at positions ``pos [b, 1]`` with ``mask
    [b, 1, cache_len]`` -> logits ``[b, V]``."""
    # Decoded tokens come from the vocabulary, never the image id (one past it), so the
    # placeholder check and the masked splice would only cost a host sync per step.
    embeds = model.tok_embeddings(token)  # [b, 1, d]
    h = model.hidden_states(token, embeds=embeds, mask=mask, input_pos=pos)  # [b, 1, d]
    return model.logits(h[:, -1])


def _compact_caches(model: nn.Module, keep: torch.Tensor) -> None:
    """Keep only the cache rows ``keep`` (finished rows stop costing compute)."""
    for m in model.modules():
        if isinstance(m, KVCache):
            m.k_cache = m.k_cache.index_select(0, keep)
            m.v_cache = m.v_cache.index_select(0, keep)
            m.batch_size = int(keep.numel())


def _check_fits(model: nn.Module, longest: int, budget: int) -> None:
    limit = _max_seq_len(model)
    if longest + budget > limit:
        raise ValueError(
            f"a prompt of {longest} tokens plus {budget} new tokens exceeds the model's "
            f"max_seq_len of {limit}; shorten the prompt or lower max_new_tokens"
        )


@torch.inference_mode()
def generate(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    images: Optional[torch.Tensor] = None,
    *,
    max_new_tokens: IntOrList,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    seed: Optional[IntOrList] = None,
    stop_tokens: Optional[Sequence[int]] = None,
    generators: Optional[Sequence[torch.Generator]] = None,
    stats: Optional[Dict[str, int]] = None,
) -> List[List[int]]:
    """New tokens for each prompt (the stop token itself left out).

    ``prompts`` are token lists (see :func:`build_prompt`); ``images [n, 3, H, W]``
    holds one image per prompt that has placeholders, in prompt order.
    ``max_new_tokens`` and ``seed`` may be given per row. Sampling uses one random
    stream per row: ``generators``, or one seeded with ``seed[i]`` (an int ``seed``
    gives row ``i`` the seed ``seed + i``). ``stats``, when given, is added the work
    done (the counts ``ContinuousBatcher.stats`` keeps).
    """
    b = len(prompts)
    if b == 0:
        return []
    budgets = [int(x) for x in _per_row(max_new_tokens, b, "max_new_tokens")]
    stop = torch.tensor(list(tokenizer.stop_tokens if stop_tokens is None else stop_tokens), dtype=torch.long)
    device = model.decoder.norm.scale.device
    greedy = is_greedy(temperature, top_k)
    if not greedy and generators is None:
        seeds = _per_row(seed, b, "seed")
        if seeds[0] is None:
            raise ValueError("sampling (temperature > 0) needs a seed or generators")
        if isinstance(seed, int):
            seeds = [seed + i for i in range(b)]
        generators = make_generators(seeds, device)
    image_id = model.image_token_id
    has_image = [image_id in p for p in prompts]
    n_img = sum(has_image)
    if (images is None and n_img) or (images is not None and images.shape[0] != n_img):
        raise ValueError(
            f"{n_img} prompt(s) hold image placeholders but {0 if images is None else images.shape[0]} image(s) were given"
        )
    outputs: List[List[int]] = [[] for _ in range(b)]
    # Rows with nothing to generate never enter the batch.
    live = [i for i in range(b) if budgets[i] > 0]
    if not live:
        return outputs
    if len(live) < b and images is not None:
        img_index = [sum(has_image[:i]) for i in range(b)]
        sel = [img_index[i] for i in live if has_image[i]]
        images = images[sel] if sel else None
    tokens, padding_mask = left_pad([prompts[i] for i in live], tokenizer.pad_id)
    longest = tokens.shape[1]
    budget = max(budgets[i] for i in live)
    _check_fits(model, longest, budget)
    cache_len = longest + budget
    tokens, padding_mask = tokens.to(device), padding_mask.to(device)
    if images is not None:
        images = images.to(device=device, dtype=_model_dtype(model))
    row_ids = torch.tensor(live, dtype=torch.long)  # original row of each cache row
    gens = None if greedy else [generators[i] for i in live]
    stop_cpu = stop

    if model.caches_are_setup():
        delete_kv_caches(model)
    # torchtune allocates cache buffers on the default device: make it the model's.
    with torch.device(device):
        model.setup_caches(len(live), _model_dtype(model), decoder_max_seq_len=cache_len)
    try:
        logits = prefill(model, tokens, padding_mask, images, cache_len)  # [b, V]
        work = {"decode_passes": 0, "slot_steps": 0, "idle_slot_steps": 0, "prefill_passes": 1,
                "prefill_positions": int(tokens.numel())}
        # Which cache positions each row may attend to; grows by one slot per step.
        kv_valid = torch.zeros(len(live), cache_len, dtype=torch.bool, device=device)
        kv_valid[:, :longest] = padding_mask
        next_pos = padding_mask.sum(dim=1, keepdim=True).to(torch.int)  # [b, 1] rope position of the next token
        n_done = torch.zeros(len(live), dtype=torch.long)
        row_budget = torch.tensor([budgets[i] for i in live], dtype=torch.long)
        done = torch.zeros(len(live), dtype=torch.bool)
        for step in range(budget):
            nxt = sample(logits, temperature=temperature, top_k=top_k, generators=gens)  # [b]
            nxt_cpu = nxt.cpu()
            hit = torch.isin(nxt_cpu, stop_cpu)
            for j in range(len(row_ids)):
                if not done[j] and not hit[j]:
                    outputs[int(row_ids[j])].append(int(nxt_cpu[j]))
            n_done += 1
            done |= hit | (n_done >= row_budget)
            if bool(done.all()):
                break
            if int(done.sum()) >= max(1, len(row_ids) // 4):
                keep = (~done).nonzero().flatten()  # [b_keep]
                keep_dev = keep.to(device)
                _compact_caches(model, keep_dev)
                row_ids, n_done, row_budget, done = row_ids[keep], n_done[keep], row_budget[keep], done[keep]
                kv_valid, next_pos, nxt = kv_valid[keep_dev], next_pos[keep_dev], nxt[keep_dev]
                if gens is not None:
                    gens = [gens[int(k)] for k in keep]
            slot = longest + step
            kv_valid[:, slot] = True
            logits = decode_one_token(model, nxt.view(-1, 1), next_pos, kv_valid[:, None, :])
            next_pos = next_pos + 1
            work["decode_passes"] += 1
            work["slot_steps"] += len(row_ids)
            work["idle_slot_steps"] += int(done.sum())  # finished rows not yet compacted away
        if stats is not None:
            for k, v in work.items():
                stats[k] = stats.get(k, 0) + v
    finally:
        delete_kv_caches(model)
    return outputs


@torch.inference_mode()
def generate_reference(
    model: nn.Module,
    tokenizer,
    prompt: Sequence[int],
    image: Optional[torch.Tensor] = None,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    stop_tokens: Optional[Sequence[int]] = None,
) -> List[int]:
    """The reference's way: batch 1, no cache, the whole sequence recomputed for
    each new token (image ``[3, H, W]`` or ``None``). Slow; for checks and for
    ``enable_kv_cache=False``."""
    if model.caches_are_setup():
        delete_kv_caches(model)
    stop = set(tokenizer.stop_tokens if stop_tokens is None else stop_tokens)
    device = model.decoder.norm.scale.device
    _check_fits(model, len(prompt), max_new_tokens)
    seq = torch.tensor([list(prompt)], dtype=torch.long, device=device)  # [1, s]
    imgs = None if image is None else image.unsqueeze(0).to(device=device, dtype=_model_dtype(model))
    gens = None if is_greedy(temperature, top_k) else [generator]
    out: List[int] = []
    for _ in range(max_new_tokens):
        h = model.hidden_states(seq, images=imgs)  # [1, s, d]
        logits = model.logits(h[:, -1])  # [1, V]
        nxt = sample(logits, temperature=temperature, top_k=top_k, generators=gens)  # [1]
        if int(nxt) in stop:
            break
        out.append(int(nxt))
        seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    return out
