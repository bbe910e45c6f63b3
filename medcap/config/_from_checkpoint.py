"""The model a vision checkpoint describes, read without torch, and a generation config's
``model``, ``tokenizer``, ``checkpointer`` and ``dtype`` filled from it.

    read_metadata        a .safetensors checkpoint's metadata (its header, no tensor read), or an
                         exported folder's (config.json + vision.safetensors); {} for a reference .pt
    describes_model      whether that metadata names the model (written by medcap's training since v2)
    fill_sections        the sections a config leaves out (null, or without ``_component_``) taken from
                         the checkpoint: whatever the config or the command line gives wins, key by key
    checkpoint_llm_dir   the LLM folder a checkpoint names (kept for checkpoints that name only it)

Paths are found where the checkpoint recorded them (absolute), else relative to the checkpoint
(a moved demo folder), else as given (relative to the working folder); a tokenizer that lay in
the LLM folder is looked for in the LLM folder that is used. What the description holds and who
writes it: ``medcap.training._describe``; the exported folder's layout: ``medcap.export``.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Dict, List, Optional

from medcap._io import EXPORT_CONFIG, EXPORT_SPECIAL_TOKENS, EXPORT_TOKENIZER, EXPORT_VISION, HEADER_KEY
from medcap.config._reader import ConfigError

SECTIONS = ("model", "tokenizer", "checkpointer", "dtype")
NO_DESCRIPTION = (
    "{path} does not record which model it belongs to ({why}): pass --config custom_generation_config "
    "(Llama-3.1-8B) or the generation config of the model it was trained with (e.g. --config demo/generate)"
)


# ---- Reading


def _header(path: Path) -> Dict[str, Any]:
    """The ``__metadata__`` of a safetensors file: 8 bytes of header length, then JSON."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                raise ValueError(f"a header of {n} bytes")
            header = json.loads(f.read(n))
        meta = header.get("__metadata__") or {}
        return json.loads(meta[HEADER_KEY]) if HEADER_KEY in meta else {}
    except (OSError, ValueError, struct.error, TypeError, AttributeError) as e:
        raise ConfigError(
            f"vision checkpoint {str(path)!r} is truncated or corrupt ({type(e).__name__}: {e})") from None


