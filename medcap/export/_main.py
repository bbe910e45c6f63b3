"""``medcap export CHECKPOINT --out DIR``: the command line of ``export_model``.

    medcap export RUN/checkpoint/meta_model_last.safetensors --out medcap-model [--include-llm]
        [--results RESULTS_DIR ...] [--llm LLAMA_DIR] [--base-llm HUB_NAME] [--force]
    medcap export reference.pt --out medcap-model --config custom_generation_config [key=value ...]

A checkpoint medcap trained records its model; a reference .pt needs ``--config`` (and its
overrides). Every problem is one line (``medcap export: error: ...``, exit status 2), found before
any file is written; the traceback with ``MEDCAP_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Sequence

DEBUG_ENV = "MEDCAP_DEBUG"


def _parser() -> argparse.ArgumentParser:
    from medcap._cmdline import accept_snake_case

    p = argparse.ArgumentParser(
        prog="medcap export",
        description="Write a trained model as a Hugging Face model folder: transformers loads it alone "
        "(AutoModelForCausalLM / AutoProcessor with trust_remote_code=True) and medcap reads it back "
        "(--checkpoint FOLDER).",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="the trained vision checkpoint (.safetensors medcap wrote, "
                   "or the reference's .pt with --config)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of --config's keys")
    p.add_argument("--out", required=True, help="the folder to write (must not exist or be empty, unless --force)")
    p.add_argument("--include-llm", action="store_true", help="copy the LLM's weight files in (hard links where "
                   "the file system allows): a self-contained folder; default: config.json points at the base LLM")
    p.add_argument("--results", nargs="+", default=None, metavar="RESULTS_DIR",
                   help="results folders whose `medcap report` table goes into the model card")
    p.add_argument("--config", default=None, help="a generation config naming the model, for a checkpoint that "
                   "records none (e.g. custom_generation_config for the reference's .pt)")
    p.add_argument("--llm", default=None, help="the LLM folder, when it is no longer where the checkpoint says")
    p.add_argument("--base-llm", default=None, help="what config.json names as the base LLM (e.g. the hub name "
                   "meta-llama/Llama-3.1-8B-Instruct before uploading); default: the local LLM folder")
    p.add_argument("--max-new-tokens", type=int, default=300, help="generation_config.json's max_new_tokens "
                   "(default 300)")
    p.add_argument("--force", action="store_true", help="replace a folder that is already there")
    return accept_snake_case(p)


def _main(argv: List[str]) -> int:
    from medcap.export._folder import export_model

    args = _parser().parse_intermixed_args(argv)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not os.path.exists(args.checkpoint):
        raise FileNotFoundError(f"checkpoint not found: {args.checkpoint!r}")
    if args.overrides and not args.config:
        raise ValueError(f"key=value overrides ({' '.join(args.overrides)}) need --config")
    for folder in args.results or []:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"--results {folder!r} is not a folder")
    out = export_model(args.checkpoint, args.out, include_llm=args.include_llm, results=args.results,
                       config=args.config, overrides=args.overrides, llm=args.llm, base_llm=args.base_llm,
                       max_new_tokens=args.max_new_tokens, force=args.force)
    print(f"medcap export: wrote {out} (load it with transformers: AutoModelForCausalLM.from_pretrained("
          f"{str(out)!r}, trust_remote_code=True); with medcap: --checkpoint {out})", flush=True)
    return 0


def export_main(argv: Sequence[str]) -> int:
    """``medcap export ...``"""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from medcap._io import quiet_library_noise
    from medcap.config import ConfigError

    quiet_library_noise()
    try:
        return _main(list(argv))
    except (ConfigError, FileNotFoundError, FileExistsError, PermissionError, ValueError, OSError) as e:
        if os.environ.get(DEBUG_ENV):
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"medcap export: error: {msg}", file=sys.stderr, flush=True)
        return 2
