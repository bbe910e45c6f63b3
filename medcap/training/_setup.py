"""Building the data pieces a recipe needs from its config (dataset, sampler, loader) and
its metric logger."""

from __future__ import annotations

import logging
from functools import partial
from typing import Any, Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from torchtune import config as tt_config

from medcap._progress import progress
from medcap.data import BadSample, collate_image_chat
from medcap.models import MedcapModel
from medcap.training._dist import DistEnv
from medcap.training._loss import IGNORE_INDEX
from medcap.training._sampler import ResumableBatchSampler
from medcap.training._signals import ignore_sigint_in_worker

log = logging.getLogger("medcap.training")


def setup_dataset(cfg_dataset: DictConfig, tokenizer, model: MedcapModel):
    """Instantiate ``cfg.dataset`` with the image-token count and image size taken from
    the model, so that they cannot disagree."""
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
            with progress(len(dataset), "sample lengths", "samples") as bar:
                for i in range(len(dataset)):
                    try:
                        n = dataset.tokenize(dataset.parse(i)).full_length
                    except BadSample:
                        n = 0
                    lengths.append(min(n, cap) if cap else n)
                    bar.update(1)
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


def setup_metric_logger(cfg_logger: Optional[Dict[str, Any]], output_dir: str, env: DistEnv):
    """``metric_logger`` (torchtune's loggers: DiskLogger in ``{output_dir}/logs`` by default,
    TensorBoardLogger, ...) on rank 0; other ranks log nothing."""
    if not env.is_main:
        return _NullLogger()
    section = cfg_logger or {"_component_": "torchtune.training.metric_logging.DiskLogger", "log_dir": f"{output_dir}/logs"}
    return tt_config.instantiate(OmegaConf.create(section))
