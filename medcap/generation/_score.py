"""Scoring fixed answers by their log-likelihood, for multiple-choice questions scored by the
model itself instead of a second, free-text generation.

In order:

* ``option_tokens``: an answer tokenised as a training target (its body, then the
  end-of-turn token), so a score is P(the whole answer, then stop);
* ``score_options``: every (prompt, option) pair in one forward pass, right padded;
  logits are computed only where an option token is predicted; then its steps
  (which image each prompt owns, the pairs, the positions, the sums per option).

``GenerationEngine.score_options`` calls it ``batch_size`` prompts at a time.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn
from torchtune.modules import delete_kv_caches


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
    img_of = _image_of_each_prompt(model.image_token_id, prompts, images)
    seqs, conts, owners, pair_images = _pairs(tokenizer, prompts, options, img_of)
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
    tok_lp = _option_token_logprobs(model, h, conts)  # [N]
    offset = 0
    for r, (_, c) in enumerate(conts):
        lp = tok_lp[offset : offset + len(c)]
        offset += len(c)
        results[owners[r]].append(float(lp.sum()) if reduction == "sum" else float(lp.mean()))
    return results


def _image_of_each_prompt(image_id: int, prompts, images: Optional[torch.Tensor]) -> List[Optional[int]]:
    """The index of each prompt's image (``None`` for a prompt without placeholders)."""
    img_of: List[Optional[int]] = []
    n = 0
    for p in prompts:
        if image_id in p:
            img_of.append(n)
            n += 1
        else:
            img_of.append(None)
    if (images is None and n) or (images is not None and images.shape[0] != n):
        given = 0 if images is None else images.shape[0]
        raise ValueError(f"{n} prompt(s) hold image placeholders but {given} image(s) given")
    return img_of


Pairs = Tuple[List[List[int]], List[Tuple[int, List[int]]], List[int], List[int]]


def _pairs(tokenizer, prompts, options, img_of) -> Pairs:
    """One sequence per (prompt, option): its tokens, (where the option starts, its
    tokens), the prompt it belongs to, and the image of each pair that has one."""
    seqs, conts, owners, pair_images = [], [], [], []
    for i, (p, opts) in enumerate(zip(prompts, options)):
        for o in opts:
            c = option_tokens(tokenizer, o)
            seqs.append(list(p) + c)
            conts.append((len(p), c))
            owners.append(i)
            if img_of[i] is not None:
                pair_images.append(img_of[i])
    return seqs, conts, owners, pair_images


def _option_token_logprobs(model: nn.Module, h: torch.Tensor, conts) -> torch.Tensor:
    """Log-probability of every option token, in order (``[N]`` on the CPU); the vocabulary
    is projected only at the positions that predict one."""
    device = h.device
    rows, cols, targets = [], [], []
    for r, (start, c) in enumerate(conts):
        for k, t in enumerate(c):
            rows.append(r)
            cols.append(start - 1 + k)  # the position whose output predicts token k
            targets.append(t)
    sel = h[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]  # [N, d]
    logp = torch.log_softmax(model.logits(sel), dim=-1)  # [N, V]
    return logp.gather(1, torch.tensor(targets, device=device).view(-1, 1)).squeeze(1).cpu()  # [N]
