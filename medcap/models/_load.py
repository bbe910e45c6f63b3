"""One way to build a ``MedcapModel`` with its weights, for training and generation alike.

In order:

* ``DTYPES`` and ``resolve_dtype``: the dtype names configs accept (``bf16`` ...);
* ``build_model``: the config's ``model`` section instantiated in a dtype on a device;
* ``check_tokenizer``: a tokenizer of another model is refused before any weight is read;
* ``load_model``: build, check the tokenizer, load the Llama weights
  (``_llama_weights``), load the trained vision side when a checkpoint is given
  (``_vision_checkpoint``), then freeze. Training and generation differ only in what
  stays trainable (the vision tower and projector, or nothing).

Both recipes, ``medcap caption`` and the server call ``load_model``.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Mapping, Optional, Union

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torchtune import config as tt_config
from torchtune import training as tt_training

from medcap.models._llama_weights import load_llama_weights
from medcap.models._model import MedcapModel, assert_only_vision_trainable
from medcap.models._vision_checkpoint import load_vision_weights

log = logging.getLogger("medcap.models")

# The one table of dtype names the configs accept (the ``dtype`` key).
DTYPES: Dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(name: Union[str, torch.dtype], key: str = "dtype") -> torch.dtype:
    """``"bf16"`` -> ``torch.bfloat16``; a ``torch.dtype`` passes through."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"{key}={name!r}; choose one of {list(DTYPES)}")
    return DTYPES[name]


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def build_model(cfg_model: Mapping[str, Any], *, device: torch.device, dtype: torch.dtype, skip_pretrained: bool = False) -> MedcapModel:
    """``cfg_model`` (``_component_`` + its arguments) instantiated in ``dtype`` on ``device``.

    ``skip_pretrained``: the vision weights come from a checkpoint, so BiomedCLIP's
    pretrained weights (``vision_pretrained``) would be overwritten at once; not
    reading them also avoids a download.
    """
    if not isinstance(cfg_model, DictConfig):
        cfg_model = OmegaConf.create(dict(cfg_model))
    overrides: Dict[str, Any] = {}
    if skip_pretrained and cfg_model.get("vision_pretrained"):
        log.info("model.vision_pretrained not read: the vision weights come from a checkpoint")
        overrides["vision_pretrained"] = None
    with tt_training.set_default_dtype(dtype), torch.device(device):
        model = tt_config.instantiate(cfg_model, **overrides)
    if not isinstance(model, MedcapModel):
        raise TypeError(
            f"model._component_={cfg_model.get('_component_')!r} built a {type(model).__name__}, "
            "not a MedcapModel (e.g. medcap.models.medcap_llama3_1_8b)"
        )
    return model


def check_tokenizer(tokenizer: Any, model: MedcapModel) -> None:
    """A tokenizer from another model would put its placeholders where the model
    looks for none: refuse the pair before any weight is read."""
    image_id = getattr(tokenizer, "image_id", None)
    if image_id != model.image_token_id:
        raise ValueError(
            f"the tokenizer's image id ({image_id}) is not the model's image_token_id "
            f"({model.image_token_id}): tokenizer and model do not belong together"
        )


def load_model(
    cfg_model: Mapping[str, Any],
    cfg_checkpointer: Mapping[str, Any],
    *,
    device: Union[str, torch.device],
    dtype: Union[str, torch.dtype],
    tokenizer: Any = None,
    vision_checkpoint: Optional[str] = None,
    train_vision: bool = False,
    vision_weights_follow: bool = False,
) -> MedcapModel:
    """The fused model, weights loaded, frozen as the caller needs.

    Args:
        cfg_model: the config's ``model`` section (``_component_`` + arguments).
        cfg_checkpointer: the config's ``checkpointer`` section; read are
            ``checkpoint_dir``, ``checkpoint_files`` (default: every
            ``*.safetensors``) and ``model_type`` (default ``LLAMA3``).
        device, dtype: where and in what to build (``dtype`` a name of :data:`DTYPES`).
        tokenizer: when given, its ``image_id`` must be the model's.
        vision_checkpoint: the trained vision tower + projector (``.safetensors`` or ``.pt``).
        train_vision: training: the vision side stays trainable (and only it,
            checked); otherwise everything is frozen and the model is in eval mode.
        vision_weights_follow: the caller loads the vision weights later (a
            resume), so ``vision_pretrained`` is not read either.
    """
    dtype = resolve_dtype(dtype)
    model = build_model(
        cfg_model, device=torch.device(device), dtype=dtype,
        skip_pretrained=bool(vision_checkpoint) or vision_weights_follow,
    )
    if tokenizer is not None:
        check_tokenizer(tokenizer, model)
    load_llama_weights(
        model,
        cfg_checkpointer["checkpoint_dir"],
        checkpoint_files=_plain(cfg_checkpointer.get("checkpoint_files")),
        model_type=cfg_checkpointer.get("model_type") or "LLAMA3",
    )
    if vision_checkpoint:
        load_vision_weights(model, vision_checkpoint)
        log.info("vision tower and projector loaded from %s", vision_checkpoint)
    elif not train_vision and not vision_weights_follow:
        log.warning("no vision checkpoint: the vision tower and projector are untrained; outputs mean little")

    model.requires_grad_(False)
    if train_vision:
        model.vision.requires_grad_(True)
        assert_only_vision_trainable(model)
    else:
        model.eval()
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log.info("model: %.1f M parameters, %.1f M trainable", n_all / 1e6, n_train / 1e6)
    return model
