"""Training that never starts wrong and never loses a run, on the tiny single-device recipe:
a real Ctrl-C mid-epoch saves and exits, the same command with resume_from_checkpoint=auto
ends with the uninterrupted run's weights; the folder is locked meanwhile; a used folder
is refused without resume or overwrite; no random vision tower by accident; a resumed
epoch keeps its data order and random streams when the model draws from the global RNG.

Run as a script, this file is the interrupted training: the recipe's own ``recipe_main``
with one step paced so that the test's signal lands at a known step boundary.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STOP_AT_STEP = 2  # of 4 in epoch 0: mid-epoch


def _child_main(argv) -> int:
    import torch

    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("_single_recipe", REPO / "recipes" / "full_finetune_single_device.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    original = mod.FullFinetuneRecipe.train_step

    def paced(self, micro):
        out = original(self, micro)
        print(f"STEP {self.global_step}", flush=True)
        if self.global_step == STOP_AT_STEP:  # wait here for the test's signal
            deadline = time.monotonic() + 120
            while self._signals.received is None and time.monotonic() < deadline:
                time.sleep(0.02)
        return out

    mod.FullFinetuneRecipe.train_step = paced
    sys.argv = ["full_finetune_single_device", *argv]
    return mod.recipe_main()


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))


import signal  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from medcap._io import LockedError  # noqa: E402
from medcap.models import load_vision_checkpoint  # noqa: E402

# one_thread (tests/conftest.py): toy-sized ops run far faster on one thread on shared cores
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]

SINGLE = "tiny/full_finetune_single_device"


def _vision_state(model):
    return {k: v.detach().clone() for k, v in model.vision.state_dict().items()}


def _assert_same_weights(a_model, b_model):
    a, b = _vision_state(a_model), _vision_state(b_model)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


def _wait_for_line(proc, wanted: str, seen: list) -> None:
    for line in proc.stdout:
        seen.append(line)
        if line.rstrip().endswith(wanted):  # after a progress bar's \\r on the same line
            return
    raise AssertionError(f"the training ended before {wanted!r}:\n{''.join(seen)[-3000:]}")


@pytest.mark.slow  # a fresh Python importing torch and torchtune: ~5 s idle, ~20 s on busy cores
def test_ctrl_c_mid_epoch_saves_and_the_same_command_with_auto_finishes_the_run(
    train_assets, train_config, train_run, train_recipe_module, tmp_path
):
    out = tmp_path / "run"
    ckpt = out / "checkpoint"
    args = ["--config", str(REPO / "recipes" / "configs" / f"{SINGLE}.yaml"),
            f"assets_dir={train_assets['assets_dir']}", f"output_dir={out}", "epochs=2", "num_workers=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    # A session of its own, so that the Ctrl-C below reaches the whole process group
    # (recipe and DataLoader worker) as a terminal's does, and nothing else.
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, cwd=tmp_path, start_new_session=True)
    seen: list = []
    try:
        _wait_for_line(proc, f"STEP {STOP_AT_STEP}", seen)
        # meanwhile the folder is the running training's: a second one refuses at once
        second = train_config(SINGLE, train_assets, out, epochs=2, resume_from_checkpoint="auto")
        mod = train_recipe_module("full_finetune_single_device")
        with pytest.raises(LockedError, match=rf"in use by process {proc.pid}"):
            mod.FullFinetuneRecipe(second)
        os.killpg(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(seen) + rest
    assert proc.returncode == 128 + signal.SIGINT, text[-3000:]  # 130, as a shell reports Ctrl-C
    assert "SIGINT received" in text and "resume_from_checkpoint=True (or auto)" in text
    assert f"STEP {STOP_AT_STEP + 1}" not in text
    state = torch.load(ckpt / "recipe_state.pt", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (0, STOP_AT_STEP, STOP_AT_STEP)
    _, meta = load_vision_checkpoint(ckpt / "meta_model_last.safetensors")
    assert meta["global_step"] == STOP_AT_STEP

    resumed, summary = train_run(second)  # the same folder, resume_from_checkpoint=auto
    assert summary["global_step"] == 8 and not summary["stopped_early"]
    assert [h["step"] for h in resumed.history] == list(range(STOP_AT_STEP + 1, 9))
    full, _ = train_run(train_config(SINGLE, train_assets, tmp_path / "full", epochs=2))
    full_losses = {h["step"]: h["loss"] for h in full.history}
    assert [h["loss"] for h in resumed.history] == [full_losses[s] for s in range(STOP_AT_STEP + 1, 9)]
    _assert_same_weights(full._model, resumed._model)


def test_a_used_folder_is_refused_then_overwritten_on_request(train_assets, train_config, train_run, tmp_path):
    over = {"epochs": 1, "max_steps_per_epoch": 1}
    train_run(train_config(SINGLE, train_assets, tmp_path / "run", **over))
    ckpt = tmp_path / "run" / "checkpoint"
    first = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    with pytest.raises(FileExistsError, match="already holds a run.*resume_from_checkpoint=True.*overwrite=True"):
        train_run(train_config(SINGLE, train_assets, tmp_path / "run", **over))
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == first  # nothing lost

    (ckpt / "meta_model_7.safetensors").write_bytes(b"from an older run")
    recipe, summary = train_run(train_config(SINGLE, train_assets, tmp_path / "run", overwrite=True, seed=1, **over))
    assert summary["global_step"] == 1
    assert sorted(p.name for p in ckpt.iterdir()) == [  # meta_model_7 is gone
        "meta_model_0.json", "meta_model_0.safetensors", "meta_model_last.json", "meta_model_last.safetensors",
        "recipe_state.pt",
    ]
    assert (ckpt / "meta_model_0.safetensors").read_bytes() != first["meta_model_0.safetensors"]  # the new run's


def test_auto_starts_a_fresh_folder_and_continues_a_used_one(train_assets, train_config, train_run, tmp_path):
    """The same line twice: a new run, then (finished) a resume that has nothing left to do."""
    cfg = lambda: train_config(  # noqa: E731
        SINGLE, train_assets, tmp_path / "run", epochs=1, max_steps_per_epoch=1, resume_from_checkpoint="auto"
    )
    first, summary = train_run(cfg())
    assert summary["global_step"] == 1 and [h["step"] for h in first.history] == [1]
    again, summary = train_run(cfg())
    assert summary["global_step"] == 1 and list(again.history) == []  # resumed at the end
    _assert_same_weights(first._model, again._model)


def test_the_8b_config_refuses_a_random_tower_before_building_anything(
    train_assets, train_launch_args, train_recipe_module, tmp_path, monkeypatch
):
    """The 8B config with the tiny stand-ins, minus the launch line's opt-in: refused in the
    constructor (nothing built, no folder written), the message naming both keys."""
    from medcap.config import parse_args

    mod = train_recipe_module("full_finetune_single_device")
    monkeypatch.setattr(mod, "load_model", lambda *a, **k: pytest.fail("a model was built"))
    args = [a for a in train_launch_args(train_assets, tmp_path / "OUT") if a != "vision_random_init=True"]
    _, cfg = parse_args(["--config", str(REPO / "recipes" / "configs" / "llama3_1" / "8B_full_single_device.yaml"), *args])
    assert cfg.model.vision_pretrained is None and not cfg.vision_random_init
    with pytest.raises(ValueError, match=r"random weights.*model\.vision_pretrained.*vision_checkpoint.*vision_random_init=True"):
        mod.FullFinetuneRecipe(cfg)
    assert not (tmp_path / "OUT" / "checkpoint").exists()


def test_the_8b_configs_start_from_biomedclip():
    from omegaconf import OmegaConf

    for name in ("8B_full_single_device", "8B_full"):
        cfg = OmegaConf.load(REPO / "recipes" / "configs" / "llama3_1" / f"{name}.yaml")
        assert cfg.model.vision_pretrained == "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", name
        assert cfg.vision_random_init is False, name


def _run_with_global_rng_draws(cfg, recipe_module, monkeypatch, seen_order):
    """A recipe run whose model (dropout) and data (an 'augmentation') draw from the global
    RNG; ``seen_order`` collects (global step, sample index) as the data is read."""
    recipe = recipe_module("full_finetune_single_device").FullFinetuneRecipe(cfg)
    recipe.setup()
    recipe._model.vision.visual.head.drop.p = 0.5
    dataset_cls = type(recipe._dataset)
    original = dataset_cls.__getitem__

    def augmenting(self, i):
        sample = original(self, i)
        torch.rand(3)  # an augmentation's draw
        seen_order.append((recipe.global_step, i))
        return sample

    monkeypatch.setattr(dataset_cls, "__getitem__", augmenting)
    summary = recipe.train()
    recipe.cleanup()
    monkeypatch.setattr(dataset_cls, "__getitem__", original)
    return recipe, summary


def test_a_mid_epoch_resume_is_exact_when_the_model_draws_from_the_global_rng(
    train_assets, train_config, train_recipe_module, tmp_path, monkeypatch
):
    over = {"epochs": 2}
    full_order, stopped_order, resumed_order = [], [], []
    full, _ = _run_with_global_rng_draws(
        train_config(SINGLE, train_assets, tmp_path / "full", **over), train_recipe_module, monkeypatch, full_order
    )
    stopped_cfg = train_config(SINGLE, train_assets, tmp_path / "stopped", save_last_every_steps=2, stop_after_steps=3, **over)
    _, s1 = _run_with_global_rng_draws(stopped_cfg, train_recipe_module, monkeypatch, stopped_order)
    assert s1["global_step"] == 3  # saved after step 2, step 3 lost
    resumed_cfg = train_config(SINGLE, train_assets, tmp_path / "stopped", resume_from_checkpoint=True, **over)
    resumed, s2 = _run_with_global_rng_draws(resumed_cfg, train_recipe_module, monkeypatch, resumed_order)
    assert s2["global_step"] == 8
    # the data order after the resume point is the uninterrupted run's
    assert resumed_order == [x for x in full_order if x[0] >= 2]
    full_losses = {h["step"]: h["loss"] for h in full.history}
    assert [h["loss"] for h in resumed.history] == [full_losses[s] for s in range(3, 9)]
    _assert_same_weights(full._model, resumed._model)
    state = torch.load(tmp_path / "stopped" / "checkpoint" / "recipe_state.pt", weights_only=True)
    assert len(state["data_rng"]) == 1 and state["data_rng"][0].dtype == torch.uint8  # the loader's generator
