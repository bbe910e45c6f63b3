"""``medcap caption`` and ``medcap chat``: a trained model on your own images, in one line.

    medcap caption scans/ extra/*.dcm --checkpoint RUN/checkpoint/meta_model_last.safetensors \\
        [--question "Is there a fracture?"] [--llm LLAMA_DIR] [--out results.jsonl|.csv]
    medcap chat scan.png --checkpoint RUN/checkpoint/meta_model_last.safetensors

In order: the command line (image files, folders, globs; ``key=value`` config overrides);
which model (``resolve_model_config``: what the checkpoint records, or a generation config and
the LLM folder; every path checked); ``Captioner`` (the model, loaded once); ``caption``
(images in batches -> rows); ``chat`` (turns about one image); the entry points (one-line
errors). Generation is greedy unless ``--temperature`` is given. Nothing heavy (torch) is
imported before the command line has been read and every path checked.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

log = logging.getLogger("medcap.caption")

LLM_ENV = "MEDCAP_LLM"
DEBUG_ENV = "MEDCAP_DEBUG"
DEFAULT_CONFIG = "custom_generation_config"
# Raster formats PIL reads, and DICOM (medcap.data's DICOM_SUFFIXES).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".dcm", ".dicom")
_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")
_QUIT = {"q", "quit", "exit"}


class UserError(Exception):
    """A problem with the command line or its files: one line, no traceback."""


# ---- command line


def _parser(chat: bool) -> argparse.ArgumentParser:
    from medcap._cmdline import accept_snake_case

    if chat:
        p = argparse.ArgumentParser(
            prog="medcap chat",
            description="Talk about one image with a trained model: the image goes into the first "
            "question, the conversation is kept; `q` or end of input quits.",
        )
        p.add_argument("image", nargs="+", metavar="IMAGE",
                       help="an image file (PNG, JPEG, DICOM, ...); key=value arguments override the config")
    else:
        p = argparse.ArgumentParser(
            prog="medcap caption",
            description="Caption images (or answer one question about each) with a trained model, "
            "loaded once for all of them.",
        )
        p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER",
                       help="image files, folders (searched recursively) or globs ('scans/**/*.dcm'); "
                       "key=value arguments override the config (demo_dir=...)")
        p.add_argument("--question", "-q", default=None,
                       help="ask this about every image instead of captioning (taken as typed)")
        p.add_argument("--out", default=None, help="also write the results to this .jsonl or .csv file")
        p.add_argument("--batch-size", type=int, default=None,
                       help="images generated together (default: the config's batch_size)")
    p.add_argument("--checkpoint", default=None,
                   help="the trained vision tower + projector (medcap's .safetensors, a folder `medcap export` "
                   "wrote, or the reference's .pt); default: the config's vision_checkpoint")
    p.add_argument("--llm", default=None,
                   help=f"the Hugging Face Llama folder; default: the checkpoint's metadata, then ${LLM_ENV}")
    p.add_argument("--config", default=None,
                   help="generation config (name or path) describing the model; default: the model the checkpoint "
                   f"records (a reference .pt records none: pass --config {DEFAULT_CONFIG} for Llama-3.1-8B)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the config's max_new_tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature)")
    p.add_argument("--device", default=None, help="default: the config's (cuda falls back to the CPU)")
    p.add_argument("--dtype", default=None, choices=("bf16", "fp16", "fp32"), help="default: the config's")
    return accept_snake_case(p)


def split_overrides(args: Sequence[str]) -> Tuple[List[str], List[str]]:
    """``key=value`` arguments (not naming an existing file) are config overrides."""
    paths, overrides = [], []
    for a in args:
        (overrides if _OVERRIDE.match(a) and not os.path.exists(a) else paths).append(a)
    return paths, overrides


def expand_images(specs: Sequence[str]) -> List[str]:
    """Files as given, folders searched recursively for images, globs expanded; in the
    order given (sorted within a folder or glob), each file once."""
    out: List[str] = []
    for spec in specs:
        if os.path.isdir(spec):
            found = sorted(str(p) for p in Path(spec).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UserError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in the folder {spec!r}")
        elif os.path.isfile(spec):
            found = [spec]
        elif glob.has_magic(spec):
            found = sorted(f for f in glob.glob(spec, recursive=True) if os.path.isfile(f))
            if not found:
                raise UserError(f"no file matches {spec!r}")
        else:
            raise UserError(f"image not found: {spec!r}")
        out.extend(f for f in found if f not in out)
    return out


# ---- which model
#
# A checkpoint medcap trained (or a folder `medcap export` wrote) records its model: without
# ``--config`` the model, LLM folder, tokenizer and dtype come from it (``checkpoint/generate``
# holds the generation keys), ``--llm`` (else ``$MEDCAP_LLM`` when the recorded folder is gone)
# points at a moved LLM, and ``key=value`` overrides win key by key. A checkpoint that records
# nothing (the reference's .pt) needs ``--config``, which then describes the model (its ``model``,
# ``tokenizer``, ``checkpointer``, ``device``, ``dtype`` and ``max_new_tokens``). With a config, the
# LLM folder is, in order: ``--llm``; the folder the checkpoint's metadata records (``llm_dir``,
# when it still exists); ``$MEDCAP_LLM``; the config's ``checkpointer.checkpoint_dir``. A folder
# found any way but the last is read as a Hugging Face Llama folder: every ``*.safetensors`` in
# it, the tokenizer at ``original/tokenizer.model``.


def checkpoint_llm_dir(path: str) -> Optional[str]:
    """The LLM folder a medcap vision checkpoint records (``llm_dir``)."""
    from medcap.config._from_checkpoint import checkpoint_llm_dir as recorded

    return recorded(path)


def _llm_dir(args, cfg, env: Dict[str, str]) -> Tuple[Optional[str], str]:
    """(folder, where it came from); folder None means: keep the config's."""
    if args.llm:
        return args.llm, "--llm"
    recorded = checkpoint_llm_dir(cfg.vision_checkpoint)
    if recorded and os.path.isdir(recorded):
        return recorded, "the vision checkpoint's metadata"
    if recorded:
        log.info("the vision checkpoint names the LLM folder %s, which is not there (moved?)", recorded)
    if env.get(LLM_ENV):
        return env[LLM_ENV], f"${LLM_ENV}"
    return None, "the config"


