"""The ``medcap`` command.

    medcap run [--dry-run] [torchrun options] RECIPE --config CONFIG [key=value ...]
    medcap ls
    medcap cp CONFIG_OR_RECIPE DEST [--force]
    medcap cat CONFIG
    medcap validate CONFIG [key=value ...]
    medcap validate-data ...
    medcap demo ...
    medcap rescore FILE...
    medcap report RESULTS_DIR...
    medcap serve --demo DIR | --config CONFIG [key=value ...]

Why not ``tune run``: it looks names up in torchtune's built-in recipes first
(``tune run full_finetune_distributed`` would silently run torchtune's
text-only recipe), imports recipe files as modules of a ``recipes`` package
that torchtune's own wheel shadows, and rejects absolute paths. ``medcap run``
resolves medcap's names (the table ``RECIPES``) to the files in medcap's
recipes folder and then runs the file by path. That folder is the top-level
``recipes/`` of a source checkout, or ``medcap/_recipes`` inside an installed
wheel (pyproject.toml maps it there: torchtune's wheel owns the top-level
name ``recipes``). Without torchrun options the recipe replaces the
launcher (``os.execv`` of the current Python), so the PID a scheduler knows is
the recipe's; with them it runs ``python -m torch.distributed.run`` as a child
that gets the launcher's SIGINT/SIGTERM/SIGHUP, dies with the launcher (Linux)
and whose exit status is the launcher's.

Flags are spelled ``--kebab-case``; the tools' older ``--snake_case`` spellings
are still accepted (``medcap._cmdline.accept_snake_case``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

# The conventions every command and tool shares; imported here too because the tools
# and older scripts import them from medcap.cli.
from medcap._cmdline import accept_snake_case, quiet_broken_pipe  # noqa: F401

RECIPES_ENV = "MEDCAP_RECIPES_DIR"
_CONFIG_SUFFIXES = (".yaml", ".yml")
# torchrun options that would make torchrun treat our recipe path as something else.
_REFUSED_TORCHRUN = {"module": "-m/--module", "no_python": "--no-python", "run_path": "--run-path"}

_USAGE = """\
usage: medcap <command> [...]

commands:
  run [--dry-run] [torchrun options] RECIPE --config CONFIG [key=value ...]
                 run a recipe; RECIPE is a medcap recipe name or a .py path, CONFIG a
                 medcap config name (see `medcap ls`) or a YAML path; torchrun options
                 (--nproc-per-node, --nnodes, --rdzv-*, --master-addr, --standalone, ...)
                 launch it with torch.distributed.run
  ls             list medcap's recipes and their configs
  cp NAME DEST [--force]
                 copy a config (or a recipe) out for editing
  cat CONFIG     print a config with its comments
  validate CONFIG [--recipe NAME] [key=value ...]
                 check every key and every path of a config (with overrides), loading
                 nothing (medcap validate -h)
  validate-data  check a sharegpt JSON dataset (medcap validate-data -h)
  demo           run the offline end-to-end demo (medcap demo -h)
  rescore FILE...
                 recompute every score of results files from their rows, no model
                 (medcap rescore -h)
  report RESULTS_DIR...
                 one table of every checkpoint's benchmark scores, as CSV, Markdown and PNG
                 (medcap report -h)
  caption IMAGE_OR_FOLDER... --checkpoint VISION_CKPT [--question "..."] [--llm DIR] [--out F.jsonl|.csv]
                 caption images (or answer a question about each) with a trained model
                 (medcap caption -h)
  chat IMAGE --checkpoint VISION_CKPT [--llm DIR]
                 talk about one image, several turns; q quits (medcap chat -h)
  serve (--demo DIR | --config CONFIG [key=value ...]) [--host H] [--port P]
                 an OpenAI-compatible API and a web page for a trained model (medcap serve -h)
