"""``medcap demo``: the whole idea of medcap, end to end, offline, on a small world it makes itself.

Stages (a finished one is skipped; ``--force`` redoes everything):

=====================  =====================================================================
world                  images, captions, questions (train/test); some combinations kept out of train
tokenizer              byte-level BPE learnt on the demo's text, written in tiktoken format
lm                     text-only pretraining of a tiny Llama-3.1 LM, saved in HF format
train                  ``medcap run full_finetune_single_device --config demo/train``
eval_trained_captions  ``medcap run generate --config demo/generate test_metrics=True``
eval_trained_vqa       ``medcap run generate --config demo/generate test_omnimedvqa=True``
eval_control_captions  the same two with ``vision_checkpoint=null``: an untrained vision side
eval_control_vqa
report                 ``summary.json`` and ``report.png``: seen and unseen combinations apart
=====================  =====================================================================

Every stage's command line is stored in ``summary.json`` (append ``key=value`` to rerun).
Here: the command line (``build_parser``, ``settings_from_args``, ``main``). The settings
are in ``_settings``, the stages and their bookkeeping in ``_stages``, what the stages
make in ``_world``, ``_bpe``, ``_lm`` and ``_report``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from medcap.demo._settings import DEFAULT_OUT, STAGES, DemoSettings, parse_settings
from medcap.demo._stages import Demo, say


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medcap demo",
        description="Run medcap end to end, offline, on a synthetic medical-like world: make the images, "
        "a tokenizer and a text-only LM, train the vision side with the real training recipe, evaluate "
        "captions and OmniMedVQA-style questions with the real generation recipe (and an untrained "
        "control), and write summary.json and report.png.",
        epilog="Settings: key=value (e.g. lm_steps=600 n_train=4000), or STAGE.key=value to pass a config "
        "override to one recipe stage (e.g. train.optimizer.lr=3e-3).",
    )
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes: a smoke run of every stage in about a minute (it meets no target, and says why)")
    p.add_argument("--force", action="store_true", help="redo every stage, even those already done")
    p.add_argument("--stage", choices=STAGES, help="run only this stage (always redone)")
    p.add_argument("--from", dest="start", choices=STAGES, help="redo this stage and every later one")
    p.add_argument("--seed", type=int, help="seed of the world, the LM and the vision training "
                   "(default 0; the same as the setting seed=N, which it overrides)")
    p.add_argument("settings", nargs="*", metavar="key=value")
    return p


def settings_from_args(args: argparse.Namespace) -> Tuple[DemoSettings, Dict[str, List[str]]]:
    """The demo's settings and per-stage overrides from the parsed command line."""
    base = DemoSettings.quick() if args.quick else DemoSettings()
    settings, overrides = parse_settings(args.settings, base)
    if args.seed is not None:
        settings = replace(settings, seed=args.seed)
    return settings, overrides


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    settings, overrides = settings_from_args(args)
    demo = Demo(Path(args.out), settings, force=args.force, only=args.stage, quick=args.quick,
                start=args.start, overrides=overrides)
    try:
        demo.run()
    except KeyboardInterrupt:
        say("interrupted; run the same command again to continue")
        return 130
    except (RuntimeError, FileNotFoundError, ValueError) as e:
        say(f"error: {e}")
        if isinstance(e, FileNotFoundError) and args.stage:
            say(f"(--stage {args.stage} needs the earlier stages' files: run `medcap demo --out {args.out}` first)")
        return 1
    return 0
