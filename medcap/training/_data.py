"""The data side of a run: which samples each rank trains on, step by step, and the loader.

In order:

* ``ResumableBatchSampler``: an epoch's plan is a pure function of (seed, epoch, dataset
  size, global batch size): shuffled with a generator seeded ``seed + epoch``, padded to
  a multiple of the world size, cut into global batches of ``world_size * batch_size``,
  rank ``r`` taking positions ``r, r + W, ...`` of each (``DistributedSampler`` +
  ``DataLoader(batch_size=b)`` exactly). A resumed run starts the epoch at batch ``k``
  without loading the first ``k``. ``group_by_length`` sorts mega-batches of
  ``group_size`` global batches by length, then shuffles the batches' order;
* ``setup_dataset``: the config's dataset, its image-token count and size the model's;
* ``sample_lengths`` and ``setup_data``: the sampler and the ``DataLoader`` over it,
  with a generator of its own (see the recipe's resume).

Why not torchdata's ``StatefulDataLoader``: ``docs/internals.md``.
"""

from __future__ import annotations

import logging
import math
from functools import partial
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Sampler
from torchtune import config as tt_config

from medcap._io import progress
from medcap.config import ConfigError
from medcap.data import CROSS_ENTROPY_IGNORE_IDX, BadSample, collate_image_chat
from medcap.models import MedcapModel
from medcap.training._dist import DistEnv
from medcap.training._signals import ignore_sigint_in_worker

log = logging.getLogger("medcap.training")


class ResumableBatchSampler(Sampler[List[int]]):
    """A batch sampler with ``DistributedSampler`` semantics and an exact resume point.

    Args:
        num_samples: dataset size.
        batch_size: samples per batch on this rank.
        num_replicas / rank: the data-parallel world (1 / 0 on one device).
        shuffle: random order each epoch (seeded), else dataset order.
        seed: base seed; epoch ``e`` uses ``seed + e``.
        drop_last: drop the epoch's last global batch when it is incomplete
            (as torchtune's recipes do); else every rank still gets a batch of
            equal size (possibly under ``batch_size``).
        lengths: per-sample lengths, needed for ``group_by_length``.
        group_by_length: batch samples of similar length (see the module doc).
        group_size: global batches per mega-batch when grouping by length.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        lengths: Optional[Sequence[int]] = None,
        group_by_length: bool = False,
        group_size: int = 50,
    ):
        if num_samples < 1:
            raise ValueError("the dataset is empty: nothing to train on")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside a world of {num_replicas}")
        if group_by_length:
            if lengths is None:
                raise ValueError("group_by_length needs the samples' lengths")
            if len(lengths) != num_samples:
                raise ValueError(f"{len(lengths)} lengths for {num_samples} samples")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.lengths = list(lengths) if lengths is not None else None
        self.group_by_length = group_by_length
        self.group_size = max(1, int(group_size))
        self.epoch = 0
        self.start_batch = 0

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_replicas

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Plan epoch ``epoch`` and start it at batch ``start_batch`` (for resuming)."""
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def global_batches(self, epoch: Optional[int] = None) -> List[List[int]]:
        """The whole epoch's global batches (every rank's samples), in order."""
        epoch = self.epoch if epoch is None else epoch
        g = torch.Generator().manual_seed(self.seed + epoch)
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        W, B = self.num_replicas, self.global_batch_size
        padded = math.ceil(len(order) / W) * W
        while len(order) < padded:  # as DistributedSampler: repeat the first indices
            order += order[: padded - len(order)]

        if self.group_by_length:
            batches = []
            mega = B * self.group_size
            for start in range(0, len(order), mega):
                chunk = sorted(order[start : start + mega], key=lambda i: -self.lengths[i])
                batches += [chunk[j : j + B] for j in range(0, len(chunk), B)]
            # Only the last mega-batch can end in an incomplete batch; its size is
            # still a multiple of the world size, so every rank gets equal work.
            full = [x for x in batches if len(x) == B]
            partial = [x for x in batches if len(x) < B]
            perm = torch.randperm(len(full), generator=g).tolist() if self.shuffle else range(len(full))
            batches = [full[i] for i in perm]
            if partial and not self.drop_last:
                batches += partial
        else:
            batches = [order[j : j + B] for j in range(0, len(order), B)]
            if batches and len(batches[-1]) < B and self.drop_last:
                batches.pop()
        return batches

    def __iter__(self) -> Iterator[List[int]]:
        for gb in self.global_batches()[self.start_batch :]:
            yield gb[self.rank :: self.num_replicas]

    def __len__(self) -> int:
        """Batches this rank yields in the current epoch (after the resume skip)."""
        return max(0, self.batches_per_epoch() - self.start_batch)

    def batches_per_epoch(self) -> int:
        W, B = self.num_replicas, self.global_batch_size
        padded = math.ceil(self.num_samples / W) * W
        if self.group_by_length:
            return len(self.global_batches(self.epoch))
        return padded // B if self.drop_last else math.ceil(padded / B)

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_samples": self.num_samples,
            "global_batch_size": self.global_batch_size,
            "group_by_length": self.group_by_length,
            "group_size": self.group_size,
            "drop_last": self.drop_last,
            "epoch": self.epoch,
        }

    def check_resumable(self, state: dict) -> None:
        """Refuse to resume with a plan that would not replay the stopped run's order."""
        now = self.state_dict()
        diffs = [
            f"{k}: saved {state.get(k)!r}, now {now[k]!r}"
            for k in ("seed", "shuffle", "num_samples", "global_batch_size", "group_by_length", "group_size", "drop_last")
            if k in state and state[k] != now[k]
        ]
        if diffs:
            raise ConfigError(
                "cannot resume exactly: the data order differs from the stopped run's ("
                + "; ".join(diffs)
                + "). Keep seed, shuffle, dataset, batch_size x number of processes and "
                "group_by_length as they were."
            )


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
        collate_fn=partial(collate_image_chat, pad_id=pad_id, ignore_idx=CROSS_ENTROPY_IGNORE_IDX),
        pin_memory=env.device.type == "cuda",
        generator=generator,
        worker_init_fn=ignore_sigint_in_worker if num_workers > 0 else None,
    )
    return sampler, loader
