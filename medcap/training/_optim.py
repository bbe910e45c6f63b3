"""From gradients to new weights: the optimizers over the trainable (vision) parameters
and their learning-rate schedule.

In order:

* ``StandardOptimizer``: one optimizer over all trainable parameters, stepped by the loop;
* ``InBackwardOptimizer`` (``optimizer_in_bwd: true``): one optimizer per parameter,
  stepped from a post-accumulate-grad hook the moment its gradient is ready, which is
  then freed, so the full set of gradients never exists at once (torchtune's memory
  trick; no accumulation over batches, no global gradient-norm clipping);
* ``build_optimizer`` and ``build_lr_scheduler``: what the recipe's ``setup`` calls.

Both optimizers offer the same few methods (``step``, ``zero_grad``, ``lr``,
``sync_lr``, ``state_dict``), so the recipe's step reads the same for either.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig
from torch import nn
from torchtune import config as tt_config

from medcap.config import ConfigError

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
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._hook)

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


def _check_kind(state: Dict[str, Any], kind: str) -> None:
    if state.get("kind") != kind:
        raise ConfigError(
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
