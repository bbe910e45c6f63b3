"""The loss of a training step: next-token cross-entropy over label tokens only.

In order:

* ``TokenLoss``: the summed loss and the label-token count (sums, so that gradient
  accumulation and several ranks normalise by the whole step's count);
* ``count_label_tokens``: what a batch contributes to that count;
* ``LabelTokenCrossEntropy``: projects onto the vocabulary only the positions whose
  next token is a label, a chunk at a time, each chunk recomputed in backward, so at
  most one chunk of logits is alive (full logits would be ``[b, s, 128256]`` float32,
  about 1 GiB for two sequences of 1000 tokens);
* ``TrainForward``: the fused forward and this loss as one module (the FSDP root in a
  distributed run), which the recipe's ``train_step`` calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from medcap.data import CROSS_ENTROPY_IGNORE_IDX


@dataclass
class TokenLoss:
    """Summed cross-entropy over label tokens, and how many there were.

    Sums rather than means so that gradient accumulation and several ranks can
    normalise by the token count of the whole optimizer step.
    """

    total: torch.Tensor  # scalar, sum of per-token losses (carries the graph)
    count: int  # number of label tokens
    per_sample_total: Optional[torch.Tensor] = None  # [b] sum per sample (detached)
    per_sample_count: Optional[torch.Tensor] = None  # [b] label tokens per sample

    @property
    def mean(self) -> torch.Tensor:
        """Mean over label tokens (0 when there are none)."""
        return self.total / max(self.count, 1)

    @property
    def per_sample_mean(self) -> torch.Tensor:
        """[b] mean loss of each sample over its own label tokens (nan where it has none)."""
        if self.per_sample_total is None:
            raise ValueError("per-sample losses were not requested (per_sample=True)")
        return self.per_sample_total / self.per_sample_count.to(self.per_sample_total.dtype)


def count_label_tokens(labels: torch.Tensor, ignore_index: int = CROSS_ENTROPY_IGNORE_IDX) -> int:
    """Label tokens that a batch contributes to the loss (after the shift by one)."""
    return int((labels[:, 1:] != ignore_index).sum())


class LabelTokenCrossEntropy:
    """Next-token cross-entropy over label positions only, with a chunked vocabulary projection.

    Args:
        chunk_size: hidden states projected to the vocabulary at once. Smaller
            uses less memory (``chunk_size x vocab`` float32 logits) and costs
            a little speed.
        ignore_index: label value that marks positions without a target.

    Call it with the model (for its ``logits`` projection), the final hidden
    states ``[b, s, d]`` and the labels ``[b, s]`` aligned with the input tokens
    (the shift by one happens here).
    """

    def __init__(self, chunk_size: int = 1024, ignore_index: int = CROSS_ENTROPY_IGNORE_IDX):
        if chunk_size < 1:
            raise ValueError(f"loss chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = int(chunk_size)
        self.ignore_index = ignore_index

    def __call__(
        self,
        model,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        *,
        per_sample: bool = False,
    ) -> TokenLoss:
        b, s, d = hidden.shape
        if labels.shape != (b, s):
            raise ValueError(f"labels {tuple(labels.shape)} do not match hidden states {(b, s)}")
        targets = labels[:, 1:].to(hidden.device)  # [b, s-1]: the token after each position
        keep = targets != self.ignore_index  # [b, s-1]
        count = int(keep.sum())
        if count == 0:
            # Keep the graph connected (zero gradient): on several ranks every one
            # must run the same backward, whatever its batch held.
            total = hidden.sum() * 0.0
            zeros = torch.zeros(b, device=hidden.device)
            return TokenLoss(total.float(), 0, zeros if per_sample else None, zeros.long() if per_sample else None)

        selected = hidden[:, :-1][keep]  # [n, d], only positions with a target
        tgt = targets[keep]  # [n]
        use_ckpt = torch.is_grad_enabled() and selected.requires_grad
        sums, per_token = [], []
        for start in range(0, count, self.chunk_size):
            h = selected[start : start + self.chunk_size]  # [c, d]
            t = tgt[start : start + self.chunk_size]  # [c]
            if use_ckpt:
                tok_loss = checkpoint(_chunk_ce, model, h, t, use_reentrant=False)
            else:
                tok_loss = _chunk_ce(model, h, t)
            sums.append(tok_loss.sum())
            if per_sample:
                per_token.append(tok_loss.detach())
        total = torch.stack(sums).sum()

        ps_total = ps_count = None
        if per_sample:
            rows = torch.arange(b, device=hidden.device).unsqueeze(1).expand(b, s - 1)[keep]  # [n]
            ps_total = torch.zeros(b, device=hidden.device).index_add_(0, rows, torch.cat(per_token))
            ps_count = keep.sum(dim=1)  # [b]
        return TokenLoss(total, count, ps_total, ps_count)


def _chunk_ce(model, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    logits = model.logits(h)  # [c, vocab] float32
    return F.cross_entropy(logits, t, reduction="none")  # [c]


class TrainForward(nn.Module):
    """Fused forward + label-only loss as one module: the FSDP root in a distributed run,
    plain otherwise. Returns ``(loss_sum, label_count)``.

    ``keep_graph``: when a rank's batch has no image, its input embeddings would not need
    grad and backward would skip the (sharded) decoder layers, leaving the other ranks
    waiting in their all-gathers. Marking the embeddings as requiring grad makes every
    rank run the same backward.
    """

    def __init__(self, model: nn.Module, loss_fn: LabelTokenCrossEntropy, keep_graph: bool = False):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.keep_graph = keep_graph

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, images: Optional[torch.Tensor] = None):
        embeds = self.model.embed(tokens, images)  # [b, s, d]
        if self.keep_graph and torch.is_grad_enabled() and not embeds.requires_grad:
            embeds = embeds.detach().requires_grad_(True)
        hidden = self.model.hidden_states(tokens, embeds=embeds)  # [b, s, d]
        out = self.loss_fn(self.model, hidden, labels)
        return out.total, torch.tensor(out.count)
