"""``medcap ls``, ``cp``, ``cat`` and ``validate``: medcap's recipes and configs, listed,
copied out for editing, printed with their comments, and checked.

    ls_main         every recipe with its configs (the registry, ``medcap._registry``)
    cp_main         a config (or a recipe) copied out, to edit it and run it by path
    cat_main        a config printed as shipped, comments included
    validate_main   a config (with overrides) read as its recipe will read it: every key,
                    value and path checked, nothing loaded (``medcap.config``)

Each takes the command's arguments and returns its exit status; a wrong name is a
``CLIError``, which ``medcap.cli`` reports in one line.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import List, Tuple

from medcap._cmdline import CLIError
from medcap._registry import (
    CONFIG_SUFFIXES,
    RECIPES,
    recipe_names,
    recipe_of_config,
    recipe_table,
    recipes_dir,
    resolve_config,
    resolve_recipe,
)


# ---- ls, cp, cat


def ls_main(argv: List[str]) -> int:
    """``medcap ls``"""
    argparse.ArgumentParser(prog="medcap ls", description="List medcap's recipes and configs.").parse_args(argv)
    table = recipe_table()
    rows: List[Tuple[str, str]] = []
    for recipe in sorted(table, key=lambda r: (r == "", r)):
        cfgs = table[recipe] or [""]
        label = recipe or "(other configs)"
        rows.extend((label if i == 0 else "", c) for i, c in enumerate(cfgs))
    width = max([len("RECIPE")] + [len(r) for r, _ in rows]) + 3
    print(f"{'RECIPE':<{width}}CONFIG")
    for r, c in rows:
        print(f"{r:<{width}}{c}".rstrip())
    print(f"\nrecipes: {recipes_dir()}")
    return 0


def cp_main(argv: List[str]) -> int:
    """``medcap cp NAME DEST [--force]``"""
    parser = argparse.ArgumentParser(
        prog="medcap cp", description="Copy a medcap config (or recipe) out, to edit it and run it by path."
    )
    parser.add_argument("name", help="config name (see `medcap ls`), config path, or recipe name")
    parser.add_argument("dest", help="file or existing folder to copy to")
    parser.add_argument("-f", "--force", action="store_true", help="overwrite DEST if it exists")
    args = parser.parse_args(argv)

    src = resolve_recipe(args.name) if args.name in recipe_names() else resolve_config(args.name)
    dest = Path(args.dest).expanduser()
    if dest.is_dir() or args.dest.endswith(("/", os.sep)):
        dest = dest / src.name
    elif not dest.suffix:
        dest = dest.with_suffix(src.suffix)
    if dest.exists() and not args.force:
        raise CLIError(f"{str(dest)!r} already exists; add --force to overwrite it")
    if dest.resolve() == src.resolve():
        raise CLIError(f"{str(dest)!r} is the source itself")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    print(f"copied {src} -> {dest}")
    return 0


def cat_main(argv: List[str]) -> int:
    """``medcap cat CONFIG``"""
    parser = argparse.ArgumentParser(prog="medcap cat", description="Print a medcap config with its comments.")
    parser.add_argument("config", help="config name (see `medcap ls`) or path")
    args = parser.parse_args(argv)
    if args.config in RECIPES:
        raise CLIError(
            f"{args.config!r} is a recipe; its configs are {list(RECIPES[args.config].configs)} "
            f"(`medcap cp {args.config} DEST` copies the recipe itself)"
        )
    sys.stdout.write(resolve_config(args.config).read_text(encoding="utf-8"))
    return 0


# ---- validate


def validate_main(argv: List[str]) -> int:
    """``medcap validate CONFIG [--recipe NAME] [key=value ...]``"""
    parser = argparse.ArgumentParser(
        prog="medcap validate",
        description="Check a config as its recipe will read it: every key (unknown ones name the closest "
        "valid key), every value, every path the run would read. Nothing is loaded.",
    )
    parser.add_argument("config", help="config name (see `medcap ls`) or path")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, as given to `medcap run`")
    parser.add_argument("--recipe", choices=recipe_names(),
                        help="the recipe the config is for (needed for a config file medcap does not ship)")  # fmt: skip
    args = parser.parse_intermixed_args(argv)
    recipe = args.recipe or _recipe_for_validate(args.config)
    path = resolve_config(args.config)

    from medcap import config

    try:
        schema = config.schema_for(recipe)
        free_text = getattr(sys.modules[schema.__module__], "FREE_TEXT", ())
        _, cfg = config.parse_args(["--config", str(path), *args.overrides], free_text)
        config.validate(recipe, cfg)
    except (config.ConfigError, OSError) as e:
        msg = f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.filename else str(e)
        print(f"medcap validate: error: {msg}", file=sys.stderr)
        return 1
    print(f"medcap validate: {args.config} is a valid config for {recipe} (every key and path checked)")
    return 0


def _recipe_for_validate(spec: str) -> str:
    """The recipe of a registered config name, or of a copy that kept its file name
    (``medcap cp tiny/generate .`` gives ``generate.yaml``) when that name is unambiguous."""
    recipe = recipe_of_config(spec)
    if recipe is None and Path(spec).suffix in CONFIG_SUFFIXES:
        stem = Path(spec).stem
        owners = {r for r, rec in RECIPES.items() for c in rec.configs if c.rsplit("/", 1)[-1] == stem}
        recipe = owners.pop() if len(owners) == 1 else None
    if recipe is None:
        raise CLIError(f"which recipe is {spec!r} for? add --recipe NAME (one of {recipe_names()})")
    return recipe
