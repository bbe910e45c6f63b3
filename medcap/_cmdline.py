"""Conventions every medcap command and tool shares, below every package so that the
packages' command-line entry points (``medcap serve``, ``medcap caption``, the demo, the
tools) need not import ``medcap.cli``.

    UserError, CLIError  what the user asked for is refused (their command line, config, data
                         or files): one line ``medcap CMD: error: ...``, exit status 2
    stopped              Ctrl-C: one line ``medcap CMD: stopped ...``, exit status 130
    accept_snake_case    ``--snake_case`` spellings of ``--kebab-case`` flags still accepted
    quiet_broken_pipe    a quiet exit when the reader of stdout goes away (``medcap ls | head``)

The command itself (``medcap``) is ``medcap.cli``; the registry of recipes and configs is
``medcap._registry``. The layering is drawn in ``docs/internals.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Optional


# ---- refusals and Ctrl-C

EXIT_USER_ERROR = 2  # what argparse uses for a bad command line
EXIT_STOPPED = 130  # 128 + SIGINT: what a shell reports for a command stopped by Ctrl-C


class UserError(Exception):
    """What the user asked for is refused: their command line, config, data or files.
    Every entry point reports it as one line, ``medcap CMD: error: MESSAGE``, with exit
    status 2; the message says what to change. A refusal raised deep in the library
    (``eval``'s results folder, ``config``'s checks) subclasses it, so that an entry
    point tells a user's mistake from medcap's own failure without catching ``ValueError``."""


class CLIError(UserError):
    """A problem with the command line, reported as one clear message."""


def stopped(prog: str, hint: str = "") -> int:
    """Ctrl-C: one line on stderr, ``PROG: stopped (Ctrl-C)`` and ``hint``; returns 130."""
    lead = "\n" if sys.stderr.isatty() else ""  # off the line the terminal echoed ^C on (or a prompt)
    print(f"{lead}{prog}: stopped (Ctrl-C){'; ' + hint if hint else ''}", file=sys.stderr, flush=True)
    return EXIT_STOPPED


# ---- flag spellings


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


# ---- a closed pipe


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
