"""Configs read once: the reader (YAML + ``key=value`` overrides -> a typed dataclass) and
the two recipes' configs, ``TrainConfig`` (fine-tuning) and ``GenerateConfig`` (evaluation).

Configs read once: YAML + ``key=value`` overrides -> one typed dataclass per recipe,
checked before anything heavy is built.

A recipe declares its config as a dataclass (``GenerateConfig``, ``TrainConfig``):
each key once, with its default and a comment. ``from_config`` builds it from
the YAML and the overrides:

* an unknown key is an error naming the closest valid one
  (``batch_sze`` -> did you mean ``batch_size``?);
* values are converted to the field's type, and a bad value names its key;
* ``Literal`` fields list their choices, ``field(metadata={"min": 1})`` bounds
  numbers;
* the reference's legacy keys (``LEGACY`` on the class) are mapped in that one
  place; a legacy key that has no effect is accepted and said so;
* keys used only as ``${name}`` variables elsewhere in the YAML are allowed.

``run_recipe`` is every recipe's entry point: it parses ``--config FILE`` and the
overrides itself (free-text keys such as ``prompt=`` stay the strings the user
typed: ``prompt=yes``, ``prompt="[urgent] Modality: which?"``), and turns a user
error into one line ``medcap run: error: ...`` and exit status 2 (the traceback
with ``MEDCAP_DEBUG=1``).

The fine-tuning recipe's config: one typed dataclass, every default written once.

``TrainConfig.from_config(cfg)`` turns the YAML + ``key=value`` overrides into a
``TrainConfig`` (unknown keys name the closest valid one, values are converted
and bounded by key). ``check()`` then looks at every file the run will read,
still before anything heavy is built. The reference's legacy keys and values
are mapped here and nowhere else:

* ``compile``, ``enable_activation_offloading``, ``log_peak_memory_stats``:
  accepted, no effect (the log says so);
* ``checkpointer._component_``: only torchtune's HF checkpointer, which is what
  ``checkpointer`` describes anyway (the LLM is read from a Hugging Face folder);
* ``dataset._component_=torchtune.datasets.chat_dataset`` (text only) becomes
  ``medcap.data.chat_dataset`` with the same arguments, and the log says so;
* a torchtune cross-entropy ``loss`` becomes ``LabelTokenCrossEntropy`` (same maths).

The generate recipe's config: every key once, with its default and meaning.

The YAML files (``custom_generation_config``, ``tiny/generate``, ``demo/generate``)
carry the documented values; this class is what ``recipes/generate.py`` reads,
built once by ``medcap.config.from_config`` and checked by ``check()`` (every
component's arguments, every path the run will read) before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import logging
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, Iterable, List, Literal, Mapping, Optional, Sequence, Tuple

# ---- The reader ------------------------------------------------------------------

log = logging.getLogger("medcap.config")

DEBUG_ENV = "MEDCAP_DEBUG"
# recipe name -> the name of its config class (defined below), for `medcap validate`.
SCHEMAS: Dict[str, str] = {
    "generate": "GenerateConfig",
    "full_finetune_single_device": "TrainConfig",
    "full_finetune_distributed": "TrainConfig",
}
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")


class ConfigError(ValueError):
    """A problem with the user's config or command line: reported as one line."""


def suggest(name: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest candidate, or nothing."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --------------------------------------------------------------------------- building


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _convert(value: Any, tp: Any, key: str, meta: Mapping[str, Any]) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _convert(value, a, key, meta)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}={value!r} is not valid: {'; '.join(errors)}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r}: choose one of {list(args)}")
        return value
    if _is_dataclass_type(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a section of keys, got {value!r}")
        return from_config(tp, value, where=f"{key}.")
    if origin in (list, List, Sequence, tuple):
        if isinstance(value, str) and "," in value:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        item = args[0] if args else Any
        return [_convert(v, item, f"{key}[{i}]", {}) for i, v in enumerate(value)]
    if origin in (dict, Dict, Mapping) or tp in (dict, Dict):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a section of keys, got {value!r}")
        return dict(value)
    if value is None:
        raise ConfigError(f"{key} needs a value (null is not allowed here)")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key}={value!r} must be True or False")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and re.fullmatch(r"-?\d+", value))
                                           or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{key}={value!r} must be a whole number")
        value = int(value)
    elif tp is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            value = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r} must be a number") from None
    elif tp is str:
        if isinstance(value, (Mapping, list)):
            raise ConfigError(f"{key} must be text, got {value!r}")
        value = str(value)
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"{key} must be >= {meta['min']}, got {value}")
    return value


