"""The ``medcap`` command: the usage text, the table of subcommands, and ``main``.

    medcap run [--dry-run] [torchrun options] RECIPE --config CONFIG [key=value ...]
    medcap ls | cp | cat | validate ...        medcap validate-data | demo | rescore | report ...
    medcap caption | chat | serve | export ...

Each subcommand lives in the module that does its work, imported only when it runs
(``_COMMANDS``), so one command's imports (torch) never slow down another or its
``--help``: ``run`` in ``medcap._launch``, ``ls``/``cp``/``cat``/``validate`` in
``medcap._config_commands``, the others in their packages. Recipe and config names are
resolved by ``medcap._registry``; the conventions every command shares (``UserError`` and
``CLIError`` in one line with exit 2, Ctrl-C in one line with exit 130, ``--snake_case``
spellings, a quiet closed pipe) are in ``medcap._cmdline``. Nothing
below this module imports it; it re-exports the names scripts import from it.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from medcap._cmdline import EXIT_USER_ERROR, CLIError, UserError, accept_snake_case, quiet_broken_pipe, stopped
from medcap._launch import build_run_command, run
from medcap._registry import resolve_config, resolve_recipe

__all__ = [
    "CLIError",
    "accept_snake_case",
    "build_run_command",
    "main",
    "quiet_broken_pipe",
    "resolve_config",
    "resolve_recipe",
]

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
  caption IMAGE_OR_FOLDER... --checkpoint CKPT [--question "..."] [--llm DIR] [--out F.jsonl|.csv]
                 caption images (or answer a question about each) with a trained model
                 (medcap caption -h)
  chat IMAGE --checkpoint CKPT [--llm DIR]
                 talk about one image, several turns; q quits (medcap chat -h)
  serve (--checkpoint CKPT | --demo DIR | --config CONFIG [key=value ...]) [--host H] [--port P]
                 an OpenAI-compatible API and a web page for a trained model (medcap serve -h)
  export CHECKPOINT --out DIR [--include-llm] [--results RESULTS_DIR]
                 a Hugging Face model folder that transformers loads alone (medcap export -h)
"""


# ---- the subcommands


def _run(argv: List[str]) -> int:
    """``medcap run``: its help is the command's usage, the rest is ``medcap._launch``."""
    if not argv or argv[0] in ("-h", "--help"):
        print(_USAGE)
        return 0
    dry_run = argv[0] == "--dry-run"
    return run(argv[1:] if dry_run else argv, dry_run=dry_run)


# command -> a function of argv here, or (module, function) imported when the command runs
_COMMANDS: Dict[str, Union[Callable[[List[str]], int], Tuple[str, str]]] = {
    "run": _run,
    "ls": ("medcap._config_commands", "ls_main"),
    "cp": ("medcap._config_commands", "cp_main"),
    "cat": ("medcap._config_commands", "cat_main"),
    "validate": ("medcap._config_commands", "validate_main"),
    "validate-data": ("medcap.data", "validate_main"),
    "demo": ("medcap.demo", "main"),
    "rescore": ("medcap.eval", "rescore_main"),
    "report": ("medcap.eval", "report_main"),
    "caption": ("medcap._caption", "caption_main"),
    "chat": ("medcap._caption", "chat_main"),
    "serve": ("medcap.serve", "serve_main"),
    "export": ("medcap.export", "export_main"),
}


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


# ---- main


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
    except UserError as e:  # CLIError, and any refusal a subcommand left to this line
        if os.environ.get("MEDCAP_DEBUG"):  # the traceback, for a bug report
            raise
        print(f"medcap {command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return stopped(f"medcap {command}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``medcap`` console script; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    return quiet_broken_pipe(lambda: _main(args))


if __name__ == "__main__":
    sys.exit(main())
