"""The offline end-to-end demo: a synthetic medical-like world, a small tokenizer and a
text-only LM made on the spot, then medcap's own training and generation recipes.

    medcap demo --out datasets/demo          # or: make demo

See :mod:`medcap.demo._main` for the stages and their commands. Only ``main`` is
public; the stages live in private modules (``_world``, ``_bpe``, ``_lm``,
``_report``), imported when a stage runs, so ``medcap demo -h`` loads no torch.
"""

from __future__ import annotations

from typing import Optional, Sequence

__all__ = ["main"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``medcap demo ARGV``; returns the exit status."""
    from medcap.demo._main import main as run

    return run(argv)