def from_config(cls, data: Mapping[str, Any], *, where: str = "", variables: Iterable[str] = ()) -> Any:
    """Build dataclass ``cls`` from ``data`` (plain values), checking every key.

    ``cls.LEGACY`` (optional) maps a legacy key to the field that takes its value,
    or to None for a key that is accepted and has no effect. ``variables``: keys
    that only serve ``${...}`` interpolation.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    legacy: Mapping[str, Optional[str]] = getattr(cls, "LEGACY", {})
    values: Dict[str, Any] = {}
    variables = set(variables)
    for key, value in data.items():
        name = legacy.get(key, key) if key in legacy else key
        if key in legacy and name is None:
            log.debug("%s%s is the reference's key and has no effect in medcap; ignored", where, key)
            continue
        if name not in fields:
            if key in variables:
                continue
            raise ConfigError(f"unknown key '{where}{key}'{suggest(key, list(fields) + list(legacy))}")
        values[name] = _convert(value, hints[name], f"{where}{name}", fields[name].metadata)
    missing = [n for n, f in fields.items() if n not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"the config lacks {', '.join(where + m for m in missing)}")
    return cls(**values)


def check_component(section: Mapping[str, Any], key: str, *, ignore: Sequence[str] = ()) -> Callable:
    """The callable a ``_component_`` section names, its arguments checked against its
    signature (unknown ones named with the closest valid one)."""
    path = section.get("_component_")
    if not path:
        raise ConfigError(f"{key}._component_ is missing: which builder should make the {key}?")
    target = resolve(str(path), f"{key}._component_")
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return target
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return target
    names = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for arg in section:
        if arg == "_component_" or arg in ignore:
            continue
        if arg not in names:
            raise ConfigError(f"{key}.{arg}: {path} takes no argument {arg!r}{suggest(arg, names)}")
    return target


def resolve(path: str, key: str) -> Any:
    """``package.module.name`` -> the object, or a ConfigError naming the key."""
    module, _, name = path.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"{key}={path!r} cannot be found ({e})") from None
    return obj


def must_exist(path: Any, key: str, kind: str = "file") -> Path:
    """``path`` as a Path, or a ConfigError saying which key names a missing file or folder."""
    if path is None or str(path) == "":
        raise ConfigError(f"{key} is not set")
    p = Path(str(path)).expanduser()
    ok = p.is_file() if kind == "file" else p.is_dir() if kind == "dir" else p.exists()
    if not ok:
        what = {"file": "file", "dir": "folder"}.get(kind, "path")
        raise ConfigError(f"{key}={str(path)!r}: no such {what}")
    if not os.access(p, os.R_OK):
        raise ConfigError(f"{key}={str(path)!r} cannot be read (permissions)")
    return p


def schema_for(recipe: str):
    """The config class of a recipe (by name or file stem)."""
    name = Path(recipe).stem
    if name not in SCHEMAS:
        raise ConfigError(f"no config schema for recipe {recipe!r}{suggest(name, SCHEMAS)}")
    return globals()[SCHEMAS[name]]


def validate(recipe: str, cfg) -> Any:
    """Every key and every path of a config, nothing loaded: the typed config, or a
    ConfigError. ``cfg`` is a DictConfig or a mapping (interpolations resolved here)."""
    cls = schema_for(recipe)
    data, variables = plain(cfg)
    obj = from_config(cls, data, variables=variables)
    check = getattr(obj, "check", None)
    if check is not None:
        check()
    return obj


# --------------------------------------------------------------------------- parsing


def plain(cfg) -> Tuple[Dict[str, Any], List[str]]:
    """``(resolved plain dict, names used only as ${...} variables)`` of a config."""
    from omegaconf import DictConfig, OmegaConf

    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        raw = data = dataclasses.asdict(cfg)
    elif isinstance(cfg, DictConfig):
        raw = OmegaConf.to_container(cfg, resolve=False)
        try:
            data = OmegaConf.to_container(cfg, resolve=True)
        except Exception as e:  # omegaconf's interpolation errors
            raise ConfigError(f"the config cannot be resolved: {e}") from None
    else:
        raw = data = dict(cfg)
    return data, sorted(_variables(raw))


def _variables(node: Any) -> set:
    found = set()
    if isinstance(node, Mapping):
        for v in node.values():
            found |= _variables(v)
    elif isinstance(node, list):
        for v in node:
            found |= _variables(v)
    elif isinstance(node, str):
        found |= set(_VAR.findall(node))
    return found


def parse_args(argv: Sequence[str], free_text: Iterable[str] = ()) -> Tuple[Path, Any]:
    """``--config FILE key=value ...`` -> ``(file, DictConfig)``. Keys in ``free_text``
    keep the exact string typed after ``=``; the others are parsed as YAML values."""
    from omegaconf import OmegaConf

    free_text = set(free_text)
    args = list(argv)
    config_path: Optional[str] = None
    overrides: List[str] = []
    raw: Dict[str, str] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("--config", "-c") and i + 1 < len(args):
            config_path = args[i + 1]
            i += 2
            continue
        if a.startswith("--config="):
            config_path = a.split("=", 1)[1]
        elif "=" in a and not a.startswith("-"):
            key, value = a.split("=", 1)
            if key.lstrip("~+") in free_text:
                raw[key.lstrip("~+")] = value
            else:
                overrides.append(a)
        else:
            raise ConfigError(f"cannot read the argument {a!r}: give --config FILE and key=value overrides")
        i += 1
    if config_path is None:
        raise ConfigError("no --config given")
    path = must_exist(config_path, "--config")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:
        raise ConfigError(f"{path} is not a valid YAML config: {e}") from None
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    except Exception as e:
        raise ConfigError(f"cannot read the overrides {overrides}: {e}") from None
    for key, value in raw.items():
        cfg[key] = value
    return path, cfg


def save_resolved(cfg, folder: str | Path, name: str = "config.yaml") -> Path:
    """Write the config as it was run (interpolations resolved) into ``folder``."""
    from omegaconf import OmegaConf

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    data, _ = plain(cfg)
    from medcap._io import atomic_write_text

    return atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(data)))


# Errors that mean "the user's input is wrong", not "medcap is broken".
def _user_errors() -> Tuple[type, ...]:
    from medcap._io import LockedError

    errors: List[type] = [ConfigError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, LockedError]
    try:
        from medcap.data import BadSample

        errors.append(BadSample)
    except ImportError:
        pass
    return tuple(errors)


def run_recipe(main: Callable[[Any], Any], argv: Optional[Sequence[str]] = None, *, free_text: Iterable[str] = (),
               prog: str = "medcap run") -> int:
    """A recipe's entry point: parse, run ``main(cfg)``, report user errors in one line."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from medcap._io import quiet_library_noise

    quiet_library_noise()
    try:
        _, cfg = parse_args(sys.argv[1:] if argv is None else argv, free_text)
        main(cfg)
        return 0
    except _user_errors() as e:
        if os.environ.get(DEBUG_ENV):
            raise
        msg = str(e) if not isinstance(e, OSError) or not e.filename else f"{e.strerror}: {e.filename}"
        print(f"{prog}: error: {msg}", file=sys.stderr, flush=True)
        return 2


