"""The data-parallel world a run lives in: one process, or torchrun's ranks.

In order:

* ``DistEnv``: world size, rank and device, with the few collectives a step needs
  (sum a few numbers, sum the vision side's gradients in one flat all-reduce, broadcast,
  compare replicas); every one is a no-op in a world of one;
* ``init_distributed_env``: join torchrun's process group (NCCL on CUDA, Gloo on CPU);
* ``shard_frozen_decoder``: FSDP2 over the frozen decoder's layers only;
* ``peak_memory_gib``: what a step's metrics report.

The design in one line: the frozen decoder is sharded, the trainable vision side is
replicated and its gradients summed, so every rank takes the same optimizer step.
Why (and why not FSDP on the vision side): ``docs/internals.md``.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, List

import torch
import torch.distributed as dist
from torch import nn

from medcap.config import ConfigError

log = logging.getLogger("medcap.training")


@dataclass
class DistEnv:
    """World size, rank and device, with collectives that are no-ops on one process."""

    device: torch.device
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    initialized_here: bool = field(default=False, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def sum_scalars(self, *values: float) -> List[float]:
        """Sum a few numbers over all ranks (one small all-reduce)."""
        t = torch.tensor(values, dtype=torch.float64, device=self._coll_device)
        self.all_reduce_sum(t)
        return t.tolist()

    def max_scalar(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._coll_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    @property
    def _coll_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def reduce_grads(self, params: Iterable[nn.Parameter]) -> None:
        """Sum gradients across ranks, in place; a missing gradient counts as zeros.

        One flat buffer (per dtype) keeps it to a few all-reduce calls. Every rank
        passes the same parameters in the same order, so the buffers line up.
        """
        if not self.distributed:
            return
        params = list(params)
        by_dtype = {}
        for p in params:
            by_dtype.setdefault(p.dtype, []).append(p)
        for dtype, group in by_dtype.items():
            flat = torch.cat(
                [
                    (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dtype)
                    for p in group
                ]
            )  # [sum of numels]
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for p in group:
                n = p.numel()
                chunk = flat[offset : offset + n].view_as(p)
                if p.grad is None:
                    p.grad = chunk.clone()
                else:
                    p.grad.copy_(chunk)
                offset += n

    def broadcast_params(self, params: Iterable[nn.Parameter], src: int = 0) -> None:
        """Make every rank's copy equal to rank ``src``'s."""
        if not self.distributed:
            return
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=src)

    def replicas_identical(self, params: Iterable[nn.Parameter]) -> bool:
        """True when every rank holds bit-identical copies of ``params`` (rank 0's
        copy is broadcast and compared; one result for all ranks)."""
        if not self.distributed:
            return True
        differ = 0.0
        with torch.no_grad():
            for p in params:
                ref = p.detach().clone()
                dist.broadcast(ref, src=0)
                if not torch.equal(ref, p.detach()):
                    differ = 1.0
        return self.max_scalar(differ) == 0.0

    def all_gather_object(self, obj: Any) -> List[Any]:
        if not self.distributed:
            return [obj]
        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def shutdown(self) -> None:
        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed_env(device: str = "cuda") -> DistEnv:
    """Join torchrun's process group: NCCL on CUDA, Gloo on CPU.

    Run directly (no ``torchrun``), it becomes a world of one, so the distributed
    recipe also runs as a single process.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _resolve_device(device, local_rank)
    here = False
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend)
        here = True
    if dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    return DistEnv(device=dev, world_size=world, rank=rank, local_rank=local_rank, initialized_here=here)


def _resolve_device(device: str, local_rank: int) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                "device=cuda but no CUDA device is available; pass device=cpu (and dtype=fp32) to run on the CPU"
            )
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    return dev


def shard_frozen_decoder(model: nn.Module, train_module: nn.Module, env: DistEnv) -> None:
    """FSDP2: shard each decoder layer; make ``train_module`` the FSDP root that
    leaves everything else (vision, embeddings, norm, output) replicated."""
    from torch.distributed.fsdp import fully_shard

    layers = model.decoder.layers
    for layer in layers:
        fully_shard(layer)
    sharded = {id(p) for layer in layers for p in layer.parameters()}
    ignored = {p for p in train_module.parameters() if id(p) not in sharded}
    fully_shard(train_module, ignored_params=ignored)
    n = sum(p.numel() for layer in layers for p in layer.parameters())
    log.info(
        "FSDP2: %d decoder layers sharded over %d ranks (%.1f M frozen parameters, %.1f M per rank)",
        len(layers),
        env.world_size,
        n / 1e6,
        n / 1e6 / env.world_size,
    )


def peak_memory_gib(device: torch.device, reset: bool = True) -> float:
    """CUDA: peak allocated since the last reset. CPU: the process's peak RSS so far."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return peak
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)
