"""The frozen Llama's weights, read from a Hugging Face model folder into ``model.decoder``.

In order:

* ``load_llama_weights``: the four steps below, the one public function;
* the files: the folder and shard names checked, every ``*.safetensors`` by default;
* the reading: torchtune's ``FullModelHFCheckpointer`` does the reading and the
  HF -> torchtune key conversion; each shard is logged with its size and time;
* the check: what was read must be exactly the decoder's tensors (names and shapes),
  else one error lists what is missing, unexpected or mis-sized;
* the load into the model, checked to have landed.

The vision side is untouched (see ``_vision_checkpoint``); ``_load.load_model`` calls
this. Why torchtune's checkpointer and not our own reader: ``docs/internals.md``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from torch import nn
from torchtune import training
from torchtune.training import FullModelHFCheckpointer
from torchtune.training.checkpointing import ModelType
from torchtune.training.checkpointing import _checkpointer as _tt_checkpointer

log = logging.getLogger("medcap.models")

CheckpointFiles = Union[List[str], Dict[str, str]]

_DECODER_PREFIX = "decoder."


def load_llama_weights(
    model: nn.Module,
    checkpoint_dir: Union[str, Path],
    checkpoint_files: Optional[CheckpointFiles] = None,
    model_type: str = "LLAMA3",
) -> Dict[str, Any]:
    """Load an HF-format Llama checkpoint into ``model.decoder`` (the vision side is untouched).

    Args:
        model: a :class:`~medcap.models.MedcapModel` (anything with torchtune's
            ``EarlyFusionModel`` layout: ``decoder.*`` plus ``tok_embeddings``).
        checkpoint_dir: the HF model folder (``config.json`` + safetensors shards).
        checkpoint_files: shard names, torchtune's ``{"filename_format", "max_filename"}``
            dict, or ``None`` for every ``*.safetensors`` in the folder.
        model_type: torchtune's model type name (``LLAMA3`` for Llama 3.x).

    Returns:
        ``{"checkpoint_dir", "num_tensors"}`` for logging.

    Raises:
        ValueError: when the checkpoint's tensors are not exactly the decoder's
            (names or shapes), listing what is missing, unexpected or mis-sized.
    """
    ckpt_dir = Path(checkpoint_dir)
    checkpoint_files = _checked_files(ckpt_dir, checkpoint_files, model_type)
    if any(p.is_meta for p in model.parameters()):
        raise ValueError(
            "the model is on the meta device, where loading would silently do nothing; "
            "build it on a real device first"
        )
    start = time.perf_counter()
    full_sd = _read_decoder_state(ckpt_dir, checkpoint_files, model_type)
    _check_fits_decoder(full_sd, model.state_dict(), ckpt_dir)
    _load_decoder_state(model, full_sd)
    log.info("LLM loaded: %d tensors in %.1f s", len(full_sd), time.perf_counter() - start)
    return {"checkpoint_dir": str(ckpt_dir), "num_tensors": len(full_sd)}


# ---- The files

def _checked_files(ckpt_dir: Path, checkpoint_files: Optional[CheckpointFiles], model_type: str) -> CheckpointFiles:
    """The shards to read (every ``*.safetensors`` when not given), after checking the folder."""
    if checkpoint_files is None:
        _check_inputs(ckpt_dir, [], model_type)
        checkpoint_files = _default_checkpoint_files(ckpt_dir)
    _check_inputs(ckpt_dir, checkpoint_files, model_type)
    return checkpoint_files


def _default_checkpoint_files(checkpoint_dir: Path) -> List[str]:
    files = sorted(p.name for p in checkpoint_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors files in {str(checkpoint_dir)!r}; pass checkpoint_files, or point "
            "checkpoint_dir at the Hugging Face model folder (for Llama-3.1-8B-Instruct it holds "
            "model-00001-of-00004.safetensors ... and config.json)"
        )
    return files


def _check_inputs(checkpoint_dir: Path, checkpoint_files: CheckpointFiles, model_type: str) -> None:
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {str(checkpoint_dir)!r}")
    if not (checkpoint_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{str(checkpoint_dir)!r} has no config.json, which the HF checkpointer needs for the "
            "head counts: is it a Hugging Face model folder?"
        )
    if model_type not in ModelType.__members__:
        raise ValueError(f"unknown model_type {model_type!r}; torchtune knows {sorted(ModelType.__members__)}")
    if isinstance(checkpoint_files, dict):
        if set(checkpoint_files) != {"filename_format", "max_filename"}:
            raise ValueError(
                "checkpoint_files as a dict needs exactly the keys 'filename_format' and 'max_filename', "
                f"got {sorted(checkpoint_files)}"
            )
        return
    missing = [f for f in checkpoint_files if not (checkpoint_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint files not found in {str(checkpoint_dir)!r}: {missing}")


# ---- The reading

def _read_decoder_state(ckpt_dir: Path, checkpoint_files: CheckpointFiles, model_type: str) -> Dict[str, torch.Tensor]:
    """The checkpoint's tensors under the model's names (``decoder.*``)."""
    with tempfile.TemporaryDirectory(prefix="medcap-ckpt-", dir=_scratch_parent(ckpt_dir)) as scratch:
        checkpointer = FullModelHFCheckpointer(
            checkpoint_dir=str(ckpt_dir),
            checkpoint_files=checkpoint_files,
            model_type=model_type,
            output_dir=scratch,
        )
        paths = [Path(p) for p in getattr(checkpointer, "_checkpoint_paths", [])]
        total = sum(p.stat().st_size for p in paths if p.is_file())
        log.info("loading the LLM from %s: %d shard(s), %s", ckpt_dir, len(paths), _size(total))
        with _log_each_shard(len(paths)):
            tune_sd = checkpointer.load_checkpoint()[training.MODEL_KEY]
    # EarlyFusionModel keeps the decoder's embedding at ``model.tok_embeddings`` but
    # reports it (and accepts it back) as ``decoder.tok_embeddings.*`` through its
    # state-dict hooks, so plain ``decoder.`` prefixes line up with its state dict.
    return {_DECODER_PREFIX + k: v for k, v in tune_sd.items()}


def _scratch_parent(checkpoint_dir: Path) -> Optional[str]:
    """A folder for the checkpointer's (unused) output_dir: torchtune refuses one
    inside the checkpoint directory, so skip candidates that lie there."""
    ckpt = checkpoint_dir.resolve()
    for cand in (Path(tempfile.gettempdir()), Path.cwd(), ckpt.parent):
        c = cand.resolve()
        if c != ckpt and ckpt not in c.parents:
            return str(c)
    return None


def _size(nbytes: int) -> str:
    for unit in ("B", "KB", "MB"):
        if nbytes < 1000:
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} GB"


@contextlib.contextmanager
def _log_each_shard(num_shards: int):
    """Log every shard torchtune's checkpointer reads (name, size, seconds): the 8B
    model's four shards take minutes on a slow disk, which should not look like a hang.
    The checkpointer reads through its module's ``safe_torch_load``, wrapped here
    for the duration of one load (left alone if a torchtune release renames it)."""
    inner = getattr(_tt_checkpointer, "safe_torch_load", None)
    if inner is None:
        yield
        return
    done = [0]

    def load(path, *args, **kwargs):
        start = time.perf_counter()
        state = inner(path, *args, **kwargs)
        done[0] += 1
        log.info(
            "LLM shard %d/%d %s (%s) read in %.1f s",
            done[0], num_shards, os.path.basename(str(path)), _size(os.path.getsize(path)), time.perf_counter() - start,
        )
        return state

    _tt_checkpointer.safe_torch_load = load
    try:
        yield
    finally:
        _tt_checkpointer.safe_torch_load = inner


# ---- The check and the load

def _check_fits_decoder(full_sd: Dict[str, torch.Tensor], model_sd: Dict[str, torch.Tensor], ckpt_dir: Path) -> None:
    """Refuse, before any weight moves, a checkpoint that is not exactly the decoder."""
    expected = {k for k in model_sd if k.startswith(_DECODER_PREFIX)}
    got = set(full_sd)
    missing, unexpected = expected - got, got - expected
    mis_sized = [
        f"{k}: checkpoint {list(full_sd[k].shape)}, model {list(model_sd[k].shape)}"
        for k in sorted(expected & got)
        if full_sd[k].shape != model_sd[k].shape
    ]
    if not (missing or unexpected or mis_sized):
        return
    lines = [f"the checkpoint in {str(ckpt_dir)!r} does not match the model's decoder:"]
    if missing:
        lines.append(f"  missing from the checkpoint ({len(missing)}): {_short(missing)}")
    if unexpected:
        lines.append(f"  not in the model ({len(unexpected)}): {_short(unexpected)}")
    if mis_sized:
        lines.append(f"  different sizes ({len(mis_sized)}): " + "; ".join(mis_sized[:6]))
    lines.append("  (are the model builder's sizes those of the checkpoint's config.json?)")
    raise ValueError("\n".join(lines))


def _short(keys, n: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _load_decoder_state(model: nn.Module, full_sd: Dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        result = model.load_state_dict(full_sd, strict=False)
    # Only the vision side may be left out; anything else means the hooks moved keys.
    stray = [k for k in result.missing_keys if k.startswith(_DECODER_PREFIX) or k.startswith("tok_embeddings")]
    if stray or result.unexpected_keys:
        raise RuntimeError(
            f"decoder weights did not all land: missing {stray[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