# ---- TrainConfig: recipes/full_finetune_single_device.py -------------------------

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

    # --- run and inputs
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

    # --- data order
    seed: Optional[int] = None  # null: a random seed, recorded so that a resumed run keeps the data order
    shuffle: bool = True  # reshuffle every epoch (seed + epoch)
    group_by_length: bool = False  # batches of similar length (less padding), in random order
    num_workers: int = field(default=0, metadata={"min": 0})  # DataLoader worker processes

    # --- optimisation
    loss: Optional[Dict[str, Any]] = None  # null: LabelTokenCrossEntropy with its defaults
    lr_scheduler: Optional[Dict[str, Any]] = None  # a torchtune scheduler (given num_training_steps); null: constant lr
    max_steps_per_epoch: Optional[int] = field(default=None, metadata=_MIN1)  # cap optimizer steps per epoch
    gradient_accumulation_steps: int = field(default=1, metadata=_MIN1)  # batches per optimizer step
    optimizer_in_bwd: bool = False  # step each parameter inside backward (one process, accumulation 1, no clipping)
    clip_grad_norm: Optional[float] = None  # max global gradient norm; null: no clipping

    # --- checkpoints and resume
    resume_from_checkpoint: Any = False  # True: continue the run in checkpointer.output_dir; auto: if there is one
    overwrite: bool = False  # a new run may delete the checkpoints of the run already in checkpointer.output_dir
    checkpoint_format: Literal["safetensors", "pt"] = "safetensors"  # pt: the reference's {'visual','projector'} dict
    save_last_every_seconds: Optional[float] = 8 * 3600.0  # meta_model_last every 8 h, as the reference; null: never by time
    save_last_every_steps: Optional[int] = field(default=None, metadata=_MIN1)  # and/or every N optimizer steps
    stop_after_steps: Optional[int] = field(default=None, metadata=_MIN1)  # stop without saving, as if killed (tests, smoke runs)

    # --- environment and logging
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

    # ------------------------------------------------------------------ derived

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


