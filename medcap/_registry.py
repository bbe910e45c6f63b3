"""medcap's recipes and the configs written for each: the table, and names -> files.

    RECIPES                       recipe name -> its file and its configs (what ls, cp, cat,
                                  validate and run go by)
    recipes_dir, configs_dir      where the files are (a checkout, a wheel, $MEDCAP_RECIPES_DIR)
    recipe_names, config_names    what is there
    recipe_of_config, recipe_table  which config belongs to which recipe
    resolve_recipe, resolve_config  a name or a path -> an absolute path

The recipes folder is the top-level ``recipes/`` of a source checkout, or
``medcap/_recipes`` inside an installed wheel (pyproject.toml maps it there:
torchtune's wheel owns the top-level name ``recipes``). Below the command line,
so that ``medcap serve``, ``medcap caption`` and the demo resolve names the way
``medcap run`` does without importing ``medcap.cli``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from medcap._cmdline import CLIError

RECIPES_ENV = "MEDCAP_RECIPES_DIR"
# `medcap run generate vision_checkpoint=CKPT` without --config: the model comes from the checkpoint
CHECKPOINT_CONFIG = "checkpoint/generate"
CONFIG_SUFFIXES = (".yaml", ".yml")


# ---- the table


@dataclass(frozen=True)
class Recipe:
    """A recipe file (relative to the recipes folder) and its configs (names under
    ``configs/``, without ``.yaml``), the first being the one to try first."""

    file: str
    configs: Tuple[str, ...]


# What `run`, `ls`, `cp`, `cat` and `validate` go by; tests/test_registry.py checks that it names
# every shipped recipe and config exactly once. Both fine-tuning names run the same code
# (full_finetune_distributed.py is a link to full_finetune_single_device.py).
RECIPES: Dict[str, Recipe] = {
    "full_finetune_single_device": Recipe(
        "full_finetune_single_device.py",
        ("tiny/full_finetune_single_device", "llama3_1/8B_full_single_device", "demo/train"),
    ),
    "full_finetune_distributed": Recipe(
        "full_finetune_distributed.py", ("tiny/full_finetune_distributed", "llama3_1/8B_full")
    ),
    "generate": Recipe(
        "generate.py", ("tiny/generate", "custom_generation_config", "demo/generate", CHECKPOINT_CONFIG)
    ),
}


# ---- where the files are


def recipes_dir() -> Path:
    """medcap's recipes folder: ``$MEDCAP_RECIPES_DIR``, else the one an installed wheel
    carries (``medcap/_recipes``), else the source checkout's top-level ``recipes/``."""
    env = os.environ.get(RECIPES_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise CLIError(f"${RECIPES_ENV}={env!r} is not a folder")
        return path.resolve()
    import medcap

    package = Path(medcap.__file__).resolve().parent
    if (package / "_recipes").is_dir():
        return package / "_recipes"
    # A site-packages folder also has a top-level recipes/ (torchtune's): only a checkout,
    # recognisable by its pyproject.toml, has ours there.
    checkout = package.parent
    if (checkout / "recipes").is_dir() and (checkout / "pyproject.toml").is_file():
        return checkout / "recipes"
    raise CLIError(
        f"medcap's recipes were not found (neither {str(package / '_recipes')!r}, which an installed "
        f"wheel carries, nor a source checkout's recipes/ at {str(checkout / 'recipes')!r}). Reinstall "
        f"medcap (`pip install .`, or `pip install -e .` from the repository root), or set "
        f"${RECIPES_ENV} to the recipes folder."
    )


def configs_dir() -> Path:
    return recipes_dir() / "configs"


def recipe_names() -> List[str]:
    return sorted(RECIPES)


def config_names() -> List[str]:
    """Config names: the YAML files under ``configs/`` (registered or not), without the suffix."""
    cdir = configs_dir()
    if not cdir.is_dir():
        return []
    return sorted(
        p.relative_to(cdir).with_suffix("").as_posix()
        for p in cdir.rglob("*")
        if p.is_file() and p.suffix in CONFIG_SUFFIXES
    )


# ---- which config belongs to which recipe


def recipe_of_config(name: str) -> Optional[str]:
    """The recipe a registered config name belongs to (None for an unregistered one)."""
    name = _strip_suffix(name)
    return next((r for r, rec in RECIPES.items() if name in rec.configs), None)


def recipe_table() -> Dict[str, List[str]]:
    """``{recipe name: [config names]}`` from ``RECIPES``, listing only configs whose file
    exists; YAML files the registry does not name go under ``""``."""
    on_disk = config_names()
    table = {name: [c for c in rec.configs if c in on_disk] for name, rec in RECIPES.items()}
    registered = {c for rec in RECIPES.values() for c in rec.configs}
    others = [c for c in on_disk if c not in registered]
    if others:
        table[""] = others
    return table


# ---- a name or a path -> a file


def _strip_suffix(name: str) -> str:
    for suffix in CONFIG_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _looks_like_path(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or os.sep in spec


def resolve_recipe(spec: str) -> Path:
    """A recipe name (always medcap's own, never torchtune's) or a ``.py`` path -> absolute path."""
    if _looks_like_path(spec):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise CLIError(
                f"recipe file not found: {spec!r} (looked at {str(path.absolute())!r}); "
                f"medcap's recipe names are {recipe_names()}"
            )
        return path.resolve()
    names = recipe_names()
    if spec in names:
        path = recipes_dir() / RECIPES[spec].file
        if not path.is_file():
            raise CLIError(f"recipe {spec!r} is registered but its file {str(path)!r} is missing")
        return path
    raise CLIError(
        f"unknown recipe {spec!r}: medcap's recipes are {names} (in {str(recipes_dir())!r}); "
        "or give the path of a .py file"
    )


def resolve_config(spec: str) -> Path:
    """A config file path (relative to the working directory, or absolute) or a config
    name under ``recipes/configs`` (with or without ``.yaml``) -> absolute path."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path.resolve()
    cdir = configs_dir()
    name = _strip_suffix(spec)
    for suffix in CONFIG_SUFFIXES:
        cand = cdir / f"{name}{suffix}"
        if cand.is_file() and not Path(spec).is_absolute():
            return cand.resolve()
    raise CLIError(
        f"config {spec!r} is neither a file (looked at {str(path.absolute())!r}) nor one of "
        f"medcap's configs: {config_names()}"
    )
