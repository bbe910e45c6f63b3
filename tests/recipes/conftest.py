"""Fixtures for the recipe tests. Shared file: training fixtures start with ``train_``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any, Dict

import pytest

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes"


def _load_recipe_module(name: str):
    """Import ``recipes/{name}.py`` by path (torchtune's wheel owns the package name ``recipes``)."""
    mod_name = f"_medcap_recipe_{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, RECIPES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def train_assets(tmp_path_factory) -> Dict[str, Any]:
    """Tiny LLM + tokenizer + 8 good image-caption records (read-only)."""
    from medcap.training.tiny_assets import make_tiny_training_assets

    return make_tiny_training_assets(tmp_path_factory.mktemp("train_assets"), samples=8)


@pytest.fixture(scope="session")
def train_bad_assets(tmp_path_factory) -> Dict[str, Any]:
    """Like ``train_assets`` with 6 good records and 3 broken ones appended (read-only)."""
    from medcap.training.tiny_assets import make_tiny_training_assets

    return make_tiny_training_assets(tmp_path_factory.mktemp("train_bad_assets"), samples=6, bad=3)


@pytest.fixture(scope="session")
def train_config():
    """Builder: ``train_config(config_name, assets, out_dir, **overrides)`` -> resolved DictConfig
    of ``recipes/configs/{config_name}.yaml`` on the tiny assets; override keys use dots
    (pass them as a dict: ``**{"optimizer.lr": 1e-2}``)."""
    from omegaconf import OmegaConf

    def build(config_name: str, assets: Dict[str, Any], out_dir, **overrides):
        cfg = OmegaConf.load(RECIPES / "configs" / f"{config_name}.yaml")
        cfg.assets_dir = assets["assets_dir"]
        cfg.output_dir = str(out_dir)
        for key, value in overrides.items():
            OmegaConf.update(cfg, key, value, force_add=True)
        OmegaConf.resolve(cfg)
        return cfg

    return build


@pytest.fixture(scope="session")
def train_run():
    """Runner: ``train_run(cfg, recipe="full_finetune_single_device")`` -> (recipe, summary),
    in this process (setup, train, cleanup)."""

    def run(cfg, recipe: str = "full_finetune_single_device"):
        mod = _load_recipe_module(recipe)
        cls = {
            "full_finetune_single_device": "FullFinetuneRecipeSingleDevice",
            "full_finetune_distributed": "FullFinetuneRecipeDistributed",
        }[recipe]
        r = getattr(mod, cls)(cfg=cfg)
        r.setup(cfg=cfg)
        summary = r.train()
        r.cleanup()
        return r, summary

    return run


@pytest.fixture(scope="session")
def train_recipe_module():
    """``train_recipe_module(name)`` -> the imported ``recipes/{name}.py``."""
    return _load_recipe_module
