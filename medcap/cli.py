"""The ``medcap`` command.

    medcap run [--dry-run] [torchrun options] RECIPE --config CONFIG [key=value ...]
    medcap ls
    medcap cp CONFIG_OR_RECIPE DEST [--force]
    medcap validate-data ...
    medcap demo ...
    medcap rescore FILE...

Why not ``tune run``: it looks names up in torchtune's built-in recipes first
(``tune run full_finetune_distributed`` would silently run torchtune's
text-only recipe), imports recipe files as modules of a ``recipes`` package
that torchtune's own wheel shadows, and rejects absolute paths. ``medcap run``
resolves medcap's names to the files in the top-level ``recipes/`` folder and
then runs the file by path. Without torchrun options the recipe replaces the
launcher (``os.execv`` of the current Python), so the PID a scheduler knows is
the recipe's; with them it runs ``python -m torch.distributed.run`` as a child
that gets the launcher's SIGINT/SIGTERM/SIGHUP, dies with the launcher (Linux)
and whose exit status is the launcher's.

Flags are spelled ``--kebab-case``; the tools' older ``--snake_case`` spellings
are still accepted (``accept_snake_case``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

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
  validate-data  check a sharegpt JSON dataset (medcap validate-data -h)
  demo           run the offline end-to-end demo (medcap demo -h)
  rescore FILE...
                 recompute every score of results files from their rows, no model
                 (medcap rescore -h)
"""


class CLIError(Exception):
    """A problem with the command line, reported as one clear message."""


# ---------------------------------------------------------------------------------------
# where recipes and configs live


def recipes_dir() -> Path:
    """The top-level ``recipes/`` folder next to the ``medcap`` package (an editable
    install or a source checkout), or the folder named by ``$MEDCAP_RECIPES_DIR``."""
    env = os.environ.get(RECIPES_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise CLIError(f"${RECIPES_ENV}={env!r} is not a folder")
        return path.resolve()
    import medcap

    path = Path(medcap.__file__).resolve().parents[1] / "recipes"
    if not path.is_dir():
        raise CLIError(
            f"medcap's recipes/ folder was not found at {str(path)!r}. The recipes live in the "
            "source checkout: install it with `pip install -e .` from the repository root, or set "
            f"${RECIPES_ENV} to the recipes folder."
        )
    return path


def configs_dir() -> Path:
    return recipes_dir() / "configs"


def recipe_names() -> List[str]:
    """Every ``*.py`` at the top of ``recipes/``, except private and package files."""
    return sorted(p.stem for p in recipes_dir().glob("*.py") if not p.name.startswith("_"))


def config_names() -> List[str]:
    """Config names: paths under ``recipes/configs`` without the ``.yaml`` suffix."""
    cdir = configs_dir()
    if not cdir.is_dir():
        return []
    return sorted(
        p.relative_to(cdir).with_suffix("").as_posix()
        for p in cdir.rglob("*")
        if p.is_file() and p.suffix in _CONFIG_SUFFIXES
    )


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
        return recipes_dir() / f"{spec}.py"
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
    name = spec
    for suffix in _CONFIG_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
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
    print(f"medcap run: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    if dry_run:
        return 0
    if cmd[1:3] != ["-m", "torch.distributed.run"]:
        _become(cmd)
    return _supervise(cmd)


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


def _config_recipe(config_path: Path, names: Sequence[str]) -> Optional[str]:
    """The recipe a config names first in its comments (configs say how to run them)."""
    best: Optional[Tuple[int, str]] = None
    comments = "\n".join(
        line for line in config_path.read_text(errors="replace").splitlines() if line.lstrip().startswith("#")
    )
    for name in names:
        m = re.search(rf"(?<![\w/.-]){re.escape(name)}(?![\w-])", comments) or re.search(
            rf"recipes/{re.escape(name)}\.py", comments
        )
        if m and (best is None or m.start() < best[0]):
            best = (m.start(), name)
    return best[1] if best else None


def recipe_table() -> Dict[str, List[str]]:
    """``{recipe name: [config names]}``; configs naming no recipe go under ``""``."""
    names = recipe_names()
    table: Dict[str, List[str]] = {n: [] for n in names}
    cdir = configs_dir()
    for cfg in config_names():
        path = next(cdir / f"{cfg}{s}" for s in _CONFIG_SUFFIXES if (cdir / f"{cfg}{s}").is_file())
        table.setdefault(_config_recipe(path, names) or "", []).append(cfg)
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

    src = recipes_dir() / f"{args.name}.py" if args.name in recipe_names() else resolve_config(args.name)
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


# ---------------------------------------------------------------------------------------
# conventions shared by the medcap command and the tools


def accept_snake_case(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Also accept ``--snake_case`` for every ``--kebab-case`` option of ``parser``, so
    scripts written for the older spellings keep working. The old spellings are rewritten
    before parsing rather than registered as options: help stays kebab-case only, and
    abbreviations (``--input`` for ``--input-dir``) do not become ambiguous."""
    aliases = {
        "--" + flag[2:].replace("-", "_"): flag
        for action in parser._actions
        for flag in action.option_strings
        if flag.startswith("--") and "-" in flag[2:]
    }
    parse_known = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        return parse_known(_kebab_args(args, aliases), namespace)

    parser.parse_known_args = parse_known_args  # parse_args goes through it too
    return parser


def _kebab_args(args: List[str], aliases: Dict[str, str]) -> List[str]:
    out: List[str] = []
    for i, arg in enumerate(args):
        if arg == "--":  # everything after it is positional
            return out + args[i:]
        flag, eq, value = arg.partition("=")
        out.append(aliases[flag] + eq + value if flag in aliases else arg)
    return out


def quiet_broken_pipe(fn: Callable[[], Optional[int]]) -> int:
    """``fn()``'s exit status; when the reader of stdout went away (``medcap ls | head``),
    exit quietly with 141 (128 + SIGPIPE, what a Unix tool reports) instead of a traceback."""
    try:
        try:
            rc = fn()
        finally:  # also after argparse's SystemExit: the buffered lines can meet the closed pipe too
            sys.stdout.flush()
        return int(rc or 0)
    except BrokenPipeError:
        # Python flushes stdout again at exit; point it at /dev/null so that flush is silent.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is not a file (captured): nothing flushes it at exit
            pass
        return 141


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
    "validate-data": ("medcap.data", "validate_main"),
    "demo": ("medcap.demo", "main"),
    "rescore": ("medcap.eval._rescore", "rescore_main"),
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
