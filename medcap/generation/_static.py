"""Static batched generation, gpt-fast style: small functions over a fixed-shape KV cache.

In order:

* ``left_pad``: prompts left padded, so every row's next token lands in the same cache
  slot; the padding mask becomes per-row attention masks and shifted positions;
* ``prefill``: the padded prompts and their images through the model, filling the cache
  (the images go in here only; after it their vectors live in the cache);
* ``decode_one_token``: one cached step for every row;
* ``generate``: the batch's loop (sample, stop per row, drop finished rows once a
  quarter of the batch has stopped, decode one token), in a cache of
  ``longest prompt + max new tokens`` positions, not the model's 131k context
  (~16 GiB per sequence for Llama-3.1-8B in bf16);
* ``generate_reference``: the reference's slow path (batch 1, no cache, the whole
  sequence recomputed per token); greedy outputs of both agree token for token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torchtune.generation import get_causal_mask_from_padding_mask, get_position_ids_from_padding_mask
from torchtune.modules import delete_kv_caches
from torchtune.modules.kv_cache import KVCache

from medcap.generation._sampling import is_greedy, make_generators, sample

IntOrList = Union[int, Sequence[int]]


# ---- The pieces

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


def model_dtype(model: nn.Module) -> torch.dtype:
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


def check_fits(model: nn.Module, longest: int, budget: int) -> None:
    limit = _max_seq_len(model)
    if longest + budget > limit:
        raise ValueError(
            f"a prompt of {longest} tokens plus {budget} new tokens exceeds the model's "
            f"max_seq_len of {limit}; shorten the prompt or lower max_new_tokens"
        )


# ---- The batch's loop

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
        generators = _seeded_generators(seed, b, device)
    has_image = _check_images(model, prompts, images)
    outputs: List[List[int]] = [[] for _ in range(b)]
    live = [i for i in range(b) if budgets[i] > 0]  # rows with nothing to generate never enter the batch
    if not live:
        return outputs
    if len(live) < b and images is not None:
        images = _images_of(live, has_image, images)
    tokens, padding_mask = left_pad([prompts[i] for i in live], tokenizer.pad_id)
    longest, budget = tokens.shape[1], max(budgets[i] for i in live)
    check_fits(model, longest, budget)
    cache_len = longest + budget
    tokens, padding_mask = tokens.to(device), padding_mask.to(device)
    if images is not None:
        images = images.to(device=device, dtype=model_dtype(model))
    rows = _Rows.start(live, [budgets[i] for i in live], padding_mask, cache_len,
                       None if greedy else [generators[i] for i in live])
    _setup_cache(model, len(live), cache_len, device)
    try:
        logits = prefill(model, tokens, padding_mask, images, cache_len)  # [b, V]
        work = _decode(model, logits, rows, outputs, longest=longest, budget=budget, stop=stop,
                       temperature=temperature, top_k=top_k, prefill_positions=int(tokens.numel()))
        if stats is not None:
            for k, v in work.items():
                stats[k] = stats.get(k, 0) + v
    finally:
        delete_kv_caches(model)
    return outputs


def _seeded_generators(seed: Optional[IntOrList], b: int, device: torch.device) -> List[torch.Generator]:
    """One generator per row: ``seed[i]``, or ``seed + i`` for an int ``seed``."""
    seeds = _per_row(seed, b, "seed")
    if seeds[0] is None:
        raise ValueError("sampling (temperature > 0) needs a seed or generators")
    if isinstance(seed, int):
        seeds = [seed + i for i in range(b)]
    return make_generators(seeds, device)


def _check_images(model: nn.Module, prompts: Sequence[Sequence[int]], images: Optional[torch.Tensor]) -> List[bool]:
    """Which prompts hold image placeholders; one image each must be given."""
    image_id = model.image_token_id
    has_image = [image_id in p for p in prompts]
    n_img = sum(has_image)
    if (images is None and n_img) or (images is not None and images.shape[0] != n_img):
        raise ValueError(
            f"{n_img} prompt(s) hold image placeholders but {0 if images is None else images.shape[0]} image(s) were given"
        )
    return has_image


def _images_of(live: List[int], has_image: List[bool], images: torch.Tensor) -> Optional[torch.Tensor]:
    """The images of the rows ``live`` (each prompt with placeholders owns the next image)."""
    img_index = [sum(has_image[:i]) for i in range(len(has_image))]
    sel = [img_index[i] for i in live if has_image[i]]
    return images[sel] if sel else None


def _setup_cache(model: nn.Module, batch: int, cache_len: int, device: torch.device) -> None:
    if model.caches_are_setup():
        delete_kv_caches(model)
    # torchtune allocates cache buffers on the default device: make it the model's.
    with torch.device(device):
        model.setup_caches(batch, model_dtype(model), decoder_max_seq_len=cache_len)


@dataclass
class _Rows:
    """The rows still in the cache and their decoding state, shrunk together when
    finished rows are dropped."""

    ids: torch.Tensor  # [r] the caller's row of each cache row
    budget: torch.Tensor  # [r] new tokens allowed
    n_done: torch.Tensor  # [r] tokens sampled so far
    done: torch.Tensor  # [r] stopped
    kv_valid: torch.Tensor  # [r, cache_len] cache positions each row may attend to; one more per step
    next_pos: torch.Tensor  # [r, 1] rope position of the next token
    gens: Optional[List[torch.Generator]]  # one random stream per row when sampling

    @classmethod
    def start(cls, live, budgets, padding_mask, cache_len, gens) -> "_Rows":
        kv_valid = torch.zeros(len(live), cache_len, dtype=torch.bool, device=padding_mask.device)
        kv_valid[:, : padding_mask.shape[1]] = padding_mask
        return cls(
            ids=torch.tensor(live, dtype=torch.long),
            budget=torch.tensor(budgets, dtype=torch.long),
            n_done=torch.zeros(len(live), dtype=torch.long),
            done=torch.zeros(len(live), dtype=torch.bool),
            kv_valid=kv_valid,
            next_pos=padding_mask.sum(dim=1, keepdim=True).to(torch.int),
            gens=gens,
        )


def _decode(model, logits, rows: _Rows, outputs, *, longest, budget, stop, temperature, top_k,
            prefill_positions) -> Dict[str, int]:
    """Sample, keep each row's token until it stops, decode one more token; ``budget`` times
    at most. Returns the work done (the counts ``ContinuousBatcher.stats`` keeps)."""
    work = {"decode_passes": 0, "slot_steps": 0, "idle_slot_steps": 0, "prefill_passes": 1,
            "prefill_positions": prefill_positions}
    for step in range(budget):
        nxt = sample(logits, temperature=temperature, top_k=top_k, generators=rows.gens)  # [r]
        _append_or_stop(outputs, rows, nxt.cpu(), stop)
        if bool(rows.done.all()):
            break
        if int(rows.done.sum()) >= max(1, len(rows.ids) // 4):
            nxt = _drop_finished(model, rows, nxt)
        rows.kv_valid[:, longest + step] = True
        logits = decode_one_token(model, nxt.view(-1, 1), rows.next_pos, rows.kv_valid[:, None, :])
        rows.next_pos = rows.next_pos + 1
        work["decode_passes"] += 1
        work["slot_steps"] += len(rows.ids)
        work["idle_slot_steps"] += int(rows.done.sum())  # finished rows not yet compacted away
    return work


def _append_or_stop(outputs: List[List[int]], rows: _Rows, nxt: torch.Tensor, stop: torch.Tensor) -> None:
    """Append each running row's sampled token (``nxt [r]``, on the CPU) unless it is a stop token."""
    hit = torch.isin(nxt, stop)
    for j in range(len(rows.ids)):
        if not rows.done[j] and not hit[j]:
            outputs[int(rows.ids[j])].append(int(nxt[j]))
    rows.n_done += 1
    rows.done |= hit | (rows.n_done >= rows.budget)


def _drop_finished(model: nn.Module, rows: _Rows, nxt: torch.Tensor) -> torch.Tensor:
    """Finished rows leave the cache and the decoding state; returns the others' tokens."""
    keep = (~rows.done).nonzero().flatten()  # [r_keep]
    keep_dev = keep.to(rows.kv_valid.device)
    _compact_caches(model, keep_dev)
    rows.ids, rows.n_done = rows.ids[keep], rows.n_done[keep]
    rows.budget, rows.done = rows.budget[keep], rows.done[keep]
    rows.kv_valid, rows.next_pos = rows.kv_valid[keep_dev], rows.next_pos[keep_dev]
    if rows.gens is not None:
        rows.gens = [rows.gens[int(k)] for k in keep]
    return nxt[keep_dev]


# ---- The slow reference path

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
    check_fits(model, len(prompt), max_new_tokens)
    seq = torch.tensor([list(prompt)], dtype=torch.long, device=device)  # [1, s]
    imgs = None if image is None else image.unsqueeze(0).to(device=device, dtype=model_dtype(model))
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
