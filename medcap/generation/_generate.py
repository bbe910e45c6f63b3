"""Decoding, gpt-fast style: small functions over fixed-shape KV caches. Sampling, the
static batched ``generate``, and scoring fixed answers by log-likelihood.

Next-token choice: greedy, or top-k sampling with one random stream per row.

One ``torch.Generator`` per row makes a row's samples depend only on its own
seed, not on which other rows share its batch, so a resumed run (whose batches
are cut differently) draws the same tokens as an uninterrupted one.

Log-likelihood of given answers, for scoring multiple-choice questions by the
model itself instead of a second, free-text generation.

Batched generation with image prefill and a KV cache sized to the batch.

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

import hashlib
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torchtune.generation import get_causal_mask_from_padding_mask, get_position_ids_from_padding_mask
from torchtune.modules import delete_kv_caches
from torchtune.modules.kv_cache import KVCache

# ---- Sampling --------------------------------------------------------------------

def row_seed(seed: int, key: str) -> int:
    """A stable 63-bit seed for one row from the run's seed and the row's key."""
    digest = hashlib.sha256(f"{int(seed)}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_generators(seeds: Sequence[int], device: torch.device | str = "cpu") -> List[torch.Generator]:
    gens = []
    for s in seeds:
        g = torch.Generator(device=device)
        g.manual_seed(int(s))
        gens.append(g)
    return gens


def is_greedy(temperature: float, top_k: Optional[int]) -> bool:
    return temperature is None or float(temperature) <= 0.0 or top_k == 1


def sample(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    generators: Optional[Sequence[torch.Generator]] = None,
) -> torch.Tensor:
    """``logits [b, V]`` -> next tokens ``[b]``.

    ``temperature <= 0`` (or ``top_k == 1``) is greedy. Otherwise the logits are
    scaled, cut to the ``top_k`` largest (all when ``None``) and sampled with the
    exponential race ``argmax(p / q), q ~ Exp(1)``, one ``q`` row per generator.
    """
    if is_greedy(temperature, top_k):
        return logits.argmax(dim=-1)
    if generators is None or len(generators) != logits.shape[0]:
        raise ValueError("sampling needs one torch.Generator per row")
    scaled = logits.float() / float(temperature)
    if top_k is not None:
        k = min(int(top_k), scaled.shape[-1])
        kth = torch.topk(scaled, k, dim=-1).values[:, -1:]  # [b, 1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)  # [b, V]
    q = torch.stack(
        [torch.empty(probs.shape[-1], device=probs.device).exponential_(1.0, generator=g) for g in generators]
    )  # [b, V]
    return (probs / q).argmax(dim=-1)


# ---- Scoring fixed answers -------------------------------------------------------

def option_tokens(tokenizer, option: str) -> List[int]:
    """An answer as the assistant turn's body plus its end-of-turn token, exactly as a
    training target is tokenised, so the score is P(the whole answer, then stop)."""
    return tokenizer.encode(str(option).strip(), add_bos=False, add_eos=False) + [tokenizer.eot_id]


@torch.inference_mode()
def score_options(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    images: Optional[torch.Tensor],
    options: Sequence[Sequence[str]],
    *,
    reduction: str = "sum",
) -> List[List[float]]:
    """Log-likelihood of each option as the continuation of its prompt.

    ``prompts`` end with the open assistant header (see ``build_prompt``);
    ``images [n, 3, H, W]`` holds one image per prompt with placeholders, in order;
    ``options[i]`` are the answers to score for prompt ``i``. Every (prompt, option)
    pair goes through one forward pass; logits are computed only where an option
    token is predicted. ``reduction``: ``"sum"`` (the answer's log-probability) or
    ``"mean"`` (per token).
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if len(options) != len(prompts):
        raise ValueError(f"{len(options)} option lists for {len(prompts)} prompts")
    if model.caches_are_setup():
        delete_kv_caches(model)
    device = model.decoder.norm.scale.device
    dtype = next(model.decoder.parameters()).dtype
    image_id = model.image_token_id
    img_of: List[Optional[int]] = []
    n = 0
    for p in prompts:
        if image_id in p:
            img_of.append(n)
            n += 1
        else:
            img_of.append(None)
    if (images is None and n) or (images is not None and images.shape[0] != n):
        raise ValueError(f"{n} prompt(s) hold image placeholders but {0 if images is None else images.shape[0]} image(s) given")

    seqs, conts, owners, pair_images = [], [], [], []
    for i, (p, opts) in enumerate(zip(prompts, options)):
        for o in opts:
            c = option_tokens(tokenizer, o)
            seqs.append(list(p) + c)
            conts.append((len(p), c))
            owners.append(i)
            if img_of[i] is not None:
                pair_images.append(img_of[i])
    results: List[List[float]] = [[] for _ in prompts]
    if not seqs:
        return results
    longest = max(len(s) for s in seqs)
    if longest > model.decoder.max_seq_len:
        raise ValueError(f"a prompt plus option is {longest} tokens, over the model's max_seq_len")
    # Right padding: the causal mask keeps padding out of every real position.
    tokens = torch.full((len(seqs), longest), tokenizer.pad_id, dtype=torch.long)
    for r, s in enumerate(seqs):
        tokens[r, : len(s)] = torch.tensor(s, dtype=torch.long)
    imgs = None
    if pair_images:
        imgs = images[torch.tensor(pair_images)].to(device=device, dtype=dtype)  # [n_pairs_with_image, 3, H, W]
    h = model.hidden_states(tokens.to(device), images=imgs)  # [P, L, d]
    rows, cols, targets = [], [], []
    for r, (start, c) in enumerate(conts):
        for k, t in enumerate(c):
            rows.append(r)
            cols.append(start - 1 + k)  # the position whose output predicts token k
            targets.append(t)
    sel = h[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]  # [N, d]
    logp = torch.log_softmax(model.logits(sel), dim=-1)  # [N, V]
    tok_lp = logp.gather(1, torch.tensor(targets, device=device).view(-1, 1)).squeeze(1).cpu()  # [N]
    offset = 0
    for r, (_, c) in enumerate(conts):
        lp = tok_lp[offset : offset + len(c)]
        offset += len(c)
        val = float(lp.sum()) if reduction == "sum" else float(lp.mean())
        results[owners[r]].append(val)
    return results


# ---- Static batched generation ---------------------------------------------------

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
