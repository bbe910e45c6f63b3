"""Building the pieces a recipe needs from its config: model, data, metric logger."""

from __future__ import annotations

import logging
from functools import partial
from typing import Any, Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.utils.data import DataLoader
from torchtune import config as tt_config
from torchtune import training as tt_training
from tqdm import tqdm

from medcap.checkpointing import load_llama_weights, load_vision_weights
from medcap.data import BadSample, collate_image_chat
from medcap.models import MedcapModel, assert_only_vision_trainable
from medcap.training._config import resolve_dataset_config
from medcap.training._dist import DistEnv
from medcap.training._loss import IGNORE_INDEX
from medcap.training._sampler import ResumableBatchSampler
from medcap.training._signals import ignore_sigint_in_worker

log = logging.getLogger("medcap.training")


def training_dtype(name: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def setup_model(
    cfg_model: DictConfig,
    cfg_checkpointer: DictConfig,
    *,
    device: torch.device,
    dtype: torch.dtype,
    vision_checkpoint: Optional[str] = None,
    enable_activation_checkpointing: bool = False,
    vision_weights_follow: bool = False,
) -> MedcapModel:
    """Build the fused model in ``dtype`` on ``device``, load the LLM from the HF
    checkpoint folder (and the vision side from ``vision_checkpoint`` when given),
    freeze everything but the vision tower and projector, and check that.

    ``vision_weights_follow``: the vision weights will be loaded later (resume),
    so BiomedCLIP's pretrained weights (``model.vision_pretrained``) are not read.
    """
    overrides: Dict[str, Any] = {}
    if (vision_checkpoint or vision_weights_follow) and cfg_model.get("vision_pretrained"):
        # They would be overwritten at once; skipping them also avoids a download.
        log.info("model.vision_pretrained not read: the vision weights come from a checkpoint")
        overrides["vision_pretrained"] = None
    with tt_training.set_default_dtype(dtype), device:
        model = tt_config.instantiate(cfg_model, **overrides)
    if not isinstance(model, MedcapModel):
        raise TypeError(
            f"model._component_={cfg_model.get('_component_')!r} built a {type(model).__name__}; "
            "the recipes train a MedcapModel (e.g. medcap.models.medcap_llama3_1_8b)"
        )
    files = cfg_checkpointer.get("checkpoint_files")
    if isinstance(files, (ListConfig, DictConfig)):
        files = OmegaConf.to_container(files, resolve=True)
    info = load_llama_weights(
        model,
        cfg_checkpointer.checkpoint_dir,
        checkpoint_files=files,
        model_type=cfg_checkpointer.get("model_type", "LLAMA3"),
    )
    log.info("LLM weights loaded from %s (%s tensors)", info.get("checkpoint_dir"), info.get("num_tensors"))
    if vision_checkpoint:
        load_vision_weights(model, vision_checkpoint)
        log.info("vision tower and projector loaded from %s", vision_checkpoint)

    model.requires_grad_(False)
    model.vision.requires_grad_(True)
    assert_only_vision_trainable(model)

    if enable_activation_checkpointing:
        from torchtune.modules import TransformerSelfAttentionLayer

        # Only the decoder layers: they hold nearly all activations of a long sequence.
        tt_training.set_activation_checkpointing(model.decoder, auto_wrap_policy={TransformerSelfAttentionLayer})
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log.info("model: %.1f M parameters, %.1f M trainable (vision tower + projector)", n_all / 1e6, n_train / 1e6)
    return model


def setup_dataset(cfg_dataset: DictConfig, tokenizer, model: MedcapModel):
    """Instantiate ``cfg.dataset`` (torchtune's chat_dataset becomes medcap's), with the
    image-token count and image size taken from the model so they cannot disagree."""
    cfg_dataset, _ = resolve_dataset_config(cfg_dataset)
    if getattr(tokenizer, "image_id", None) != model.image_token_id:
        raise ValueError(
            f"the tokenizer's image id ({getattr(tokenizer, 'image_id', None)}) is not the model's "
            f"image_token_id ({model.image_token_id}): tokenizer and model do not belong together"
        )
    kwargs: Dict[str, Any] = {}
    for key, value in (("num_image_tokens", model.num_image_tokens), ("image_size", model.vision.visual.image_size)):
        given = cfg_dataset.get(key)
        if given is None:
            kwargs[key] = value
        elif int(given) != int(value):
            raise ValueError(f"dataset.{key}={given} but the model's is {value}; leave dataset.{key} out")
    return tt_config.instantiate(cfg_dataset, tokenizer, **kwargs)


def sample_lengths(dataset, env: DistEnv) -> List[int]:
    """Token length of every sample (text only, no image decoding), for length grouping.
    Computed on rank 0 and shared; a bad record counts as length 0 (it will be skipped)."""
    lengths = None
    if env.is_main:
        if hasattr(dataset, "lengths"):
            lengths = list(dataset.lengths)
        else:
            cap = getattr(dataset, "max_seq_len", None)
            lengths = []
            for i in tqdm(range(len(dataset)), desc="sample lengths", unit="sample", mininterval=2.0):
                try:
                    n = dataset.tokenize(dataset.parse(i)).full_length
                except BadSample:
                    n = 0
                lengths.append(min(n, cap) if cap else n)
    return env.broadcast_object(lengths)


def setup_data(
    dataset,
    *,
    env: DistEnv,
    batch_size: int,
    shuffle: bool,
    seed: int,
    pad_id: int,
    num_workers: int = 0,
    group_by_length: bool = False,
    drop_last: bool = True,
) -> Tuple[ResumableBatchSampler, DataLoader]:
    lengths = sample_lengths(dataset, env) if group_by_length else None
    sampler = ResumableBatchSampler(
        len(dataset),
        batch_size,
        num_replicas=env.world_size,
        rank=env.rank,
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
        lengths=lengths,
        group_by_length=group_by_length,
    )
    if sampler.batches_per_epoch() == 0:
        raise ValueError(
            f"{len(dataset)} samples make no full batch of {batch_size} x {env.world_size} process(es); "
            "lower batch_size or add data"
        )
    # The loader's own generator: making an epoch's iterator draws the workers' base seed
    # from it instead of from the global RNG, which dropout and augmentation also use;
    # the trainer saves its state so that a resumed epoch draws the same seed.
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=partial(collate_image_chat, pad_id=pad_id, ignore_idx=IGNORE_INDEX),
        pin_memory=env.device.type == "cuda",
        generator=generator,
        worker_init_fn=ignore_sigint_in_worker if num_workers > 0 else None,
    )
    return sampler, loader


class _NullLogger:
    """What ranks other than 0 log to."""

    def log(self, *a, **k) -> None:
        pass

    def log_dict(self, *a, **k) -> None:
        pass

    def log_config(self, *a, **k) -> None:
        pass

    def close(self) -> None:
        pass


def setup_metric_logger(cfg: DictConfig, env: DistEnv):
    """``cfg.metric_logger`` (torchtune's loggers: DiskLogger by default, TensorBoardLogger,
    ...) on rank 0; other ranks log nothing."""
    if not env.is_main:
        return _NullLogger()
    cfg_logger = cfg.get("metric_logger") or OmegaConf.create(
        {"_component_": "torchtune.training.metric_logging.DiskLogger", "log_dir": f"{cfg.output_dir}/logs"}
    )
    logger = tt_config.instantiate(cfg_logger)
    try:
        logger.log_config(cfg)
    except Exception as e:  # saving the config copy is a convenience, not a reason to stop
        log.warning("could not save the config beside the logs: %s", e)
    return logger