def load_train_config(cfg, world_size: int = 1) -> TrainConfig:
    """The typed, checked config: what a recipe does first."""
    typed = cfg if isinstance(cfg, TrainConfig) else TrainConfig.from_config(cfg)
    typed.check_world(world_size)
    typed.check()
    return typed


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


# ---- GenerateConfig: recipes/generate.py -----------------------------------------

VQA_TYPE = Literal["no_cond_desc", "no_cond_desc_no_image", "cond_desc", "cond_desc_no_image", "omit"]
SUITES = ("test_metrics", "test_vqarad", "test_omnimedvqa", "test_slake", "test_pathvqa", "test_vqarad_hf", "test_pmcvqa",
          "test_questions")
FREE_TEXT = ("prompt", "image")  # taken exactly as typed on the command line (images=[...] is a YAML list)


@dataclass
class GenerateCheckpointerConfig:
    """Where the frozen LLM's weights are read from (a Hugging Face folder)."""

    checkpoint_dir: str
    checkpoint_files: Optional[List[str]] = None  # null: every *.safetensors in the folder
    model_type: Literal["LLAMA3"] = "LLAMA3"
    # torchtune's checkpointer keys that the reference's configs carry: medcap reads the
    # weights with torchtune's HF checkpointer itself and writes nothing here.
    LEGACY: ClassVar[Dict[str, Optional[str]]] = {"_component_": None, "output_dir": None, "recipe_checkpoint": None}


