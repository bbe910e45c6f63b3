"""``TrainConfig``: the fine-tuning recipes' config, every key once with its default and meaning.

In order: the component names a config may carry; ``TrainCheckpointerConfig`` (the
``checkpointer:`` section); ``TrainConfig`` (its keys grouped as the YAML files group
them; ``__post_init__`` checks what the values alone decide, ``check_world`` what the
number of processes decides, ``check`` every file the run reads); then the legacy
mappings it applies. The reference's legacy keys and values are mapped here and nowhere else:

* ``compile``, ``enable_activation_offloading``, ``log_peak_memory_stats``: accepted, no effect;
* ``checkpointer._component_``: only torchtune's HF checkpointer (the LLM is read from a
  Hugging Face folder, which is what ``checkpointer`` describes anyway);
* torchtune's text-only ``chat_dataset`` becomes ``medcap.data.chat_dataset`` (same arguments);
* a torchtune cross-entropy ``loss`` becomes ``LabelTokenCrossEntropy`` (same maths).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Literal, Optional, Tuple

from medcap.config._reader import ConfigError, check_component, from_config, must_exist, plain

log = logging.getLogger("medcap.config")


# ---- Component names

CHECKPOINT_FORMATS = {"safetensors": ".safetensors", "pt": ".pt"}
TORCHTUNE_CHAT_DATASET = "torchtune.datasets.chat_dataset"
MEDCAP_CHAT_DATASET = "medcap.data.chat_dataset"
LOSS_COMPONENT = "medcap.training.LabelTokenCrossEntropy"
HF_CHECKPOINTER = "torchtune.training.FullModelHFCheckpointer"
DEFAULT_METRIC_LOGGER = "torchtune.training.metric_logging.DiskLogger"
# Losses a torchtune-style config may name; all mean "next-token CE over labels".
_CE_LOSSES = (
    "torch.nn.CrossEntropyLoss",
    "torchtune.modules.loss.CEWithChunkedOutputLoss",
    "torchtune.modules.loss.LinearCrossEntropyLoss",
)
_MIN1 = {"min": 1}


# ---- The config

@dataclass
class TrainCheckpointerConfig:
    """Where the frozen LLM comes from and where the run's checkpoints go."""

    LEGACY = {"_component_": "component"}

    checkpoint_dir: str  # the Llama Hugging Face folder (config.json + safetensors shards)
    checkpoint_files: Any = None  # shard names (a list), torchtune's {filename_format, max_filename}, or null: every *.safetensors
    model_type: Literal["LLAMA3"] = "LLAMA3"  # torchtune's name for Llama 3.x weights
    output_dir: Optional[str] = None  # meta_model_{epoch}, meta_model_last, recipe_state.pt; null: output_dir
    recipe_checkpoint: Optional[str] = None  # resume state file; null: {checkpointer.output_dir}/recipe_state.pt
    component: str = HF_CHECKPOINTER  # the reference's checkpointer._component_: only the HF checkpointer reads our layout

    def __post_init__(self) -> None:
        if self.component != HF_CHECKPOINTER:
            raise ConfigError(
                f"checkpointer._component_={self.component!r}: the LLM is read from a Hugging Face checkpoint "
                f"folder ({HF_CHECKPOINTER}: give checkpoint_dir, checkpoint_files, model_type)"
            )