def _config_name(args, overrides: Sequence[str]) -> Tuple[str, bool]:
    """(the config to read, whether the checkpoint describes the model instead of a config)."""
    from medcap._registry import CHECKPOINT_CONFIG
    from medcap.config import ConfigError
    from medcap.config._from_checkpoint import NO_DESCRIPTION, describes_model, read_metadata

    if args.config:
        return args.config, False
    ckpt = args.checkpoint or next((o.split("=", 1)[1] for o in overrides if o.startswith("vision_checkpoint=")), None)
    if not ckpt:
        raise UserError("give --checkpoint VISION_CKPT (the trained vision tower + projector, or a folder "
                        "`medcap export` wrote)")
    if not os.path.exists(ckpt):
        raise UserError(f"vision checkpoint not found: {ckpt!r}")
    try:
        described = describes_model(read_metadata(ckpt))
    except ConfigError as e:  # a damaged file or an incomplete export folder, named
        raise UserError(str(e)) from None
    if described:
        return CHECKPOINT_CONFIG, True
    what = "a reference .pt records nothing" if not ckpt.endswith(".safetensors") else \
        "written before checkpoints described their model"
    raise UserError(NO_DESCRIPTION.format(path=ckpt, why=what))


def _fill_from_checkpoint(cfg, args, env: Dict[str, str]) -> None:
    """The model sections the config leaves out, from the checkpoint; ``--llm`` (or
    ``$MEDCAP_LLM`` when the recorded LLM folder is gone) points at the LLM folder."""
    from omegaconf import OmegaConf

    from medcap.config import ConfigError
    from medcap.config._from_checkpoint import SECTIONS, fill_sections

    given = {k: OmegaConf.to_container(cfg[k]) if OmegaConf.is_config(cfg.get(k)) else cfg.get(k) for k in SECTIONS}
    if args.llm:
        given["checkpointer"] = {**(given["checkpointer"] or {}), "checkpoint_dir": args.llm}
    try:
        filled = fill_sections(given, cfg.vision_checkpoint)
    except ConfigError as e:
        if args.llm or not env.get(LLM_ENV) or "LLM folder" not in str(e):
            raise UserError(str(e)) from None
        given["checkpointer"] = {**(given["checkpointer"] or {}), "checkpoint_dir": env[LLM_ENV]}
        try:
            filled = fill_sections(given, cfg.vision_checkpoint)
        except ConfigError as again:
            raise UserError(f"{again} (${LLM_ENV}={env[LLM_ENV]})") from None
    for key in SECTIONS:
        cfg[key] = filled[key]
    log.info("model %s, LLM folder %s (from the checkpoint%s)", filled["model"]["_component_"],
             filled["checkpointer"]["checkpoint_dir"], ", --llm" if args.llm else "")