@dataclass
class GenerateConfig:
    model: Dict[str, Any]  # _component_ + arguments: medcap_llama3_1_8b, or medcap_tiny for tests and the demo
    checkpointer: GenerateCheckpointerConfig
    tokenizer: Dict[str, Any]  # medcap.models.llama3_tokenizer + path (+ special_tokens_path)
    device: str = "cuda"  # falls back to the CPU, with a warning, when no GPU is present
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    seed: Optional[int] = 1234  # each sampled row draws from its own stream seeded by (seed, row)
    max_new_tokens: int = field(default=300, metadata={"min": 1})  # captions / descriptions
    temperature: float = field(default=0.6, metadata={"min": 0.0})  # 0: greedy
    top_k: Optional[int] = field(default=300, metadata={"min": 1})  # null: the whole vocabulary
    enable_kv_cache: bool = True  # False: the reference's slow path (batch 1, full recompute)
    quantizer: Optional[Dict[str, Any]] = None  # accepted for compatibility; only null works
    batch_size: int = field(default=8, metadata={"min": 1})  # rows decoding together (slots of continuous batching)
    chunk_size: Optional[int] = field(default=None, metadata={"min": 1})  # rows handed to the engine at once, so
    #   finished slots refill from the same call; null: 4 x batch_size. A killed run redoes at most one chunk.
    compile: bool = False  # torch.compile the decode step (CUDA graphs on a GPU); greedy outputs are identical
    vision: Literal["biomedclip"] = "biomedclip"
    vision_checkpoint: Optional[str] = None  # null: an untrained vision side (files named "untrained")
    output_dir: str = "./results"
    dataset_source: Optional[str] = "./datasets/"  # test_metrics: a sharegpt file; VQA: the folder of the data sets
    dataset_conversation_style: Literal["sharegpt"] = "sharegpt"
    dataset_max_seq_len: int = field(default=500, metadata={"min": 1})  # the description budget's max_seq_len
    test_metrics: bool = False
    test_vqarad: bool = False
    test_omnimedvqa: bool = False
    # the field's benchmarks (medcap/eval/_benchmarks.py; layouts in datasets/README.md)
    test_slake: bool = False  # {dataset_source}/Slake1.0/test.json + imgs/
    test_pathvqa: bool = False  # {dataset_source}/path-vqa/data/test-*.parquet (Hugging Face)
    test_vqarad_hf: bool = False  # {dataset_source}/vqa-rad/data/test-*.parquet (Hugging Face)
    test_pmcvqa: bool = False  # {dataset_source}/PMC-VQA/test_clean.csv (or test.csv) + images/
    test_questions: bool = False  # dataset_source is your own questions' JSONL file
    q_lang: Literal["en", "zh", "all"] = "en"  # SLAKE's question language
    vqa_type: VQA_TYPE = "no_cond_desc"
    vqa_scoring: Literal["letter", "loglik"] = "letter"
    test_chunk_idx: Optional[int] = field(default=None, metadata={"min": 0})
    test_chunk: int = field(default=50, metadata={"min": 1})
    omnimedvqa_include_modality_key: bool = False
    omnimedvqa_file_order: Literal["sorted", "listdir"] = "sorted"
    overwrite: bool = False  # start results files made by another model / other settings afresh
    debug: bool = False  # debug_samples items per suite into output_dir/debug
    debug_samples: int = field(default=4, metadata={"min": 1})
    progress: bool = True
    image: Optional[str] = None  # single shot: image=a.png,b.png (paths with commas: images=[...])
    images: Optional[List[str]] = None
    prompt: Optional[str] = None  # single shot: a question (free text); null: caption

    def suites(self) -> List[str]:
        return [s for s in SUITES if getattr(self, s)]

    def image_paths(self) -> List[str]:
        """``image=a.png,b.png`` (split at commas) and ``images=[...]`` (taken whole)."""
        found = [s.strip() for s in (self.image or "").split(",") if s.strip()]
        return found + [str(p) for p in (self.images or [])]

    def check(self) -> None:
        """Everything that can be checked without loading a weight."""
        check_component(self.model, "model")
        check_component(self.tokenizer, "tokenizer")
        if self.quantizer is not None:
            raise ConfigError("quantizer is not supported by medcap's generation (the reference's default, null, is); "
                              "set quantizer=null")
        if not self.suites() and not self.image_paths():
            raise ConfigError(
                "nothing to do: switch on a suite (" + ", ".join(f"{s}=True" for s in SUITES) + ") "
                "or give images for the single-shot mode (image=path1,path2 [prompt=\"question\"])"
            )
        model_vision = self.model.get("vision")
        if model_vision not in (None, self.vision):
            raise ConfigError(f"model.vision={model_vision!r} but vision={self.vision!r}")
        must_exist(self.tokenizer.get("path"), "tokenizer.path")
        if self.tokenizer.get("special_tokens_path"):
            must_exist(self.tokenizer["special_tokens_path"], "tokenizer.special_tokens_path")
        folder = must_exist(self.checkpointer.checkpoint_dir, "checkpointer.checkpoint_dir", "dir")
        for name in self.checkpointer.checkpoint_files or []:
            must_exist(folder / name, f"checkpointer.checkpoint_files ({name})")
        if self.vision_checkpoint:
            must_exist(self.vision_checkpoint, "vision_checkpoint")
        for p in self.image_paths():
            must_exist(p, "image")
        if self.test_metrics:
            must_exist(self.dataset_source, "dataset_source (test_metrics reads sharegpt records)", "path")
        if self.test_vqarad:
            must_exist(Path(str(self.dataset_source)) / "VQA_RAD" / "VQA_RAD Dataset Public.json",
                       "dataset_source (test_vqarad)")
        if self.test_omnimedvqa:
            must_exist(Path(str(self.dataset_source)) / "OmniMedVQA" / "QA_information" / "Open-access",
                       "dataset_source (test_omnimedvqa)", "dir")
        self._check_benchmarks()

    def _check_benchmarks(self) -> None:
        root = Path(str(self.dataset_source))
        if self.test_slake:
            must_exist(root / "Slake1.0" / "test.json", "dataset_source (test_slake)")
        for suite, folder in (("test_pathvqa", "path-vqa"), ("test_vqarad_hf", "vqa-rad")):
            if getattr(self, suite) and not any((root / folder / "data").glob("test-*.parquet")):
                raise ConfigError(f"dataset_source ({suite}): no test-*.parquet in {str(root / folder / 'data')!r}; "
                                  f"download it with: huggingface-cli download flaviagiammarino/{folder} "
                                  f"--repo-type dataset --local-dir {root / folder}")
        if self.test_pmcvqa and not any((root / "PMC-VQA" / n).is_file() for n in ("test_clean.csv", "test.csv")):
            must_exist(root / "PMC-VQA" / "test_clean.csv", "dataset_source (test_pmcvqa: test_clean.csv or test.csv)")
        if self.test_questions:
            must_exist(root, "dataset_source (test_questions reads a JSONL file of questions)", "file")
