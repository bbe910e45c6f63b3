"""A small byte-level BPE trainer, so the demo's tokenizer fits the demo's language.

The demo's LM is tiny; with the 256 byte tokens alone every word would cost
5-10 positions and every sequence would be long. Training merges on the
demo's own text makes each frequent word one token.

The merges are written by :func:`medcap.models.write_tiktoken_tokenizer` in
tiktoken's format, which encodes a piece by repeatedly joining the adjacent
pair whose concatenation has the lowest rank. Merges learnt in order have
increasing ranks and every merge joins two earlier tokens, so tiktoken
reproduces the segmentation :func:`bpe_encode` computes here.
"""

from __future__ import annotations

from collections import Counter
from typing import Dict, Iterable, List, Sequence, Tuple

import regex

# The pre-tokenisation pattern of Llama 3's tokenizer (torchtune's CL100K_PATTERN):
# merges never cross the boundaries it draws, so training must split text the same way.
PRETOKENIZE_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_PRETOKENIZE = regex.compile(PRETOKENIZE_PATTERN)


def pretokenize(text: str) -> List[bytes]:
    """Split ``text`` into the pieces BPE works inside, as UTF-8 bytes."""
    return [m.encode("utf-8") for m in _PRETOKENIZE.findall(text)]


def train_bpe(texts: Iterable[str], num_merges: int) -> List[bytes]:
    """Learn up to ``num_merges`` byte-pair merges from ``texts``.

    Each step joins the most frequent adjacent pair of tokens over all pieces
    (ties go to the pair whose joined bytes sort first, so the result does not
    depend on dictionary order). Stops early when no pair occurs twice.
    Returns the merged tokens in rank order.
    """
    if num_merges < 0:
        raise ValueError(f"num_merges must be >= 0, got {num_merges}")
    counts: Counter = Counter()
    for t in texts:
        counts.update(pretokenize(t))
    # every distinct piece as a list of its current tokens, with its frequency
    words: List[Tuple[List[bytes], int]] = [([bytes([b]) for b in w], c) for w, c in counts.items() if len(w) > 1]
    merges: List[bytes] = []
    known = {bytes([b]) for b in range(256)}
    while len(merges) < num_merges:
        pairs: Counter = Counter()
        for toks, c in words:
            for a, b in zip(toks, toks[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        best_count = max(pairs.values())
        if best_count < 2:
            break
        a, b = min((p for p, c in pairs.items() if c == best_count), key=lambda p: (p[0] + p[1], p[0]))
        joined = a + b
        for toks, _ in words:
            i = 0
            while i < len(toks) - 1:
                if toks[i] == a and toks[i + 1] == b:
                    toks[i : i + 2] = [joined]
                i += 1
        if joined not in known:  # the same bytes reached by another split are one token
            known.add(joined)
            merges.append(joined)
    return merges


def vocab_ranks(merges: Sequence[bytes]) -> Dict[bytes, int]:
    """Token bytes -> rank: the 256 bytes, then the merges (as the tiktoken file lists them)."""
    ranks = {bytes([b]): b for b in range(256)}
    for m in merges:
        ranks.setdefault(m, len(ranks))
    return ranks


def bpe_encode(text: str, ranks: Dict[bytes, int]) -> List[int]:
    """Encode plain text (no special tokens) with the rule tiktoken applies: inside
    each piece, join the adjacent pair whose concatenation has the lowest rank,
    until no adjacent pair is a token. An independent check of the tokenizer file."""
    out: List[int] = []
    for piece in pretokenize(text):
        parts = [bytes([b]) for b in piece]
        while len(parts) > 1:
            best = None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                break
            i = best[1]
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        out.extend(ranks[p] for p in parts)
    return out


def build_tokenizer(out_dir, num_merges: int) -> Dict[str, str]:
    """Learn ``num_merges`` merges on the demo's text and write ``tokenizer.model`` +
    ``special_tokens.json`` into ``out_dir``. Exactly ``num_merges`` are required, so
    that the vocabulary matches the size the demo configs name."""
    from medcap.demo._lm import corpus_texts
    from medcap.demo._world import MODALITY_KEYS
    from medcap.models import write_tiktoken_tokenizer

    merges = train_bpe(corpus_texts(MODALITY_KEYS), num_merges)
    if len(merges) != num_merges:
        raise RuntimeError(
            f"the demo's text supports only {len(merges)} BPE merges, not {num_merges}: "
            f"use bpe_merges={len(merges)} and model.vocab_size={256 + len(merges) + 12} in the demo configs"
        )
    paths = write_tiktoken_tokenizer(out_dir, merges)
    return {k: str(v) for k, v in paths.items()}
