"""``medcap run``: a recipe started by its path, alone or under torchrun.

    run                 the command built, its config checked, the line printed, then started
    build_run_command   RECIPE --config CONFIG [key=value ...] -> the command line, names
                        resolved to medcap's own files (``medcap._registry``)
    check_keys          the config read as the recipe will, before anything starts
    become              no torchrun options: the recipe replaces this process (``os.execv``)
    supervise           torchrun options: ``python -m torch.distributed.run`` as a child that
                        gets the launcher's stop signals and dies with it

Why not ``tune run``: it looks names up in torchtune's built-in recipes first, imports
recipe files as modules of a ``recipes`` package that torchtune's own wheel shadows,
and rejects absolute paths. The longer story is in ``docs/internals.md``.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from medcap._cmdline import CLIError
from medcap._registry import CHECKPOINT_CONFIG, RECIPES_ENV, config_names, recipes_dir, resolve_config, resolve_recipe

# torchrun options that would make torchrun treat our recipe path as something else.
_REFUSED_TORCHRUN = {"module": "-m/--module", "no_python": "--no-python", "run_path": "--run-path"}


# ---- a run


def run(argv: List[str], *, dry_run: bool = False) -> int:
    """``medcap run [--dry-run] ARGV``; returns the exit status (a plain run never returns:
    the recipe replaces this process)."""
    cmd = build_run_command(argv)
    check_keys(cmd)
    print(f"medcap run: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    if dry_run:
        return 0
    if cmd[1:3] != ["-m", "torch.distributed.run"]:
        become(cmd)
    return supervise(cmd)


# ---- the command line


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
    if config is None and recipe.stem == "generate" and any(o.startswith("vision_checkpoint=") for o in overrides):
        config = CHECKPOINT_CONFIG  # the model, LLM, tokenizer and dtype the checkpoint records
    if config is None:
        raise CLIError(f"--config CONFIG is required after the recipe (generate: or vision_checkpoint=CKPT, a "
                       f"checkpoint that records its model); medcap's configs are {config_names()}")
    cmd = [str(recipe), "--config", str(resolve_config(config)), *overrides]
    if opts:
        return [sys.executable, "-m", "torch.distributed.run", *opts, *cmd]
    return [sys.executable, *cmd]


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


# ---- the config, checked before anything starts


def check_keys(cmd: List[str]) -> None:
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


# ---- alone: the recipe replaces this process


def become(cmd: List[str]) -> None:
    """Replace this process by the recipe: the PID a scheduler or a shell knows is the
    recipe's, so its signals (and ``kill``) reach the recipe itself and nothing is orphaned."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(cmd[0], cmd)
    except OSError as e:
        raise CLIError(f"could not start {cmd[0]!r}: {e}") from e


# ---- under torchrun: a supervised child

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


def supervise(cmd: List[str]) -> int:
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
