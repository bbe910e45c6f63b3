"""The single-device recipe on the tiny config: golden losses against an independent
loop, frozen LLM, exact resume, bad samples, checkpoints, the reference's launch line."""

from __future__ import annotations

import copy
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DistributedSampler

from medcap.models import load_vision_checkpoint, load_vision_weights, medcap_tiny
from medcap.data import collate_image_chat

# one_thread (tests/conftest.py): toy-sized ops run far faster on one thread on shared cores
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]

SINGLE = "tiny/full_finetune_single_device"


def _vision_state(model):
    return {k: v.detach().clone() for k, v in model.vision.state_dict().items()}


def test_golden_losses_match_an_independent_training_loop(
    train_assets, train_config, train_run, train_recipe_module, tmp_path, capfd
):
    """Three steps of the recipe == three steps of a plain loop written here: torch's
    DistributedSampler order, full-vocabulary logits, F.cross_entropy, torch AdamW.
    (With progress=False, no progress line is written.)"""
    cfg = train_config(SINGLE, train_assets, tmp_path / "run", epochs=1, max_steps_per_epoch=3, progress=False)
    mod = train_recipe_module("full_finetune_single_device")
    recipe = mod.FullFinetuneRecipe(cfg)
    recipe.setup()
    model0 = copy.deepcopy(recipe._model)  # the starting weights, before any step
    dataset = recipe._dataset
    summary = recipe.train()
    recipe.cleanup()
    losses = [h["loss"] for h in recipe.history]
    assert len(losses) == 3 and summary["global_step"] == 3
    assert "epoch 1/1" not in capfd.readouterr().err

    # the independent loop
    model = model0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.optimizer.lr)
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=cfg.seed)
    sampler.set_epoch(0)
    ref_losses = []
    for step, idx in enumerate(BatchSampler(sampler, cfg.batch_size, drop_last=True)):
        if step == 3:
            break
        batch = collate_image_chat([dataset[i] for i in idx], pad_id=recipe._tokenizer.pad_id)
        logits = model(batch["tokens"], images=batch["images"])  # [b, s, V]
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=-100
        )
        loss.backward()
        opt.step()
        opt.zero_grad()
        ref_losses.append(float(loss.detach()))
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    # a random-init tiny LM starts near ln(vocab): a sanity bound on the first value
    assert abs(losses[0] - math.log(cfg.model.vocab_size)) < 0.5
    for k, v in _vision_state(model).items():
        torch.testing.assert_close(recipe._model.vision.state_dict()[k], v, rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("optimizer_in_bwd", [False, True], ids=["adamw", "paged_adamw8bit_in_bwd"])
def test_only_the_vision_side_trains(train_assets, train_config, train_recipe_module, tmp_path, optimizer_in_bwd):
    over = {"epochs": 1, "max_steps_per_epoch": 2}
    if optimizer_in_bwd:
        over.update({"optimizer_in_bwd": True, "optimizer._component_": "bitsandbytes.optim.PagedAdamW8bit"})
    cfg = train_config(SINGLE, train_assets, tmp_path / "run", **over)
    recipe = train_recipe_module("full_finetune_single_device").FullFinetuneRecipe(cfg)
    recipe.setup()
    model = recipe._model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    recipe.train()
    recipe.cleanup()
    opt = recipe._optimizer
    assert opt.in_backward == optimizer_in_bwd
    for n, p in model.named_parameters():
        if n.startswith("encoders.image."):
            assert p.requires_grad and opt.has_state_for(p), n
        else:
            assert not p.requires_grad and p.grad is None, n
            assert not opt.has_state_for(p), n
            assert torch.equal(p.detach(), before[n]), f"frozen {n} changed"
    changed = [n for n, p in model.named_parameters() if n.startswith("encoders.image.") and not torch.equal(p, before[n])]
    assert changed, "no vision parameter moved"


RESUME_CASES = {
    "plain": {},
    "grouped_accumulated_scheduled": {
        "batch_size": 1,
        "gradient_accumulation_steps": 2,
        "group_by_length": True,
        "lr_scheduler": {"_component_": "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup", "num_warmup_steps": 2},
    },
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_a_stopped_run_resumes_to_the_same_weights(train_assets, train_config, train_run, tmp_path, case):
    """2 epochs x 4 steps. The interrupted run saves every 2 steps and is stopped after
    step 7 (mid-epoch 2; step 7 is lost, as in a kill); resuming replays from step 6."""
    over = dict(RESUME_CASES[case], epochs=2)
    full, _ = train_run(train_config(SINGLE, train_assets, tmp_path / "full", **over))

    ckpt = tmp_path / "stopped" / "checkpoint"
    stopped, s1 = train_run(
        train_config(SINGLE, train_assets, tmp_path / "stopped", save_last_every_steps=2, stop_after_steps=7, **over)
    )
    assert s1["stopped_early"] and s1["global_step"] == 7
    _, meta = load_vision_checkpoint(ckpt / "meta_model_last.safetensors")
    assert meta["global_step"] == 6  # the last periodic save before the stop
    resumed, s2 = train_run(
        train_config(SINGLE, train_assets, tmp_path / "stopped", resume_from_checkpoint=True, **over)
    )
    assert s2["global_step"] == 8 and not s2["stopped_early"]
    assert [h["step"] for h in resumed.history] == [7, 8]
    full_losses = {h["step"]: h["loss"] for h in full.history}
    assert [h["loss"] for h in resumed.history] == pytest.approx([full_losses[7], full_losses[8]], rel=1e-6)
    a, b = _vision_state(full._model), _vision_state(resumed._model)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    # the final files agree too
    last_full, _ = load_vision_checkpoint(tmp_path / "full" / "checkpoint" / "meta_model_last.safetensors")
    last_res, _ = load_vision_checkpoint(ckpt / "meta_model_last.safetensors")
    for part in ("visual", "projector"):
        for k in last_full[part]:
            assert torch.equal(last_full[part][k], last_res[part][k])


def test_bad_samples_are_skipped_counted_and_reported(train_bad_assets, train_config, train_run, tmp_path, capsys,
                                                     caplog):
    import logging

    caplog.set_level(logging.INFO)
    cfg = train_config(SINGLE, train_bad_assets, tmp_path / "run", epochs=2)
    recipe, summary = train_run(cfg)
    assert summary["bad_samples"] == 3
    kinds = " ".join(summary["bad_sample_reasons"].values())
    assert "not found" in kinds and "corrupt" in kinds
    assert "3 of 9 skipped" in summary["summary"]
    assert all(h["label_tokens"] > 0 for h in recipe.history)  # every step trained on full batches
    assert recipe.history[-1]["skipped_samples"] >= 3
    log_text = "".join(p.read_text() for p in (tmp_path / "run" / "logs").glob("*.txt"))
    assert "bad_samples:3" in log_text and "skipped_samples:" in log_text
    # the end-of-run summary, once: printed, not logged as well (a command's log goes to stderr too)
    assert capsys.readouterr().err.count("bad samples: 3") == 1 and "bad samples: 3" not in caplog.text
    # the config as it ran, beside the outputs: read back, it is the same typed config
    from omegaconf import OmegaConf

    from medcap.training import TrainConfig

    assert TrainConfig.from_config(OmegaConf.load(tmp_path / "run" / "config.yaml")) == recipe.cfg


def test_checkpoints_load_through_medcap_checkpointing(train_assets, train_config, train_run, tmp_path):
    """The reference's .pt format on request, loaded by medcap.models into a fresh
    model; TensorBoard logging as the metric logger."""
    pytest.importorskip("tensorboard")
    cfg = train_config(
        SINGLE,
        train_assets,
        tmp_path / "run",
        epochs=2,
        max_steps_per_epoch=1,
        checkpoint_format="pt",
        metric_logger={"_component_": "torchtune.training.metric_logging.TensorBoardLogger", "log_dir": str(tmp_path / "tb")},
    )
    recipe, _ = train_run(cfg)
    ckpt = tmp_path / "run" / "checkpoint"
    assert sorted(p.name for p in ckpt.iterdir()) == ["meta_model_0.pt", "meta_model_1.pt", "meta_model_last.pt", "recipe_state.pt"]
    raw = torch.load(ckpt / "meta_model_1.pt", weights_only=True)
    assert set(raw) == {"visual", "projector"}  # the reference's layout
    fresh = medcap_tiny(**train_assets["model_kwargs"], num_image_tokens=cfg.model.num_image_tokens)
    load_vision_weights(fresh, ckpt / "meta_model_last.pt")
    for k, v in recipe._model.vision.state_dict().items():
        assert torch.equal(fresh.vision.state_dict()[k], v), k
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*")), "no TensorBoard event file"


def test_reference_launch_line_runs_through_medcap_run(train_assets, train_launch_args, tmp_path):
    """Section 7's single-device line with `tune run` -> `medcap run`, on the 8B config
    (PagedAdamW8bit stepped in backward, activation checkpointing) with the model,
    tokenizer and checkpointer overridden to the tiny assets, on the CPU."""
    a = train_assets
    out = tmp_path / "OUT"
    cmd = [
        sys.executable, "-m", "medcap.cli", "run", "full_finetune_single_device",
        "--config", "llama3_1/8B_full_single_device",
        "epochs=1", "batch_size=4", "gradient_accumulation_steps=1", "optimizer.lr=2e-5", "vision=biomedclip",
        *train_launch_args(a, out),  # the reference's data/tokenizer/checkpointer args + the tiny stand-ins
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert "using medcap.data.chat_dataset" in text
    assert "PagedAdamW8bit" in text and "stepped in backward" in text
    assert "building the model" in text  # the marker the user-error tests below look for
    # not a terminal: plain progress lines (no carriage-return redraws), with the loss
    assert "\r" not in text
    assert re.search(r"^epoch 1/1: \d+/\d+ steps \(100%\) \| .* loss=", proc.stderr, flags=re.M), proc.stderr[-2000:]
    assert (out / "checkpoint" / "meta_model_0.safetensors").is_file()
    assert (out / "checkpoint" / "recipe_state.pt").is_file()
    log_text = "".join(p.read_text() for p in (out / "log").glob("*.txt"))
    for key in ("loss:", "lr:", "tokens_per_second:", "peak_memory_gib:"):
        assert key in log_text


@pytest.mark.parametrize(
    "override,expected",
    [
        ("batch_sze=4", "medcap run: error: unknown key 'batch_sze' (did you mean 'batch_size'?)"),
        # every other file the run reads: tests/training/test_state_optim_config.py, in-process
        ("dataset.source={missing}", "medcap run: error: dataset.source='{missing}': no such file"),
    ],
    ids=["misspelled_key", "missing_dataset"],
)
def test_a_user_error_is_one_line_before_any_model_is_built(train_assets, tmp_path, override, expected):
    """`medcap run` as a user types it: one error line (after the launcher's echo of the
    command) naming the key, a non-zero exit,
    and no model built (the recipe logs "building the model" just before it builds one;
    the launch-line test above sees that line in a good run)."""
    missing = str(tmp_path / "nope.json")
    _assert_one_error_line(train_assets, tmp_path, [override.format(missing=missing)], expected.format(missing=missing))
    assert not (tmp_path / "run").exists()  # nothing written either


def test_a_used_folder_is_refused_in_one_line(train_assets, tmp_path):
    ckpt = tmp_path / "run" / "checkpoint"
    ckpt.mkdir(parents=True)
    (ckpt / "meta_model_0.safetensors").write_bytes(b"an earlier run's")
    _assert_one_error_line(train_assets, tmp_path, [], "medcap run: error: checkpointer.output_dir=")
    assert [p.name for p in ckpt.iterdir()] == ["meta_model_0.safetensors"]


def _assert_one_error_line(assets, tmp_path, overrides, expected: str) -> None:
    cmd = [sys.executable, "-m", "medcap.cli", "run", "full_finetune_single_device", "--config", SINGLE,
           f"assets_dir={assets['assets_dir']}", f"output_dir={tmp_path / 'run'}", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("MEDCAP_DEBUG", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("medcap run: error:")]
    assert errors == lines[-1:] and errors[0].startswith(expected), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "building the model" not in proc.stdout + proc.stderr