def _export_file(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise ConfigError(f"{path} is missing: {folder} is not a complete medcap export (run medcap export again)")
    return path


def read_metadata(path: Any) -> Dict[str, Any]:
    """What a checkpoint records about itself; an exported folder's adds ``export`` (its config.json)."""
    p = Path(str(path)).expanduser()
    if p.is_dir():
        config = _export_file(p, EXPORT_CONFIG)
        meta = _header(_export_file(p, EXPORT_VISION))
        try:
            meta["export"] = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{config} is truncated or corrupt ({type(e).__name__}: {e})") from None
        meta["export_dir"] = str(p.resolve())
        return meta
    if p.suffix.lower() == ".safetensors" and p.is_file():
        return _header(p)
    return {}


def describes_model(meta: Dict[str, Any]) -> bool:
    return isinstance(meta.get("model"), dict) and bool(meta["model"].get("_component_"))


def checkpoint_llm_dir(path: Any) -> Optional[str]:
    """The LLM folder a medcap checkpoint records (``llm_dir``), if any."""
    try:
        value = read_metadata(path).get("llm_dir")
    except ConfigError:
        return None  # a damaged file is reported when the weights are read
    return str(value) if value else None


# ---- Where the files are now


def _first_dir(candidates: List[Optional[str]]) -> Optional[str]:
    for c in candidates:
        if c and os.path.isdir(c):
            return str(c)
    return None


def _beside(checkpoint: Path, relative: Optional[str]) -> Optional[str]:
    return os.path.normpath(os.path.join(checkpoint.resolve().parent, relative)) if relative else None


def _llm_section(meta: Dict[str, Any], checkpoint: Path) -> Dict[str, Any]:
    llm, export = dict(meta.get("llm") or {}), meta.get("export") or {}
    files = llm.get("checkpoint_files")
    if export.get("llm_included"):
        where, files = meta["export_dir"], export.get("llm_files")
    else:
        base = export.get("base_llm")
        where = _first_dir([base if base and os.path.isabs(base) else None, llm.get("checkpoint_dir"),
                            _beside(checkpoint, llm.get("relative_to_checkpoint")), llm.get("checkpoint_dir_as_given")])
    if where is None:
        raise ConfigError(
            f"the LLM folder {llm.get('checkpoint_dir')!r} that {str(checkpoint)!r} names is not there: give "
            "checkpointer.checkpoint_dir=DIR (medcap caption, chat and medcap.load: --llm DIR / llm=DIR)"
        )
    return {"checkpoint_dir": where, "checkpoint_files": files, "model_type": llm.get("model_type") or "LLAMA3"}


def _tokenizer_file(meta: Dict[str, Any], key: str, checkpoint: Path, llm_dir: str) -> Optional[str]:
    tok = meta.get("tokenizer") or {}
    if not tok.get(key):
        return None
    if meta.get("export_dir"):
        return str(Path(meta["export_dir"]) / (EXPORT_TOKENIZER if key == "path" else EXPORT_SPECIAL_TOKENS))
    inside = tok.get(f"{key}_in_llm_dir")
    candidates = [os.path.join(llm_dir, inside) if inside else None, tok[key],
                  _beside(checkpoint, tok.get(f"{key}_relative_to_checkpoint")), tok.get(f"{key}_as_given")]
    found = [c for c in candidates if c and os.path.isfile(c)]
    return found[0] if found else str(candidates[0] or tok[key])  # a missing file is named by the config's check


def _tokenizer_section(meta: Dict[str, Any], checkpoint: Path, llm_dir: str) -> Dict[str, Any]:
    tok = meta.get("tokenizer") or {}
    out: Dict[str, Any] = {"_component_": tok.get("_component_") or "medcap.models.llama3_tokenizer",
                           "path": _tokenizer_file(meta, "path", checkpoint, llm_dir)}
    special = _tokenizer_file(meta, "special_tokens_path", checkpoint, llm_dir)
    if special:
        out["special_tokens_path"] = special
    out["max_seq_len"] = None
    return out


# ---- Filling a config


def _given(section: Any) -> Optional[Dict[str, Any]]:
    return dict(section) if isinstance(section, dict) else None


def fill_sections(given: Dict[str, Any], checkpoint: Any) -> Dict[str, Any]:
    """``given`` (``model``, ``tokenizer``, ``checkpointer``, ``dtype``: plain values, None where
    the config leaves them out) completed from ``checkpoint``'s description.

    A section with a ``_component_`` (or a ``checkpointer`` with a ``checkpoint_dir``) is the
    config's and stays as given; one without is laid over the checkpoint's, key by key.
    """
    out = {k: given.get(k) for k in SECTIONS}
    model, tok, ckptr = _given(out["model"]), _given(out["tokenizer"]), _given(out["checkpointer"])
    complete = (model and model.get("_component_") and tok and tok.get("_component_")
                and ckptr and ckptr.get("checkpoint_dir") and out["dtype"])
    if complete:
        return out
    if not checkpoint:
        raise ConfigError("the config names no model (model: null): give vision_checkpoint=CKPT, a checkpoint "
                          "that records its model, or a generation config (--config custom_generation_config)")
    path = Path(str(checkpoint)).expanduser()
    if not path.exists():
        raise ConfigError(f"vision_checkpoint={str(checkpoint)!r}: no such file or folder")
    meta = read_metadata(path)
    if not describes_model(meta):
        why = "a reference .pt records nothing" if path.suffix.lower() in (".pt", ".pth", ".bin") else \
            "written before checkpoints described their model"
        if model is None and tok is None and ckptr is None:
            raise ConfigError(NO_DESCRIPTION.format(path=str(checkpoint), why=why))
        raise ConfigError(NO_DESCRIPTION.format(path=str(checkpoint), why=why) + "; the config lacks "
                          + ", ".join(k for k in SECTIONS if not out[k]))
    if not (model and model.get("_component_")):
        out["model"] = {**meta["model"], **(model or {})}
    if not (ckptr and ckptr.get("checkpoint_dir")):
        out["checkpointer"] = {**_llm_section(meta, path), **(ckptr or {})}
    if not (tok and tok.get("_component_")):
        out["tokenizer"] = {**_tokenizer_section(meta, path, str(out["checkpointer"]["checkpoint_dir"])), **(tok or {})}
    out["dtype"] = out["dtype"] or meta.get("dtype") or "bf16"
    return out


def model_mismatch(model: Optional[Dict[str, Any]], checkpoint: Any) -> Optional[str]:
    """A line saying how a config's model differs from the one ``checkpoint`` describes, or None."""
    if not model or not checkpoint or not Path(str(checkpoint)).expanduser().exists():
        return None
    try:
        described = read_metadata(checkpoint).get("model") or {}
    except ConfigError:
        return None
    keys = ("_component_", "image_token_id", "num_image_tokens", "embed_dim", "vocab_size")
    differ = [k for k in keys if k in described and k in model and described[k] != model[k]]
    if not differ:
        return None
    return (f"the config's model ({', '.join(f'{k}={model[k]!r}' for k in differ)}) is not the one "
            f"{checkpoint} was trained with ({', '.join(f'{k}={described[k]!r}' for k in differ)}); the config wins: "
            "leave --config out to use the checkpoint's own description")
