"""What a saved vision checkpoint records so that it can be used alone: the model it belongs
to, where its LLM and tokenizer were, the image token and transform, the prompt format, the
dtype, and how it was trained.

    describe_model     a built model (any device, meta too) and its config sections -> the entries
                       ``save_vision_checkpoint`` writes into the checkpoint's metadata
    training_summary   the training config's entries a model card tells (recipe, data, steps)

Paths are recorded three ways: absolute, as the config gave them, and relative to the
checkpoint's folder (a tokenizer inside the LLM folder also relative to it), so that a moved
folder is still found. Who reads it: ``medcap.config._from_checkpoint`` (every command and
``medcap.load``) and ``medcap export``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from medcap.data import IMAGE_MARKER, PLACEHOLDER_CHAR
from medcap.models import BIOMEDCLIP_MEAN, BIOMEDCLIP_STD

DESCRIPTION_VERSION = 1


# ---- Paths


def _plain(value: Any) -> Any:
    """An omegaconf node, a dataclass or a mapping as plain JSON-able values."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)


def _relative(path: str, start: Optional[Path]) -> Optional[str]:
    if start is None:
        return None
    try:
        return os.path.relpath(path, Path(start).resolve())
    except ValueError:  # another drive (Windows)
        return None


def _path_entries(key: str, given: Optional[str], checkpoint_dir: Optional[Path], llm_dir: Optional[str]) -> Dict[str, Any]:
    if not given:
        return {key: None}
    absolute = str(Path(str(given)).expanduser().resolve())
    out = {key: absolute, f"{key}_as_given": str(given),
           f"{key}_relative_to_checkpoint": _relative(absolute, checkpoint_dir)}
    if llm_dir and Path(absolute).is_relative_to(llm_dir):
        out[f"{key}_in_llm_dir"] = str(Path(absolute).relative_to(llm_dir))
    return out


def _hf_config(llm_dir: str) -> Optional[Dict[str, Any]]:
    """The LLM folder's ``config.json`` (its architecture as transformers reads it)."""
    try:
        return json.loads((Path(llm_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ---- The description


def describe_model(
    model: Any,
    *,
    model_cfg: Mapping[str, Any],
    checkpointer: Any,
    tokenizer: Mapping[str, Any],
    dtype: str,
    checkpoint_dir: Optional[Path] = None,
    training: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """The metadata entries that make a checkpoint of ``model`` usable alone.

    ``model_cfg``, ``checkpointer`` (``checkpoint_dir``, ``checkpoint_files``, ``model_type``)
    and ``tokenizer`` are the config's sections the model was built from; ``checkpoint_dir``
    is the folder the checkpoint is written to. Only attributes of ``model`` are read, so a
    model on the meta device describes itself too.
    """
    ckptr = _plain(checkpointer if isinstance(checkpointer, Mapping) else vars(checkpointer))
    llm_given = str(ckptr["checkpoint_dir"])
    llm_abs = str(Path(llm_given).expanduser().resolve())
    tok = _plain(tokenizer)
    tower = model.vision.visual
    size = int(tower.image_size)
    return {
        "description_version": DESCRIPTION_VERSION,
        "model": {k: v for k, v in _plain(model_cfg).items() if k != "vision_pretrained"},
        "llm": {
            "checkpoint_dir": llm_abs, "checkpoint_dir_as_given": llm_given,
            "relative_to_checkpoint": _relative(llm_abs, checkpoint_dir),
            "checkpoint_files": ckptr.get("checkpoint_files"), "model_type": ckptr.get("model_type") or "LLAMA3",
            "hf_config": _hf_config(llm_abs),
        },
        "tokenizer": {
            "_component_": tok.get("_component_"),
            **_path_entries("path", tok.get("path"), checkpoint_dir, llm_abs),
            **_path_entries("special_tokens_path", tok.get("special_tokens_path"), checkpoint_dir, llm_abs),
        },
        "image_token_id": int(model.image_token_id),
        "num_image_tokens": int(model.num_image_tokens),
        "vision_tower": _plain(getattr(tower, "timm_spec", None)),
        "image_transform": {
            "size": size, "mean": list(BIOMEDCLIP_MEAN), "std": list(BIOMEDCLIP_STD),
            "steps": "to 8-bit RGB (transparency on black), shorter side to size (bicubic), centre crop, "
                     "/255, (x - mean) / std",
        },
        "prompt_format": {
            "chat_template": "llama3", "image_marker": IMAGE_MARKER, "placeholder_char": PLACEHOLDER_CHAR,
            "caption": f"one user turn holding the image alone ({IMAGE_MARKER})",
            "question": f"one user turn: {IMAGE_MARKER}, a blank line, the question",
        },
        "dtype": str(dtype),
        "training": _plain(training) if training else None,
    }


def training_summary(cfg: Any, *, recipe: str, seed: Optional[int], world_size: int = 1) -> Dict[str, Any]:
    """What a model card tells about the run (the training config's own values)."""
    data = cfg.dataset if isinstance(cfg.dataset, Mapping) else {}
    return _plain({
        "recipe": recipe,
        "dataset": {k: data.get(k) for k in ("_component_", "source", "data_files", "conversation_style",
                                             "max_seq_len") if data.get(k) is not None},
        "epochs": cfg.epochs, "batch_size": cfg.batch_size, "processes": world_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "max_steps_per_epoch": cfg.max_steps_per_epoch,
        "optimizer": cfg.optimizer, "lr_scheduler": cfg.lr_scheduler, "clip_grad_norm": cfg.clip_grad_norm,
        "seed": seed, "dtype": cfg.dtype,
        "vision_start": cfg.vision_checkpoint or cfg.model.get("vision_pretrained")
        or ("random" if cfg.vision_random_init else None),
    })
