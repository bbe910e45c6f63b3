"""Fixtures for the recipe tests. Shared file: training fixtures start with ``train_``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any, Dict, List

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


def _tiny_config(config_name: str, assets: Dict[str, Any], out_dir, settings: Dict[str, Any], overrides: Dict[str, Any]):
    """``recipes/configs/{config_name}.yaml`` on the tiny assets: ``settings`` (plain keys)
    first, then the dotted ``overrides`` (which may replace them). Interpolations are
    left for the recipe to resolve, as on the command line: ``${assets_dir}`` keys are
    config variables that the typed configs accept only as such."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(RECIPES / "configs" / f"{config_name}.yaml")
    cfg.assets_dir = assets["assets_dir"]
    cfg.output_dir = str(out_dir)
    for key, value in settings.items():
        cfg[key] = value
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


@pytest.fixture(scope="session")
def train_assets(tmp_path_factory) -> Dict[str, Any]:
    """Tiny LLM + tokenizer + 8 good image-caption records (read-only)."""
    from medcap.testing import make_tiny_training_assets

    return make_tiny_training_assets(tmp_path_factory.mktemp("train_assets"), samples=8)


@pytest.fixture(scope="session")
def train_bad_assets(tmp_path_factory) -> Dict[str, Any]:
    """Like ``train_assets`` with 6 good records and 3 broken ones appended (read-only)."""
    from medcap.testing import make_tiny_training_assets

    return make_tiny_training_assets(tmp_path_factory.mktemp("train_bad_assets"), samples=6, bad=3)


@pytest.fixture(scope="session")
def train_config():
    """Builder: ``train_config(config_name, assets, out_dir, **overrides)`` -> resolved DictConfig
    of ``recipes/configs/{config_name}.yaml`` on the tiny assets; override keys use dots
    (pass them as a dict: ``**{"optimizer.lr": 1e-2}``)."""

    def build(config_name: str, assets: Dict[str, Any], out_dir, **overrides):
        return _tiny_config(config_name, assets, out_dir, {}, overrides)

    return build


@pytest.fixture(scope="session")
def train_run():
    """Runner: ``train_run(cfg, recipe="full_finetune_single_device")`` -> (recipe, summary),
    in this process (setup, train, cleanup)."""

    def run(cfg, recipe: str = "full_finetune_single_device"):
        r = _load_recipe_module(recipe).FullFinetuneRecipe(cfg)
        r.setup()
        summary = r.train()
        r.cleanup()
        return r, summary

    return run


@pytest.fixture(scope="session")
def train_launch_args():
    """``train_launch_args(assets, out)`` -> the data, tokenizer, checkpointer and output
    arguments of the reference's section 7 launch lines, then the overrides that swap in
    the tiny stand-ins for Llama-3.1-8B on the CPU (shared by both recipes' launch tests)."""

    def args(assets: Dict[str, Any], out) -> List[str]:
        a = assets
        return [
            "dataset._component_=torchtune.datasets.chat_dataset", f"dataset.source={a['train_json']}",
            "dataset.conversation_style=sharegpt", "dataset.max_seq_len=1000",
            f"tokenizer.path={a['tokenizer_path']}", f"checkpointer.checkpoint_dir={a['checkpoint_dir']}",
            f"checkpointer.output_dir={out}/checkpoint", f"metric_logger.log_dir={out}/log", f"output_dir={out}",
            # the tiny stand-ins for Llama-3.1-8B, on the CPU
            f"tokenizer.special_tokens_path={a['special_tokens_path']}", "checkpointer.checkpoint_files=[model.safetensors]",
            "model._component_=medcap.models.medcap_tiny", "model.vocab_size=268", "model.image_token_id=268",
            "model.num_image_tokens=4", "device=cpu", "dtype=fp32", "num_workers=0",
            # the tiny tower has no BiomedCLIP weights: it starts random on purpose
            "model.vision_pretrained=null", "vision_random_init=True",
        ]

    return args


@pytest.fixture(scope="session")
def train_recipe_module():
    """``train_recipe_module(name)`` -> the imported ``recipes/{name}.py``."""
    return _load_recipe_module


# ---- generation (gen_*)


@pytest.fixture(scope="session")
def gen_assets(tmp_path_factory) -> Dict[str, Any]:
    """Tiny LLM + tokenizer + 5 caption records, a vision checkpoint in the reference's
    .pt format, and VQA-RAD / OmniMedVQA layouts under ``datasets`` (read-only)."""
    import torch

    from medcap.models import medcap_tiny, save_vision_checkpoint
    from medcap.testing import make_omnimedvqa_layout, make_tiny_training_assets, make_vqarad_layout

    root = tmp_path_factory.mktemp("gen_assets")
    assets = make_tiny_training_assets(root, samples=5)
    torch.manual_seed(5)
    model = medcap_tiny(**assets["model_kwargs"], num_image_tokens=4)
    ckpt = root / "checkpoint" / "meta_model_last.pt"
    ckpt.parent.mkdir(parents=True)
    save_vision_checkpoint(model, ckpt)
    datasets = root / "datasets"
    omni = make_omnimedvqa_layout(datasets, per_modality=2, image_size=36)
    vqarad = make_vqarad_layout(datasets, n_images=3, image_size=36)
    return {**assets, "vision_checkpoint": str(ckpt), "datasets": str(datasets), "omni": omni, "vqarad": vqarad}


@pytest.fixture(scope="session")
def gen_config():
    """Builder: ``gen_config(assets, out_dir, config_name="tiny/generate", **overrides)`` -> resolved
    DictConfig of a generation config on the tiny assets (dotted keys as a dict)."""

    def build(assets: Dict[str, Any], out_dir, config_name: str = "tiny/generate", **overrides):
        settings = {"vision_checkpoint": assets["vision_checkpoint"], "progress": False}
        return _tiny_config(config_name, assets, out_dir, settings, overrides)

    return build


@pytest.fixture(scope="session")
def gen_run():
    """Runner: ``gen_run(cfg)`` -> (recipe, results) of ``recipes/generate.py``, in this process."""

    def run(cfg):
        mod = _load_recipe_module("generate")
        r = mod.GenerateRecipe(cfg)
        r.setup()
        return r, r.run()

    return run


@pytest.fixture(scope="session")
def gen_recipe_module():
    """The imported ``recipes/generate.py``."""
    return _load_recipe_module("generate")