@dataclass
class TrainConfig:
    """Every key of ``recipes/configs/*/full_finetune_*.yaml`` and ``llama3_1/8B_full*.yaml``."""

    LEGACY = {"compile": None, "enable_activation_offloading": None, "log_peak_memory_stats": None}

    # ---- run and inputs
    output_dir: str  # logs, the resolved config; checkpoints go to checkpointer.output_dir
    model: Dict[str, Any]  # _component_ building a MedcapModel (medcap.models.medcap_llama3_1_8b, medcap_tiny)
    tokenizer: Dict[str, Any]  # _component_ building the Llama 3 tokenizer (medcap.models.llama3_tokenizer)
    dataset: Dict[str, Any]  # _component_ building the image-chat dataset (medcap.data.chat_dataset)
    checkpointer: TrainCheckpointerConfig
    optimizer: Dict[str, Any]  # _component_ of a torch optimizer, over the vision tower and projector only
    batch_size: int = field(metadata=_MIN1)  # samples per step per process
    epochs: int = field(metadata=_MIN1)
    vision: Literal["biomedclip"] = "biomedclip"  # the vision tower design
    vision_checkpoint: Optional[str] = None  # start the tower + projector from a medcap/reference checkpoint
    vision_random_init: bool = False  # allow a random tower when neither model.vision_pretrained nor vision_checkpoint is given

    # ---- data order
    seed: Optional[int] = None  # null: a random seed, recorded so that a resumed run keeps the data order
    shuffle: bool = True  # reshuffle every epoch (seed + epoch)
    group_by_length: bool = False  # batches of similar length (less padding), in random order
    num_workers: int = field(default=0, metadata={"min": 0})  # DataLoader worker processes

    # ---- optimisation
    loss: Optional[Dict[str, Any]] = None  # null: LabelTokenCrossEntropy with its defaults
    lr_scheduler: Optional[Dict[str, Any]] = None  # a torchtune scheduler (given num_training_steps); null: constant lr
    max_steps_per_epoch: Optional[int] = field(default=None, metadata=_MIN1)  # cap optimizer steps per epoch
    gradient_accumulation_steps: int = field(default=1, metadata=_MIN1)  # batches per optimizer step
    optimizer_in_bwd: bool = False  # step each parameter inside backward (one process, accumulation 1, no clipping)
    clip_grad_norm: Optional[float] = None  # max global gradient norm; null: no clipping

    # ---- checkpoints and resume
    resume_from_checkpoint: Any = False  # True: continue the run in checkpointer.output_dir; auto: if there is one
    overwrite: bool = False  # a new run may delete the checkpoints of the run already in checkpointer.output_dir
    checkpoint_format: Literal["safetensors", "pt"] = "safetensors"  # pt: the reference's {'visual','projector'} dict
    save_last_every_seconds: Optional[float] = 8 * 3600.0  # meta_model_last every 8 h, as the reference; null: never by time
    save_last_every_steps: Optional[int] = field(default=None, metadata=_MIN1)  # and/or every N optimizer steps
    stop_after_steps: Optional[int] = field(default=None, metadata=_MIN1)  # stop without saving, as if killed (tests, smoke runs)

    # ---- environment and logging
    device: str = "cuda"  # cuda or cpu (cuda without a GPU is an error, not a fallback)
    dtype: Literal["bf16", "fp32"] = "bf16"  # weights and compute (fp32 on the CPU)
    enable_activation_checkpointing: bool = False  # recompute the decoder layers in backward
    metric_logger: Optional[Dict[str, Any]] = None  # torchtune logger; null: DiskLogger in {output_dir}/logs
    log_every_n_steps: int = field(default=1, metadata=_MIN1)  # metrics to the metric logger every N steps
    progress: bool = True  # a bar on a terminal, else a line every few seconds (step, loss, rate, ETA)

    @classmethod
    def from_config(cls, cfg) -> "TrainConfig":
        """From the YAML + overrides (a DictConfig or a plain mapping)."""
        data, variables = plain(cfg)
        return from_config(cls, data, variables=variables)

    def __post_init__(self) -> None:
        self.resume = resume_mode(self.resume_from_checkpoint)  # "no", "yes" or "auto"
        if self.save_last_every_seconds is not None and self.save_last_every_seconds <= 0:
            raise ConfigError(f"save_last_every_seconds must be > 0 or null, got {self.save_last_every_seconds}")
        if self.model.get("vision") not in (None, self.vision):
            raise ConfigError(f"vision={self.vision!r} but model.vision={self.model['vision']!r}: they must agree")
        if self.optimizer_in_bwd:
            if self.gradient_accumulation_steps != 1:
                raise ConfigError(
                    "optimizer_in_bwd=True steps the optimizer inside backward, so it cannot accumulate gradients: "
                    f"set gradient_accumulation_steps=1 (got {self.gradient_accumulation_steps}) or optimizer_in_bwd=False"
                )
            if self.clip_grad_norm is not None:
                raise ConfigError("clip_grad_norm needs all gradients at once: it cannot be used with optimizer_in_bwd=True")
        if self.metric_logger is None:
            self.metric_logger = {"_component_": DEFAULT_METRIC_LOGGER, "log_dir": f"{self.output_dir}/logs"}
        self.dataset = resolve_dataset_config(self.dataset)[0]
        self.loss = resolve_loss_config(self.loss)

    # ---- derived

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpointer.output_dir or self.output_dir)

    @property
    def checkpoint_suffix(self) -> str:
        return CHECKPOINT_FORMATS[self.checkpoint_format]

    def check_world(self, world_size: int) -> None:
        """What only the number of processes decides."""
        if self.optimizer_in_bwd and world_size > 1:
            raise ConfigError(
                "optimizer_in_bwd is for single-device runs: with several processes the gradients must be "
                "reduced across ranks before stepping. Set optimizer_in_bwd=False."
            )

    def check(self) -> None:
        """Every component's arguments and every file the run reads, nothing loaded."""
        for key in ("model", "tokenizer", "dataset", "optimizer", "loss", "lr_scheduler", "metric_logger"):
            section = getattr(self, key)
            if section is not None:
                check_component(section, key)
        ds = self.dataset
        if ds.get("source") not in (None, "json", "jsonl"):
            must_exist(ds["source"], "dataset.source")
        elif isinstance(ds.get("data_files"), str):
            must_exist(ds["data_files"], "dataset.data_files")
        if ds.get("image_dir"):
            must_exist(ds["image_dir"], "dataset.image_dir", "dir")
        for key in ("path", "special_tokens_path"):
            if self.tokenizer.get(key):
                must_exist(self.tokenizer[key], f"tokenizer.{key}")
        ckpt = must_exist(self.checkpointer.checkpoint_dir, "checkpointer.checkpoint_dir", "dir")
        if isinstance(self.checkpointer.checkpoint_files, list):
            for name in self.checkpointer.checkpoint_files:
                must_exist(ckpt / name, "checkpointer.checkpoint_files")
        pretrained = self.model.get("vision_pretrained")
        if self.vision_checkpoint:
            must_exist(self.vision_checkpoint, "vision_checkpoint")
        elif pretrained and not str(pretrained).startswith("hf-hub:"):
            local = Path(str(pretrained)).expanduser()
            must_exist(local / "open_clip_pytorch_model.bin" if local.is_dir() else local, "model.vision_pretrained")

    def to_dict(self) -> Dict[str, Any]:
        """The config as it runs (legacy keys mapped, defaults filled in), for config.yaml."""
        data = dataclasses.asdict(self)
        del data["checkpointer"]["component"]  # the only one there is
        return data


