"""The distributed recipe with 2 processes over Gloo (torchrun), launched by the
reference's line (`medcap run --nproc_per_node 2 full_finetune_distributed --config
llama3_1/8B_full ...`) with the model, tokenizer and checkpointer on tiny assets.

Both ranks must end with bit-identical vision weights, equal (within float
tolerance) to one process trained with the same global batches.

Run as a script (under torchrun) this file is the per-rank side of the test: it runs
the recipe class exactly as ``recipe_main`` does and dumps each rank's weights.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DUMP_ENV = "MEDCAP_TEST_TRAIN_DUMP"


def _rank_main() -> int:
    import torch

    from medcap.config import parse_args

    spec = importlib.util.spec_from_file_location("_dist_recipe", REPO / "recipes" / "full_finetune_distributed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")  # as recipe_main
    torch.set_num_threads(1)
    _, cfg = parse_args(sys.argv[1:])  # as recipe_main (medcap.config.run_recipe)
    recipe = mod.FullFinetuneRecipe(cfg)
    recipe.setup()
    recipe.train()
    rank = recipe._env.rank
    torch.save(
        {
            "vision": {k: v.detach().clone() for k, v in recipe._model.vision.state_dict().items()},
            "losses": [h["loss"] for h in recipe.history],
            "world_size": recipe._env.world_size,
        },
        Path(os.environ[DUMP_ENV]) / f"rank{rank}.pt",
    )
    recipe.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(_rank_main())


import pytest  # noqa: E402  (the script side above needs none of the test imports)
import torch  # noqa: E402

# one_thread (tests/conftest.py): toy-sized ops run far faster on one thread on shared cores
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]


def _reference_line(assets, out: Path, launch_args):
    """Section 7's distributed line (tune run -> medcap run), with the tiny stand-ins."""
    return [
        "--nproc_per_node", "2", "full_finetune_distributed", "--config", "llama3_1/8B_full",
        "epochs=1", "batch_size=1", "gradient_accumulation_steps=1", "optimizer.lr=1e-3", "vision=biomedclip",
        *launch_args(assets, out),
        "seed=0", "max_steps_per_epoch=3",
        "save_last_every_steps=1",  # exercise the collective save (every rank's random state gathered)
    ]


def test_two_ranks_train_one_vision_model(train_assets, train_config, train_run, train_launch_args, tmp_path):
    from medcap.models import load_vision_checkpoint
    from medcap.cli import build_run_command

    argv = _reference_line(train_assets, tmp_path / "OUT", train_launch_args)
    cmd = build_run_command(argv)
    # `medcap run` resolves the reference's names to our files (not torchtune's built-ins) ...
    recipe_i = next(i for i, c in enumerate(cmd) if c.endswith(".py"))
    assert Path(cmd[recipe_i]) == REPO / "recipes" / "full_finetune_distributed.py"
    assert Path(cmd[cmd.index("--config") + 1]) == REPO / "recipes" / "configs" / "llama3_1" / "8B_full.yaml"
    assert "torch.distributed.run" in " ".join(cmd[:recipe_i])
    # ... and we run that exact command with this file standing in for the recipe file,
    # so that each rank can also dump its own weights.
    cmd[recipe_i] = str(Path(__file__).resolve())
    dump = tmp_path / "dump"
    dump.mkdir()
    env = dict(os.environ, **{DUMP_ENV: str(dump), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    text = proc.stdout + proc.stderr
    assert "using medcap.data.chat_dataset" in text
    assert "FSDP2: 2 decoder layers sharded over 2 ranks" in text
    assert "vision weights identical on all 2 ranks" in text  # the recipe's own check

    r0, r1 = (torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert len(r0["losses"]) == 3 and r0["losses"] == r1["losses"]  # the global loss, on every rank
    for k in r0["vision"]:
        assert torch.equal(r0["vision"][k], r1["vision"][k]), f"ranks differ at {k}"

    # One process, batch 2 = the 2 ranks' global batch, same seed and config.
    over = {
        "epochs": 1, "batch_size": 2, "max_steps_per_epoch": 3, "seed": 0,
        "optimizer._component_": "torch.optim.AdamW", "optimizer.lr": 1e-3, "optimizer.fused": True,
        "enable_activation_checkpointing": True,
    }
    single, _ = train_run(train_config("tiny/full_finetune_single_device", train_assets, tmp_path / "one", **over))
    assert [h["loss"] for h in single.history] == pytest.approx(r0["losses"], rel=1e-5)
    worst = max(
        (float((r0["vision"][k] - v).abs().max()), k) for k, v in single._model.vision.state_dict().items()
    )
    # One step moves weights by ~lr = 1e-3; float reordering between the two set-ups
    # gives ~3e-6 here. A rank training alone on half the data would be off by ~1e-3.
    assert worst[0] < 5e-5, f"largest difference to one process: {worst}"
    # rank 0 wrote the checkpoint, holding those weights
    state, meta = load_vision_checkpoint(tmp_path / "OUT" / "checkpoint" / "meta_model_0.safetensors")
    assert meta["global_step"] == 3
    rs = torch.load(tmp_path / "OUT" / "checkpoint" / "recipe_state.pt", weights_only=True)
    assert rs["global_step"] == 3 and rs["epoch"] == 1 and rs["world_size"] == 2 and len(rs["rng"]) == 2
    flat = {**{f"visual.{k}": v for k, v in state["visual"].items()}, **{f"projector.{k}": v for k, v in state["projector"].items()}}
    for k, v in r0["vision"].items():
        assert torch.equal(flat[k], v), k


def test_both_recipe_names_run_one_file():
    """The single-device recipe is the distributed one in a world of one process, so the
    two cannot drift apart: `medcap run` resolves both names to the same code."""
    from medcap.cli import resolve_recipe

    single = Path(resolve_recipe("full_finetune_single_device")).resolve()
    dist = Path(resolve_recipe("full_finetune_distributed")).resolve()
    assert single.read_bytes() == dist.read_bytes()
