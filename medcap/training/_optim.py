"""What the optimizer sees: the loss over label tokens only, the optimizers over the vision
side, and their learning-rate schedule.

Cross-entropy computed only where labels exist.

In captioning, most of a sequence is prompt and image placeholders whose labels
are the ignore index; projecting every position onto a 128k vocabulary would
materialise ``[b, s, 128256]`` float32 logits for nothing (about 1 GiB for two
sequences of 1000 tokens). We take the decoder's final hidden states, keep the
positions whose *next* token is a label, and project those alone, a chunk at a
time. Each chunk is recomputed in backward (activation checkpointing), so at
most one chunk of logits is alive at once.

Optimizers over the trainable (vision) parameters, with or without the step in backward.

``optimizer_in_bwd: true`` gives each trainable parameter its own optimizer and
steps it from a post-accumulate-grad hook, the moment its gradient is ready,
then frees that gradient: the full set of gradients never exists at once. This
is torchtune's memory trick for full fine-tuning on one device; it cannot
accumulate gradients over several batches (each backward is a step), and it
cannot clip the global gradient norm.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchtune import config as tt_config

from medcap.data import CROSS_ENTROPY_IGNORE_IDX

# ---- The loss --------------------------------------------------------------------

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


# ---- Optimizers and schedule -----------------------------------------------------

log = logging.getLogger("medcap.training")


def trainable_named_parameters(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


class StandardOptimizer:
    """One optimizer over all trainable parameters; stepped by the loop."""

    in_backward = False

    def __init__(self, cfg_optimizer: DictConfig, named_params: List[Tuple[str, nn.Parameter]]):
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.optimizer = tt_config.instantiate(cfg_optimizer, self.params)
        self.lead = self.optimizer  # what an lr scheduler drives

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def sync_lr(self) -> None:
        pass

    def state_dict(self) -> Dict[str, Any]:
        return {"kind": "standard", "names": self.names, "state": self.optimizer.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        _check_kind(state, "standard")
        if state["names"] != self.names:
            raise ValueError(
                "the saved optimizer state belongs to other parameters "
                f"({len(state['names'])} saved, {len(self.names)} now); was the model changed?"
            )
        self.optimizer.load_state_dict(state["state"])

    def has_state_for(self, param: nn.Parameter) -> bool:
        return param in self.optimizer.state and bool(self.optimizer.state[param])


class InBackwardOptimizer:
    """One optimizer per trainable parameter, stepped inside backward by a grad hook."""

    in_backward = True

    def __init__(self, cfg_optimizer: DictConfig, named_params: List[Tuple[str, nn.Parameter]]):
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.optimizers: Dict[str, torch.optim.Optimizer] = {
            n: tt_config.instantiate(cfg_optimizer, [p]) for n, p in named_params
        }
        self._by_param = {p: self.optimizers[n] for n, p in named_params}
        self.lead = self.optimizers[self.names[0]]
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.params]

    def _hook(self, param: nn.Parameter) -> None:
        opt = self._by_param[param]
        opt.step()
        opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        pass  # stepped in backward

    def zero_grad(self) -> None:
        pass  # each hook frees its gradient after stepping

    @property
    def lr(self) -> float:
        return float(self.lead.param_groups[0]["lr"])

    def sync_lr(self) -> None:
        """After the scheduler moved the lead optimizer's lr, give it to all the others."""
        lr = self.lr
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                group["lr"] = lr

    def state_dict(self) -> Dict[str, Any]:
        return {"kind": "in_backward", "names": self.names, "state": {n: o.state_dict() for n, o in self.optimizers.items()}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        _check_kind(state, "in_backward")
        missing = set(self.names) - set(state["state"])
        extra = set(state["state"]) - set(self.names)
        if missing or extra:
            raise ValueError(
                f"the saved optimizer state does not match the trainable parameters "
                f"(missing {sorted(missing)[:4]}, unexpected {sorted(extra)[:4]})"
            )
        for n, opt in self.optimizers.items():
            opt.load_state_dict(state["state"][n])

    def has_state_for(self, param: nn.Parameter) -> bool:
        opt = self._by_param.get(param)
        return opt is not None and param in opt.state and bool(opt.state[param])

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _check_kind(state: Dict[str, Any], kind: str) -> None:
    if state.get("kind") != kind:
        raise ValueError(
            f"the saved optimizer state is of kind {state.get('kind')!r} but this run uses {kind!r}: "
            "optimizer_in_bwd must be the same as in the stopped run"
        )


def build_optimizer(
    cfg_optimizer: DictConfig,
    model: nn.Module,
    *,
    optimizer_in_bwd: bool = False,
):
    """The optimizer over ``model``'s trainable parameters (the vision side only)."""
    named = trainable_named_parameters(model)
    if not named:
        raise RuntimeError("no parameter requires grad: nothing to optimize")
    cls = StandardOptimizer if not optimizer_in_bwd else InBackwardOptimizer
    opt = cls(cfg_optimizer, named)
    n = sum(p.numel() for _, p in named)
    log.info(
        "optimizer %s over %d tensors (%.1f M parameters)%s",
        cfg_optimizer.get("_component_"),
        len(named),
        n / 1e6,
        ", stepped in backward" if optimizer_in_bwd else "",
    )
    return opt


def build_lr_scheduler(
    cfg_lr_scheduler: Optional[DictConfig],
    optimizer,
    *,
    num_training_steps: int,
    last_epoch: int = -1,
):
    """Instantiate ``cfg.lr_scheduler`` (optional) on the optimizer; torchtune's schedulers
    take ``num_training_steps``. Stepped once per optimizer step."""
    if cfg_lr_scheduler is None:
        return None
    sched = tt_config.instantiate(
        cfg_lr_scheduler, optimizer.lead, num_training_steps=num_training_steps, last_epoch=last_epoch
    )
    optimizer.sync_lr()
    return sched