def resolve_model_config(args, overrides: Sequence[str], env: Optional[Dict[str, str]] = None):
    """The config describing the model to load, every path it names checked (nothing loaded)."""
    from omegaconf import OmegaConf

    from medcap._cmdline import CLIError
    from medcap._registry import resolve_config

    env = dict(os.environ if env is None else env)
    name, from_checkpoint = _config_name(args, overrides)
    try:
        path = resolve_config(name)
    except CLIError as e:
        raise UserError(str(e)) from None
    try:
        cfg = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides)))
    except Exception as e:
        raise UserError(f"cannot read the config {str(path)!r} with {list(overrides)}: {e}") from None
    if args.checkpoint:
        cfg.vision_checkpoint = args.checkpoint
    if not cfg.get("vision_checkpoint"):
        raise UserError("give --checkpoint VISION_CKPT (the trained vision tower + projector)")
    for key, value in (("device", args.device), ("dtype", args.dtype), ("max_new_tokens", args.max_new_tokens)):
        if value is not None:
            cfg[key] = value
    OmegaConf.resolve(cfg)  # ${demo_dir}, ${vision}: before the paths are checked
    if not os.path.exists(cfg.vision_checkpoint):
        raise UserError(f"vision checkpoint not found: {cfg.vision_checkpoint!r}")
    if from_checkpoint:
        _fill_from_checkpoint(cfg, args, env)
    else:
        _llm_from_flags(cfg, args, env, path)
    _check_paths(cfg)
    return cfg


def _llm_from_flags(cfg, args, env: Dict[str, str], path) -> None:
    """With a config: the LLM folder from --llm, the checkpoint's llm_dir, $MEDCAP_LLM or the config."""
    for section in ("model", "tokenizer", "checkpointer"):
        if not cfg.get(section):
            raise UserError(f"the config {str(path)!r} has no {section} section: give a generation config")
    llm, source = _llm_dir(args, cfg, env)
    if llm is not None:
        if not os.path.isdir(llm):
            raise UserError(f"the LLM folder {llm!r} (from {source}) is not a folder")
        cfg.checkpointer.checkpoint_dir = llm
        cfg.checkpointer.checkpoint_files = None  # every *.safetensors shard
        cfg.tokenizer.path = os.path.join(llm, "original", "tokenizer.model")
        special = os.path.join(llm, "original", "special_tokens.json")
        if os.path.isfile(special):  # the demo's and the tests' small tokenizers remap their special ids
            cfg.tokenizer.special_tokens_path = special
    log.info("LLM folder %s (from %s)", cfg.checkpointer.checkpoint_dir, source)


