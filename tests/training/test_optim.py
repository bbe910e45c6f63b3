"""The optimizers (incl. the step in backward) and the lr schedule that drives them."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from medcap.training import build_lr_scheduler
from medcap.training._optim import InBackwardOptimizer, StandardOptimizer


def _params(seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))
    return net


def _loss(net, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 4, generator=g)
    return net(x).pow(2).mean()


def test_optimizer_in_backward_takes_the_same_steps_as_a_standard_one():
    cfg = OmegaConf.create({"_component_": "torch.optim.AdamW", "lr": 0.01})
    a, b = _params(), _params()
    std = StandardOptimizer(cfg, list(a.named_parameters()))
    inb = InBackwardOptimizer(cfg, list(b.named_parameters()))
    for step in range(3):
        _loss(a, step).backward()
        std.step()
        std.zero_grad()
        _loss(b, step).backward()  # steps here
        assert all(p.grad is None for p in b.parameters())  # freed by the hook
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)
    # state round trip: a fresh per-parameter optimizer continues identically
    c = _params()
    c.load_state_dict(b.state_dict())
    inb2 = InBackwardOptimizer(cfg, list(c.named_parameters()))
    inb2.load_state_dict(copy.deepcopy(inb.state_dict()))  # as if through a file
    _loss(b, 9).backward()
    _loss(c, 9).backward()
    for pb, pc in zip(b.parameters(), c.parameters()):
        torch.testing.assert_close(pb, pc)
    with pytest.raises(ValueError, match="optimizer_in_bwd"):
        std.load_state_dict(inb.state_dict())


def test_paged_adamw8bit_in_backward_state_round_trips_on_cpu():
    """bitsandbytes' CPU backend runs PagedAdamW8bit (unpaged on CPU); its 8-bit state
    must survive save/load for resume."""
    pytest.importorskip("bitsandbytes")
    cfg = OmegaConf.create({"_component_": "bitsandbytes.optim.PagedAdamW8bit", "lr": 0.01})
    torch.manual_seed(0)
    a = torch.nn.Linear(64, 128)  # >= 4096 elements: the 8-bit state path
    b = torch.nn.Linear(64, 128)
    b.load_state_dict(a.state_dict())
    oa = InBackwardOptimizer(cfg, list(a.named_parameters()))
    x = torch.randn(3, 64)
    a(x).pow(2).mean().backward()
    assert oa.has_state_for(a.weight)
    assert oa.optimizers["weight"].state[a.weight]["state1"].dtype == torch.uint8
    b.load_state_dict(a.state_dict())
    ob = InBackwardOptimizer(cfg, list(b.named_parameters()))
    ob.load_state_dict(copy.deepcopy(oa.state_dict()))
    a(x).pow(2).mean().backward()
    b(x).pow(2).mean().backward()
    torch.testing.assert_close(a.weight, b.weight)


def test_lr_scheduler_drives_every_optimizer_in_backward():
    cfg = OmegaConf.create({"_component_": "torch.optim.AdamW", "lr": 0.1})
    net = _params()
    opt = InBackwardOptimizer(cfg, list(net.named_parameters()))
    sched = build_lr_scheduler(
        OmegaConf.create({"_component_": "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup", "num_warmup_steps": 2}),
        opt,
        num_training_steps=10,
    )
    sched.step()
    opt.sync_lr()
    lrs = [g["lr"] for o in opt.optimizers.values() for g in o.param_groups]
    assert len(lrs) == 4 and lrs == pytest.approx([0.05] * 4)
