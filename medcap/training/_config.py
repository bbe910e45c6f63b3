"""Config checks and the settings both recipes read, in one place so they cannot drift.

The configs keep the reference's keys (torchtune's full fine-tune keys plus
``vision`` and ``vision_checkpoint``). Optional keys of ours, with defaults:

* ``checkpoint_format``: ``safetensors`` (default) or ``pt`` (the reference's dict).
* ``save_last_every_seconds`` (28800, the reference's 8 h; null: never by time) and
  ``save_last_every_steps`` (null): when ``meta_model_last`` + ``recipe_state.pt``
  are written during training (also at every epoch end, and the weights at the end).
* ``group_by_length`` (False): batches of similar length, random batch order.
* ``num_workers`` (0): DataLoader worker processes.
* ``stop_after_steps`` (null): stop after that many optimizer steps *without*
  saving, as if the job were killed there (resume tests, time-boxed smoke runs).
* ``log_every_n_steps`` (1), ``clip_grad_norm`` (null), ``lr_scheduler`` (none).
* ``resume_from_checkpoint``: False, True or ``auto``; ``overwrite`` (False): a new
  run may replace the run already in ``checkpointer.output_dir`` (see ``_run_dir``).
* ``vision_random_init`` (False): allow a random vision tower when neither
  ``model.vision_pretrained`` nor ``vision_checkpoint`` is given.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

from omegaconf import DictConfig, OmegaConf

from medcap.models import check_vision

log = logging.getLogger("medcap.training")

# The reference wrote meta_model_last every 8 hours.
DEFAULT_SAVE_LAST_EVERY_SECONDS = 8 * 3600
CHECKPOINT_FORMATS = {"safetensors": ".safetensors", "pt": ".pt"}
DTYPES = ("bf16", "fp32")

TORCHTUNE_CHAT_DATASET = "torchtune.datasets.chat_dataset"
MEDCAP_CHAT_DATASET = "medcap.data.chat_dataset"
LOSS_COMPONENT = "medcap.training.LabelTokenCrossEntropy"
# Losses a torchtune-style config may name; all mean "next-token CE over labels".
_CE_LOSSES = (
    "torch.nn.CrossEntropyLoss",
    "torchtune.modules.loss.CEWithChunkedOutputLoss",
    "torchtune.modules.loss.LinearCrossEntropyLoss",
)
HF_CHECKPOINTER = "torchtune.training.FullModelHFCheckpointer"

_REQUIRED = ("model", "tokenizer", "checkpointer", "dataset", "optimizer", "batch_size", "epochs", "output_dir")


def check_config(cfg: DictConfig, *, distributed: bool) -> None:
    """Fail before any weight is loaded when the config cannot work, saying why."""
    missing = [k for k in _REQUIRED if cfg.get(k) is None]
    if missing:
        raise ValueError(f"the config lacks required keys: {missing}")
    check_vision(cfg.get("vision", "biomedclip"))
    model_vision = cfg.model.get("vision")
    if model_vision is not None and model_vision != cfg.get("vision", "biomedclip"):
        raise ValueError(f"vision={cfg.get('vision')!r} but model.vision={model_vision!r}: they must agree")

    dtype = cfg.get("dtype", "bf16")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported for training; choose one of {list(DTYPES)}")

    _positive_int(cfg, "batch_size")
    _positive_int(cfg, "epochs")
    gas = _positive_int(cfg, "gradient_accumulation_steps", default=1)
    for key in ("max_steps_per_epoch", "save_last_every_steps", "stop_after_steps"):
        if cfg.get(key) is not None:
            _positive_int(cfg, key)
    secs = cfg.get("save_last_every_seconds", DEFAULT_SAVE_LAST_EVERY_SECONDS)
    if secs is not None and float(secs) <= 0:
        raise ValueError(f"save_last_every_seconds must be > 0 or null, got {secs}")

    fmt = cfg.get("checkpoint_format", "safetensors")
    if fmt not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format={fmt!r}: choose one of {list(CHECKPOINT_FORMATS)}")

    if cfg.get("optimizer_in_bwd", False):
        if gas != 1:
            raise ValueError(
                f"optimizer_in_bwd=True steps the optimizer inside backward, so it cannot accumulate "
                f"gradients: set gradient_accumulation_steps=1 (got {gas}) or optimizer_in_bwd=False"
            )
        if cfg.get("clip_grad_norm") is not None:
            raise ValueError("clip_grad_norm needs all gradients at once: it cannot be used with optimizer_in_bwd=True")
        if distributed:
            raise ValueError(
                "optimizer_in_bwd is for the single-device recipe; the distributed recipe must reduce "
                "gradients across ranks before stepping. Set optimizer_in_bwd=False."
            )

    comp = cfg.checkpointer.get("_component_", HF_CHECKPOINTER)
    if comp != HF_CHECKPOINTER:
        raise ValueError(
            f"checkpointer._component_={comp!r}: the LLM is read from a Hugging Face checkpoint folder "
            f"({HF_CHECKPOINTER} with checkpoint_dir, checkpoint_files, model_type)"
        )
    if not cfg.checkpointer.get("checkpoint_dir"):
        raise ValueError("checkpointer.checkpoint_dir must name the Llama checkpoint folder")

    if cfg.get("compile", False):
        log.warning("compile=True is ignored by medcap's recipes (eager mode)")
    if cfg.get("enable_activation_offloading", False):
        log.warning("enable_activation_offloading=True is ignored by medcap's recipes")


def _positive_int(cfg: DictConfig, key: str, default: Optional[int] = None) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be a positive integer, got {value!r}")
    return value


def resolve_dataset_config(cfg_dataset: DictConfig) -> Tuple[DictConfig, bool]:
    """Swap torchtune's text-only ``chat_dataset`` for medcap's image-aware one.

    The reference's launch lines name ``torchtune.datasets.chat_dataset``, which
    would drop the images; ``medcap.data.chat_dataset`` takes the same arguments.
    Returns the (possibly swapped) config and whether it was swapped.
    """
    comp = cfg_dataset.get("_component_")
    if comp == TORCHTUNE_CHAT_DATASET:
        swapped = OmegaConf.create(OmegaConf.to_container(cfg_dataset, resolve=True))
        swapped._component_ = MEDCAP_CHAT_DATASET
        log.warning(
            "dataset._component_=%s is torchtune's text-only chat dataset; using %s with the same "
            "arguments so that the images are read",
            TORCHTUNE_CHAT_DATASET,
            MEDCAP_CHAT_DATASET,
        )
        return swapped, True
    return cfg_dataset, False


def resolve_loss_config(cfg_loss: Optional[DictConfig]) -> DictConfig:
    """The loss is always next-token CE over label positions; a torchtune-style CE
    component is replaced by :class:`LabelTokenCrossEntropy` (same maths, no full logits)."""
    if cfg_loss is None:
        return OmegaConf.create({"_component_": LOSS_COMPONENT})
    comp = cfg_loss.get("_component_")
    if comp == LOSS_COMPONENT:
        return cfg_loss
    if comp in _CE_LOSSES:
        log.info("loss %s -> %s (cross-entropy computed only at label positions)", comp, LOSS_COMPONENT)
        kept = {k: v for k, v in OmegaConf.to_container(cfg_loss, resolve=True).items() if k == "ignore_index"}
        return OmegaConf.create({"_component_": LOSS_COMPONENT, **kept})
    raise ValueError(f"loss._component_={comp!r} is not supported; use {LOSS_COMPONENT}")


@dataclass
class TrainSettings:
    """The loop's knobs, read once from the config."""

    epochs: int
    batch_size: int
    gradient_accumulation_steps: int = 1
    max_steps_per_epoch: Optional[int] = None
    clip_grad_norm: Optional[float] = None
    log_every_n_steps: int = 1
    checkpoint_dir: Path = Path(".")
    checkpoint_format: str = "safetensors"
    save_last_every_seconds: Optional[float] = DEFAULT_SAVE_LAST_EVERY_SECONDS
    save_last_every_steps: Optional[int] = None
    stop_after_steps: Optional[int] = None
    output_dir: Path = Path(".")

    @classmethod
    def from_config(cfg_cls, cfg: DictConfig) -> "TrainSettings":
        secs = cfg.get("save_last_every_seconds", DEFAULT_SAVE_LAST_EVERY_SECONDS)
        clip = cfg.get("clip_grad_norm")
        return cfg_cls(
            epochs=int(cfg.epochs),
            batch_size=int(cfg.batch_size),
            gradient_accumulation_steps=int(cfg.get("gradient_accumulation_steps", 1)),
            max_steps_per_epoch=cfg.get("max_steps_per_epoch"),
            clip_grad_norm=float(clip) if clip is not None else None,
            log_every_n_steps=int(cfg.get("log_every_n_steps", 1)),
            checkpoint_dir=Path(cfg.checkpointer.get("output_dir") or cfg.output_dir),
            checkpoint_format=cfg.get("checkpoint_format", "safetensors"),
            save_last_every_seconds=float(secs) if secs is not None else None,
            save_last_every_steps=cfg.get("save_last_every_steps"),
            stop_after_steps=cfg.get("stop_after_steps"),
            output_dir=Path(cfg.output_dir),
        )

    @property
    def checkpoint_suffix(self) -> str:
        return CHECKPOINT_FORMATS[self.checkpoint_format]