def _check_paths(cfg) -> None:
    if not os.path.isdir(cfg.checkpointer.checkpoint_dir):
        raise UserError(f"the LLM folder {cfg.checkpointer.checkpoint_dir!r} is not a folder (give --llm LLAMA_DIR "
                        f"or set ${LLM_ENV})")
    for key in ("path", "special_tokens_path"):
        p = cfg.tokenizer.get(key)
        if p and not os.path.isfile(p):
            raise UserError(f"tokenizer file not found: {p!r} (tokenizer.{key})")


# ---- the model


class Captioner:
    """The model, loaded once, and what turns an image and a conversation into text."""

    def __init__(self, cfg, *, temperature: float = 0.0, top_k: Optional[int] = None, seed: int = 0, batch_size: int = 8):
        import torch
        from torchtune import config as tt_config

        from medcap.data import image_transform
        from medcap.generation import GenerationEngine
        from medcap.models import load_model

        device = str(cfg.get("device") or "cuda")
        if device.startswith("cuda") and not torch.cuda.is_available():
            log.warning("device=%s but no CUDA device is available: running on the CPU", device)
            device = "cpu"
        self.tokenizer = tt_config.instantiate(cfg.tokenizer)
        model = load_model(
            cfg.model, cfg.checkpointer, device=device, dtype=cfg.get("dtype") or "bf16",
            tokenizer=self.tokenizer, vision_checkpoint=cfg.vision_checkpoint,
        )
        self.engine = GenerationEngine(
            model, self.tokenizer, batch_size=batch_size, temperature=temperature, top_k=top_k, seed=seed
        )
        self.transform = image_transform(model.vision.visual.image_size)
        self.max_new_tokens = int(cfg.get("max_new_tokens") or 300)
        self.max_seq_len = int(model.decoder.max_seq_len)

    def image(self, path: str):
        from medcap.data import load_image

        return self.transform(load_image(path))  # [3, S, S]

    def budget(self, prompt: Sequence[int]) -> int:
        """New tokens that fit after ``prompt`` (at most ``max_new_tokens``)."""
        return min(self.max_new_tokens, self.max_seq_len - len(prompt))

    def answer(self, prompts, images, keys) -> List[str]:
        budgets = [self.budget(p) for p in prompts]
        return self.engine.generate_texts(prompts, images, budgets, keys)


def _loaded(cfg, args, **kw) -> Captioner:
    return Captioner(cfg, temperature=args.temperature, top_k=args.top_k, seed=args.seed, **kw)


# ---- caption


def _write_rows(path: str, rows: List[Dict[str, Any]]) -> None:
    from medcap._io import atomic_write

    columns = ["image", "question", "answer"]

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            if path.lower().endswith(".csv"):
                w = csv.DictWriter(f, fieldnames=columns)
                w.writeheader()
                w.writerows(rows)
            else:
                for r in rows:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")

    atomic_write(path, write)


def caption(cap: Captioner, images: Sequence[str], question: Optional[str], *, on_row=None) -> Tuple[List[Dict[str, Any]], List[str]]:
    """Rows ``{image, question, answer}`` for the readable images, and the failures."""
    from medcap._io import progress
    from medcap.data import BadSample

    rows: List[Dict[str, Any]] = []
    failed: List[str] = []
    prompt = cap.engine.prompt(question)  # the same for every image
    size = cap.engine.batch_size
    with progress(len(images), "caption", "images", every_s=30) as bar:
        for lo in range(0, len(images), size):
            batch, tensors = [], []
            for path in images[lo:lo + size]:
                try:
                    tensors.append(cap.image(path))
                    batch.append(path)
                except (BadSample, OSError, ValueError) as e:
                    failed.append(f"{path}: {getattr(e, 'reason', None) or e}")
                    print(f"medcap caption: skipped {path}: {getattr(e, 'reason', None) or e}", file=sys.stderr)
            if batch:
                texts = cap.answer([prompt] * len(batch), tensors, [f"caption:{p}" for p in batch])
                for path, text in zip(batch, texts):
                    row = {"image": path, "question": question, "answer": text}
                    rows.append(row)
                    if on_row:
                        on_row(row)
            bar.update(len(images[lo:lo + size]))
    return rows, failed