# ---- Legacy values mapped

def resolve_dataset_config(cfg_dataset: Dict[str, Any]) -> Tuple[Dict[str, Any], bool]:
    """Swap torchtune's text-only ``chat_dataset`` for medcap's image-aware one (which takes
    the same arguments). Returns the (possibly swapped) section and whether it was swapped."""
    if cfg_dataset.get("_component_") != TORCHTUNE_CHAT_DATASET:
        return cfg_dataset, False
    swapped = dict(cfg_dataset, _component_=MEDCAP_CHAT_DATASET)
    log.warning(
        "dataset._component_=%s is torchtune's text-only chat dataset; using %s with the same "
        "arguments so that the images are read",
        TORCHTUNE_CHAT_DATASET,
        MEDCAP_CHAT_DATASET,
    )
    return swapped, True


def resolve_loss_config(cfg_loss: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The loss is always next-token CE over label positions; a torchtune-style CE
    component is replaced by :class:`LabelTokenCrossEntropy` (same maths, no full logits)."""
    if cfg_loss is None:
        return {"_component_": LOSS_COMPONENT}
    comp = cfg_loss.get("_component_")
    if comp == LOSS_COMPONENT:
        return dict(cfg_loss)
    if comp in _CE_LOSSES:
        log.info("loss %s -> %s (cross-entropy computed only at label positions)", comp, LOSS_COMPONENT)
        kept = {k: v for k, v in cfg_loss.items() if k == "ignore_index"}
        return {"_component_": LOSS_COMPONENT, **kept}
    raise ConfigError(f"loss._component_={comp!r} is not supported; use {LOSS_COMPONENT}")


def resume_mode(value: Any) -> str:
    """``resume_from_checkpoint`` as ``no``, ``yes`` or ``auto``."""
    if value is None or value is False:
        return "no"
    if value is True:
        return "yes"
    text = str(value).strip().lower()
    if text in ("auto", "true", "false"):
        return {"auto": "auto", "true": "yes", "false": "no"}[text]
    raise ConfigError(f"resume_from_checkpoint={value!r}: use True, False or auto")