"""


class CLIError(Exception):
    """A problem with the command line, reported as one clear message."""


# ---------------------------------------------------------------------------------------
# the registry: medcap's recipes and the configs written for each


@dataclass(frozen=True)
class Recipe:
    """A recipe file (relative to the recipes folder) and its configs (names under
    ``configs/``, without ``.yaml``), the first being the one to try first."""

    file: str
    configs: Tuple[str, ...]


# What `run`, `ls`, `cp`, `cat` and `validate` go by; tests/test_cli.py checks that it names
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
    "generate": Recipe("generate.py", ("tiny/generate", "custom_generation_config", "demo/generate")),
}


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
        if p.is_file() and p.suffix in _CONFIG_SUFFIXES
    )


def recipe_of_config(name: str) -> Optional[str]:
    """The recipe a registered config name belongs to (None for an unregistered one)."""
    name = _strip_suffix(name)
    return next((r for r, rec in RECIPES.items() if name in rec.configs), None)


def _strip_suffix(name: str) -> str:
    for suffix in _CONFIG_SUFFIXES:
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
    for suffix in _CONFIG_SUFFIXES:
        cand = cdir / f"{name}{suffix}"
        if cand.is_file() and not Path(spec).is_absolute():
            return cand.resolve()
    raise CLIError(
        f"config {spec!r} is neither a file (looked at {str(path.absolute())!r}) nor one of "
        f"medcap's configs: {config_names()}"
    )


# ---------------------------------------------------------------------------------------
# medcap run


def _split_torchrun(argv: List[str]) -> Tuple[List[str], str, List[str]]:
    """``[torchrun opts] RECIPE rest...`` -> (opts, RECIPE, rest), using torchrun's own parser
    so that every option it knows (and whether it takes a value) is understood."""
    if not argv[0].startswith("-"):
        return [], argv[0], argv[1:]
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    parser.prog = "medcap run [torchrun options]"
    ns = parser.parse_args(argv)
    for dest, flag in _REFUSED_TORCHRUN.items():
        if getattr(ns, dest, False):
            raise CLIError(f"medcap run hands torchrun the recipe's path itself; leave out {flag}")
    # training_script_args is everything after the recipe, so the recipe's index is fixed.
    k = len(argv) - len(ns.training_script_args) - 1
    if argv[k] != ns.training_script:
        raise CLIError(f"could not find the recipe among the torchrun options {argv!r}")
    return argv[:k], argv[k], argv[k + 1:]


def build_run_command(argv: Sequence[str]) -> List[str]:
    """The command ``medcap run ARGV`` executes (without running it)."""
    argv = list(argv)
    if not argv:
        raise CLIError("medcap run needs a RECIPE and --config CONFIG (see `medcap ls`)")
    opts, recipe_spec, rest = _split_torchrun(argv)
    recipe = resolve_recipe(recipe_spec)

    config: Optional[str] = None
    overrides: List[str] = []
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg == "--config":
            if i + 1 >= len(rest):
                raise CLIError("--config needs a value")
            config = rest[i + 1]
            i += 2
            continue
        if arg.startswith("--config="):
            config = arg[len("--config="):]
        else:
            overrides.append(arg)
        i += 1
    if config is None:
        raise CLIError(f"--config CONFIG is required after the recipe; medcap's configs are {config_names()}")
    cmd = [str(recipe), "--config", str(resolve_config(config)), *overrides]
    if opts:
        return [sys.executable, "-m", "torch.distributed.run", *opts, *cmd]
    return [sys.executable, *cmd]


def _run(argv: List[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(_USAGE)
        return 0
    dry_run = argv[0] == "--dry-run"
    cmd = build_run_command(argv[1:] if dry_run else argv)
    _check_keys(cmd)
    print(f"medcap run: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    if dry_run:
        return 0
    if cmd[1:3] != ["-m", "torch.distributed.run"]:
        _become(cmd)
    return _supervise(cmd)


def _check_keys(cmd: List[str]) -> None:
    """Read the config as the recipe will (keys, values, bounds), before torch is
    imported or torchrun starts anything: a typo costs a fraction of a second. The
    recipe checks again, with the paths and components, when it starts."""
    from medcap.config import SCHEMAS, ConfigError, from_config, parse_args, plain, schema_for

    i = next(k for k, c in enumerate(cmd) if c == "--config") - 1
    recipe = Path(cmd[i])
    # medcap's own recipes only: a recipe of the user's own (or a test's stand-in) checks itself.
    if os.environ.get(RECIPES_ENV) or recipe.stem not in SCHEMAS or recipe.resolve().parent != recipes_dir().resolve():
        return
    name = recipe.stem
    cls = schema_for(name)
    free_text = getattr(sys.modules[cls.__module__], "FREE_TEXT", ())
    try:
        _, cfg = parse_args(cmd[i + 1 :], free_text)
        data, variables = plain(cfg)
        from_config(cls, data, variables=variables)
    except ConfigError as e:
        if os.environ.get("MEDCAP_DEBUG"):  # the traceback, as the recipe would show it
            raise
        raise CLIError(str(e)) from None


def _become(cmd: List[str]) -> None:
    """Replace this process by the recipe: the PID a scheduler or a shell knows is the
    recipe's, so its signals (and ``kill``) reach the recipe itself and nothing is orphaned."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(cmd[0], cmd)
    except OSError as e:
        raise CLIError(f"could not start {cmd[0]!r}: {e}") from e