def _caption_main(argv: List[str]) -> int:
    args = _parser(chat=False).parse_intermixed_args(argv)
    specs, overrides = split_overrides(args.images)
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.out and not args.out.lower().endswith((".jsonl", ".csv")):
        raise UserError(f"--out {args.out!r}: give a .jsonl or .csv file")
    images = expand_images(specs)
    if not images:
        raise UserError("no images given")
    cfg = resolve_model_config(args, overrides)
    cap = _loaded(cfg, args, batch_size=args.batch_size or int(cfg.get("batch_size") or 8))
    rows, failed = caption(cap, images, args.question, on_row=lambda r: print(f"{r['image']}: {r['answer']}", flush=True))
    if args.out:
        _write_rows(args.out, rows)
        log.info("%d rows written to %s", len(rows), args.out)
    if failed:
        print(f"medcap caption: {len(failed)} of {len(images)} image(s) could not be read", file=sys.stderr)
        return 1
    return 0


# ---- chat


def chat(cap: Captioner, image_path: str, lines, write=print) -> List[Dict[str, str]]:
    """A conversation about one image: each line from ``lines`` is a user turn (the
    first carries the image), each reply is written as ``ASSISTANT: ...``. Ends at
    ``q``/``quit``/``exit``, at the end of ``lines``, or when the context is full."""
    from medcap.generation import clean_text, question_messages

    image = cap.image(image_path)
    messages: List[Dict[str, str]] = []
    for line in lines:
        text = line.strip()
        if text.lower() in _QUIT:
            break
        if not text:
            continue
        if messages:
            messages.append({"role": "user", "content": clean_text(text)})
        else:
            messages.extend(question_messages(text))  # the image, a blank line, the question
        prompt = cap.engine.prompt(messages)
        if cap.budget(prompt) < 1:
            write(f"(the conversation fills the model's {cap.max_seq_len} tokens: start a new one)")
            messages.pop()
            break
        reply = cap.answer([prompt], [image], [f"chat:{len(messages)}"])[0]
        messages.append({"role": "assistant", "content": clean_text(reply)})
        write(f"ASSISTANT: {reply}")
    return messages


def _user_lines(interactive: bool):
    while True:
        try:
            yield input("USER: ") if interactive else input()
        except EOFError:
            return


def _chat_main(argv: List[str]) -> int:
    args = _parser(chat=True).parse_intermixed_args(argv)
    paths, overrides = split_overrides(args.image)
    if len(paths) != 1:
        raise UserError(f"give one image to talk about, got {len(paths)}: {paths}")
    args.image = paths[0]
    if not os.path.isfile(args.image):
        raise UserError(f"image not found: {args.image!r}")
    cfg = resolve_model_config(args, overrides)
    cap = _loaded(cfg, args, batch_size=1)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"Ask about {args.image} (q to quit).", flush=True)
    chat(cap, args.image, _user_lines(interactive), write=lambda s: print(s, flush=True))
    return 0


# ---- entry points


def _run(prog: str, main, argv: List[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from medcap._io import quiet_library_noise

    quiet_library_noise()
    try:
        return main(list(argv))
    except UserError as e:
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return 2
    except (FileNotFoundError, PermissionError, ValueError) as e:
        # A wrong file or a model that does not fit its checkpoint: say it in one line.
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"{prog}: error: {e} (MEDCAP_DEBUG=1 shows the traceback)", file=sys.stderr, flush=True)
        return 2


def caption_main(argv: Sequence[str]) -> int:
    """``medcap caption ...``"""
    return _run("medcap caption", _caption_main, list(argv))


def chat_main(argv: Sequence[str]) -> int:
    """``medcap chat IMAGE ...``"""
    return _run("medcap chat", _chat_main, list(argv))
