"""Resumable state, optimizers (incl. the step in backward) and config checks."""

from __future__ import annotations

import copy
import logging
import random

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from medcap.config import ConfigError, resolve_dataset_config, resolve_loss_config
from medcap.training import (
    TrainConfig,
    atomic_write,
    build_lr_scheduler,
    capture_rng_state,
    load_recipe_state,
    restore_rng_state,
    save_recipe_state,
)
from medcap.training._optim import InBackwardOptimizer, StandardOptimizer


def _draws():
    return (torch.rand(3).tolist(), random.random(), np.random.rand(2).tolist())


def test_rng_state_round_trip_through_the_state_file(tmp_path):
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    _draws()
    save_recipe_state(tmp_path / "s.pt", {"rng": [capture_rng_state()]})
    expected = _draws()
    _draws()  # move on
    state = load_recipe_state(tmp_path / "s.pt")  # weights_only=True load
    restore_rng_state(state["rng"][0])
    assert _draws() == expected


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "x.txt"
    atomic_write(path, lambda tmp: open(tmp, "w").write("old"))

    def crash(tmp):
        open(tmp, "w").write("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(path, crash)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]  # no temporary left behind


def test_missing_or_foreign_state_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="resume_from_checkpoint"):
        load_recipe_state(tmp_path / "nope.pt")
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a medcap recipe state"):
        load_recipe_state(tmp_path / "other.pt")


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


def _cfg(**over):
    base = {
        "vision": "biomedclip",
        "model": {"_component_": "medcap.models.medcap_tiny"},
        "tokenizer": {"_component_": "x"},
        "checkpointer": {"_component_": "torchtune.training.FullModelHFCheckpointer", "checkpoint_dir": "/x"},
        "dataset": {"_component_": "medcap.data.chat_dataset"},
        "optimizer": {"_component_": "torch.optim.AdamW"},
        "batch_size": 2,
        "epochs": 1,
        "output_dir": "/tmp/o",
    }
    cfg = OmegaConf.create(base)
    for k, v in over.items():
        OmegaConf.update(cfg, k, v, force_add=True)
    return cfg


@pytest.mark.parametrize(
    "over,distributed,match",
    [
        ({"vision": "clip"}, False, "biomedclip"),
        ({"optimizer_in_bwd": True, "gradient_accumulation_steps": 2}, False, "gradient_accumulation_steps=1"),
        ({"optimizer_in_bwd": True}, True, "single-device"),
        ({"optimizer_in_bwd": True, "clip_grad_norm": 1.0}, False, "clip_grad_norm"),
        ({"dtype": "fp16"}, False, "dtype"),
        ({"batch_size": 0}, False, "batch_size"),
        ({"checkpoint_format": "bin"}, False, "checkpoint_format"),
        ({"checkpointer._component_": "torchtune.training.FullModelMetaCheckpointer"}, False, "Hugging Face"),
    ],
)
def test_config_errors(over, distributed, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_config(_cfg(**over)).check_world(2 if distributed else 1)


def test_config_ok():
    TrainConfig.from_config(_cfg(optimizer_in_bwd=True)).check_world(1)
    TrainConfig.from_config(_cfg(gradient_accumulation_steps=4)).check_world(2)


def test_config_defaults_follow_the_reference():
    cfg = TrainConfig.from_config(_cfg(**{"checkpointer.output_dir": "/o/ckpt"}))
    assert cfg.save_last_every_seconds == 8 * 3600 and cfg.save_last_every_steps is None
    assert cfg.checkpoint_format == "safetensors" and cfg.checkpoint_suffix == ".safetensors"
    assert str(cfg.checkpoint_dir) == "/o/ckpt"
    assert str(TrainConfig.from_config(_cfg()).checkpoint_dir) == "/tmp/o"  # no checkpointer.output_dir


@pytest.mark.parametrize("key,closest", [("batch_sze", "batch_size"), ("checkpointer.outputdir", "output_dir")])
def test_an_unknown_key_names_the_closest_valid_one(key, closest):
    with pytest.raises(ConfigError, match=rf"unknown key .*{key.split('.')[-1]}.*did you mean '{closest}'"):
        TrainConfig.from_config(_cfg(**{key: 4}))


def test_the_references_legacy_keys_are_accepted(caplog):
    with caplog.at_level(logging.DEBUG, logger="medcap.config"):
        cfg = TrainConfig.from_config(_cfg(compile=False, log_peak_memory_stats=True, enable_activation_offloading=False))
    assert cfg.checkpointer.component == "torchtune.training.FullModelHFCheckpointer"
    assert "compile is the reference's key and has no effect" in caplog.text


def test_every_file_the_run_reads_is_checked(tmp_path):
    llm = tmp_path / "llm"
    llm.mkdir()
    (llm / "model.safetensors").write_bytes(b"x")
    tok, data = tmp_path / "tokenizer.model", tmp_path / "train.json"
    tok.write_text("x")
    data.write_text("[]")
    over = {"checkpointer.checkpoint_dir": str(llm), "checkpointer.checkpoint_files": ["model.safetensors"],
            "tokenizer._component_": "medcap.models.llama3_tokenizer", "tokenizer.path": str(tok),
            "dataset.source": str(data)}
    TrainConfig.from_config(_cfg(**over)).check()
    for key in ("dataset.source", "tokenizer.path", "checkpointer.checkpoint_dir", "vision_checkpoint",
                "model.vision_pretrained"):
        bad = dict(over, **{key: str(tmp_path / "missing")})
        with pytest.raises(ConfigError, match=rf"{key}=.*missing.*no such"):
            TrainConfig.from_config(_cfg(**bad)).check()
    with pytest.raises(ConfigError, match=r"checkpointer.checkpoint_files=.*other.safetensors"):
        TrainConfig.from_config(_cfg(**dict(over, **{"checkpointer.checkpoint_files": ["other.safetensors"]}))).check()
    with pytest.raises(ConfigError, match=r"optimizer.betass: .*did you mean 'betas'"):
        TrainConfig.from_config(_cfg(**dict(over, **{"optimizer.betass": [0.9, 0.99]}))).check()


def test_torchtune_chat_dataset_is_swapped_and_logged(caplog):
    cfg = {"_component_": "torchtune.datasets.chat_dataset", "source": "t.json", "conversation_style": "sharegpt", "max_seq_len": 9}
    with caplog.at_level(logging.WARNING, logger="medcap.training"):
        out, swapped = resolve_dataset_config(cfg)
    assert swapped and out["_component_"] == "medcap.data.chat_dataset"
    assert {k: out[k] for k in ("source", "conversation_style", "max_seq_len")} == {
        "source": "t.json", "conversation_style": "sharegpt", "max_seq_len": 9
    }
    assert "torchtune.datasets.chat_dataset" in caplog.text and "medcap.data.chat_dataset" in caplog.text
    same, swapped = resolve_dataset_config({"_component_": "medcap.data.chat_dataset"})
    assert not swapped


def test_loss_config():
    assert resolve_loss_config(None)["_component_"] == "medcap.training.LabelTokenCrossEntropy"
    assert resolve_loss_config({"_component_": "torch.nn.CrossEntropyLoss"})["_component_"].endswith(
        "LabelTokenCrossEntropy"
    )
    with pytest.raises(ValueError, match="not supported"):
        resolve_loss_config({"_component_": "my.Loss"})