# Signals a user, a terminal or a scheduler sends to stop a job.
_FORWARDED = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))
_PR_SET_PDEATHSIG = 1


def _die_with_parent():
    """A ``preexec_fn`` asking Linux to send the child SIGTERM when this launcher dies, even by
    SIGKILL (SIGTERM, not SIGKILL, so that torchrun still stops its workers). None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the launcher died before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def _terminal_sent_it_too() -> bool:
    """Whether a Ctrl-C reached the child already: the terminal sends SIGINT to its whole
    foreground process group, which the child shares with this launcher."""
    for fd in (0, 1, 2):
        try:
            if os.isatty(fd):
                return os.tcgetpgrp(fd) == os.getpgrp()
        except OSError:
            continue
    return False


def _supervise(cmd: List[str]) -> int:
    """Run torchrun as a child that receives the launcher's stop signals and dies with it;
    returns its exit status (128 + N when signal N killed it, as shells report)."""
    proc = subprocess.Popen(cmd, preexec_fn=_die_with_parent())

    def forward(signum, _frame) -> None:
        if signum == signal.SIGINT and _terminal_sent_it_too():
            return  # a second SIGINT would cut short torchrun's own shutdown of its workers
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in _FORWARDED}
    try:
        rc = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 128 - rc if rc < 0 else rc


# ---------------------------------------------------------------------------------------
# medcap ls / cp


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


def _ls(argv: List[str]) -> int:
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


def _cp(argv: List[str]) -> int:
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


def _cat(argv: List[str]) -> int:
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


def _validate(argv: List[str]) -> int:
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
    if recipe is None and Path(spec).suffix in _CONFIG_SUFFIXES:
        stem = Path(spec).stem
        owners = {r for r, rec in RECIPES.items() for c in rec.configs if c.rsplit("/", 1)[-1] == stem}
        recipe = owners.pop() if len(owners) == 1 else None
    if recipe is None:
        raise CLIError(f"which recipe is {spec!r} for? add --recipe NAME (one of {recipe_names()})")
    return recipe


# ---------------------------------------------------------------------------------------
# the dispatcher


def _dispatch(command: str, module: str, func: str, argv: List[str]) -> int:
    """``module.func(argv)``, imported only now, so that one command's imports (torch)
    never slow down another command or its ``--help``."""
    try:
        fn = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as e:
        print(
            f"medcap {command}: not available in this install ({module}.{func} could not be "
            f"loaded: {type(e).__name__}: {e})",
            file=sys.stderr,
        )
        return 1
    rc = fn(argv)
    return int(rc or 0)


# command -> a function of argv here, or (module, function) imported when the command runs
_COMMANDS: Dict[str, Union[Callable[[List[str]], int], Tuple[str, str]]] = {
    "run": _run,
    "ls": _ls,
    "cp": _cp,
    "cat": _cat,
    "validate": _validate,
    "validate-data": ("medcap.data", "validate_main"),
    "demo": ("medcap.demo", "main"),
    "rescore": ("medcap.eval._rescore", "rescore_main"),
    "report": ("medcap.eval._report", "report_main"),
    "caption": ("medcap._caption", "caption_main"),
    "chat": ("medcap._caption", "chat_main"),
    "serve": ("medcap.serve", "serve_main"),
}


def _main(argv: List[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_USAGE)
        return 0 if argv else 2
    if argv[0] == "--version":
        from importlib.metadata import version

        print(f"medcap {version('medcap')}")
        return 0
    command, rest = argv[0], argv[1:]
    target = _COMMANDS.get(command)
    if target is None:
        print(f"medcap: unknown command {command!r}\n\n{_USAGE}", file=sys.stderr)
        return 2
    try:
        if isinstance(target, tuple):
            return _dispatch(command, *target, rest)
        return target(rest)
    except CLIError as e:
        print(f"medcap {command}: error: {e}", file=sys.stderr)
        return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``medcap`` console script; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    return quiet_broken_pipe(lambda: _main(args))


if __name__ == "__main__":
    sys.exit(main())
