"""The run around the training loop: its process world (one process or torchrun's ranks),
its checkpoint folder, its resumable state and its stop on a signal.

The data-parallel world a recipe runs in (one process, or torchrun's ranks).

Distributed design (the reference's defect was that every rank trained its own
vision copy):

* The frozen LLM's decoder layers are sharded with FSDP2 (``fully_shard``); each
  layer gathers its weights for forward and again for backward (the gradient
  must flow through it to the vision side), then frees them.
* The vision tower and projector are *replicated*: each rank holds the full
  trainable weights, identical at start (broadcast from rank 0), and after every
  backward the gradients are summed across ranks in one flat all-reduce, so the
  same optimizer step runs everywhere and the copies never drift. We chose this
  over sharding the vision side because (a) a rank whose batch holds no image
  never calls the vision encoder, which with FSDP would leave the other ranks
  waiting in an all-gather forever, while here it simply contributes zeros;
  (b) rank 0 can save weights and optimizer state without any collective. The
  cost is one copy of the vision weights, gradients and optimizer state per
  rank (~0.9 B parameters at the real sizes).
* The token embedding, final norm and output projection stay replicated too
  (frozen, no communication): the loss projects a data-dependent number of
  chunks, and a sharded output layer would need the same number of gathers on
  every rank.

A run's life on disk and in the process: its checkpoint folder, its resumable state,
and its stop on Ctrl-C/SIGTERM.

**The folder.** One run per checkpoint folder, one writer at a time:

* ``resume_from_checkpoint``: ``False`` (a new run), ``True`` (continue; the state
  must exist) or ``auto`` (continue when resumable state exists, else start a new
  run), so that a job script can repeat the same line after a preemption.
* A new run refuses a folder that already holds a run's files (``meta_model_*``
  weights and sidecars, ``recipe_state.pt``) unless ``overwrite=True``, which deletes
  them first: the checkpoints of two runs are never mixed in one folder.
* The folder is locked for the whole run by a lock file *beside* it
  (``.NAME.lock`` in its parent), so the folder itself holds only checkpoints.
* Temporary files of atomic writes that a killed run left behind are removed.
* A random vision tower is refused unless asked for (``check_vision_start``).

**The state** (``recipe_state.pt``): optimizer, progress, data position, random
states and the trainable weights themselves, so that the state can never pair
with weights of another step. It is written atomically after the step's weights
file. Everything is plain tensors and containers: it loads with
``torch.load(weights_only=True)``, so no code is unpickled on resume.

**Signals.** A scheduler's preemption (SIGTERM) or a user's Ctrl-C (SIGINT) would
otherwise lose everything since the last periodic save. While training runs, the
first of either signal only raises a flag; the loop sees it at the next step
boundary, writes ``meta_model_last`` + ``recipe_state.pt`` and returns. A second
one of the same signal acts as it did before training (Ctrl-C twice stops at once).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import resource
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from medcap._io import atomic_write, exclusive_lock, remove_stale_tmp
from medcap.config import ConfigError


# ---- The process world -----------------------------------------------------------

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


# ---- The run's folder, state and signals -----------------------------------------

RECIPE_STATE_FILE = "recipe_state.pt"
STATE_FORMAT_VERSION = 1
# weights in either format, the safetensors files' JSON sidecars, the resumable state
_RUN_FILE_PATTERNS = ("meta_model_*.safetensors", "meta_model_*.pt", "meta_model_*.json", RECIPE_STATE_FILE)
_NO_VISION_SOURCE = (
    "the vision tower would start from random weights. Give model.vision_pretrained "
    "(BiomedCLIP's open_clip_pytorch_model.bin, a folder holding it, or "
    "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224), or vision_checkpoint "
    "(a medcap or reference vision checkpoint). To train a random tower on purpose, set "
    "vision_random_init=True."
)


def checkpoint_lock_path(folder: Path) -> Path:
    """The lock file of a checkpoint folder: beside it, so the folder holds only checkpoints."""
    folder = Path(folder).resolve()
    return folder.parent / f".{folder.name}.lock"


def run_files(folder: Path) -> List[Path]:
    """The files by which a folder holds a run (weights or resumable state)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = {p for pattern in _RUN_FILE_PATTERNS for p in folder.glob(pattern) if p.is_file()}
    return sorted(found)


class UsedFolderError(ConfigError, FileExistsError):
    """A new run would mix its checkpoints with another run's: a user error (one line)."""


@dataclass
class RunFolder:
    """What :func:`open_run_folder` decided (rank 0), shared with every rank."""

    resuming: bool
    state_path: str


def open_run_folder(
    folder: Path,
    *,
    resume: str,
    overwrite: bool,
    recipe_checkpoint: Optional[str],
    stack: contextlib.ExitStack,
    before_claim: Optional[Callable[[bool], Any]] = None,
) -> RunFolder:
    """Lock ``folder`` (held until ``stack`` closes), remove stale temporary files and
    decide whether this run resumes. Refuses, changing nothing, when a new run would
    mix its checkpoints with another run's. ``before_claim(resuming)`` runs the other
    checks before ``overwrite`` deletes anything."""
    folder = Path(folder)
    if overwrite and resume != "no":
        raise ConfigError(
            "overwrite=True starts a new run and deletes the old one's checkpoints; it cannot go "
            "with resume_from_checkpoint=True or auto"
        )
    stack.enter_context(
        exclusive_lock(
            checkpoint_lock_path(folder),
            f"the checkpoint folder {folder}",
            "two training runs must not write the same checkpointer.output_dir",
        )
    )
    for p in remove_stale_tmp(folder):
        log.info("removed %s, left by an interrupted write", p)
    state_path = find_recipe_state(folder, recipe_checkpoint)
    if resume == "yes" and not state_path.is_file():
        raise FileNotFoundError(
            f"resume_from_checkpoint=True but there is no resumable state at {str(state_path)!r}. "
            "Start without it for a new run, or use resume_from_checkpoint=auto (continues when "
            "the state exists, starts a new run otherwise)."
        )
    resuming = resume == "yes" or (resume == "auto" and state_path.is_file())
    if resume == "auto":
        if resuming:
            log.info("resume_from_checkpoint=auto: continuing the run in %s", state_path)
        else:
            log.info("resume_from_checkpoint=auto: no resumable state at %s, starting a new run", state_path)
    if before_claim is not None:
        before_claim(resuming)
    if not resuming:
        _claim_for_new_run(folder, overwrite=overwrite, auto=resume == "auto")
    return RunFolder(resuming=resuming, state_path=str(state_path))


def _claim_for_new_run(folder: Path, *, overwrite: bool, auto: bool) -> None:
    existing = run_files(folder)
    if not existing:
        return
    if overwrite:
        for p in existing:
            p.unlink()
            log.warning("overwrite=True: deleted %s of the earlier run", p)
        return
    names = ", ".join(p.name for p in existing)
    why = "holds checkpoints but no resumable state" if auto else "already holds a run"
    continue_hint = "" if auto else " Continue that run with resume_from_checkpoint=True (or auto);"
    raise UsedFolderError(
        f"checkpointer.output_dir={str(folder)!r} {why} ({names}); nothing was changed."
        f"{continue_hint} start over with overwrite=True (deletes those files), or choose another "
        "checkpointer.output_dir."
    )


def check_vision_start(cfg: Any, *, resuming: bool) -> str:
    """Where the vision tower's weights come from; refuses a random tower unless
    ``vision_random_init=True``. Local files are checked here, before anything is built;
    an ``hf-hub:`` ``model.vision_pretrained`` is fetched now and replaced by the local file.
    ``cfg``: a ``TrainConfig`` (or anything with those attributes and a ``model`` mapping)."""
    random_ok = getattr(cfg, "vision_random_init", False)
    if not isinstance(random_ok, bool):
        raise ConfigError(f"vision_random_init must be True or False, got {random_ok!r}")
    if resuming:
        return "the recipe state"
    checkpoint = getattr(cfg, "vision_checkpoint", None)
    if checkpoint:
        if not Path(checkpoint).exists():
            raise FileNotFoundError(f"vision_checkpoint={checkpoint!r}: no such file")
        return f"vision_checkpoint {checkpoint}"
    pretrained = cfg.model.get("vision_pretrained")
    if pretrained:
        local = _fetch_pretrained(str(pretrained))
        if local != str(pretrained):
            cfg.model["vision_pretrained"] = local  # the tower reads the fetched file
        return f"model.vision_pretrained {pretrained}"
    if not random_ok:
        raise ConfigError(_NO_VISION_SOURCE)
    log.warning("vision_random_init=True: the vision tower starts from random weights")
    return "random weights (vision_random_init=True)"


def _fetch_pretrained(source: str) -> str:
    """A local path to BiomedCLIP's weights: an ``hf-hub:`` name is fetched now, so that
    a failed download stops the run before the 8B model is built."""
    if source.startswith("hf-hub:"):
        from medcap.models import open_clip_weights_file

        return str(open_clip_weights_file(source))
    path = Path(source)
    if path.is_dir():
        path = path / "open_clip_pytorch_model.bin"
    if not path.is_file():
        raise FileNotFoundError(
            f"model.vision_pretrained={source!r}: {str(path)!r} not found (BiomedCLIP's "
            "open_clip_pytorch_model.bin, a folder holding it, or an hf-hub: name)"
        )
    return source


# --------------------------------------------------------------------------- the state file


def capture_rng_state() -> Dict[str, Any]:
    """Every random generator a training step may draw from, as plain values."""
    np_state = np.random.get_state()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # numpy's state holds an ndarray; keep it as a tensor so weights_only loading works
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def save_recipe_state(path: Union[str, Path], state: Dict[str, Any]) -> Path:
    """Write the resumable state atomically (``torch.save`` of plain containers)."""
    payload = dict(state)
    payload["format_version"] = STATE_FORMAT_VERSION
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_recipe_state(path: Union[str, Path]) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"resume_from_checkpoint=True but there is no resumable state at {str(path)!r}. "
            "It is written beside the checkpoints (checkpointer.output_dir) at every "
            "meta_model_* save; start without resume_from_checkpoint to begin a new run."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{str(path)!r} is not a readable recipe state ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or state.get("format_version") != STATE_FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} is not a medcap recipe state of version {STATE_FORMAT_VERSION} "
            f"(found {state.get('format_version') if isinstance(state, dict) else type(state).__name__})"
        )
    return state


def find_recipe_state(output_dir: Union[str, Path], explicit: Optional[str] = None) -> Path:
    """Where to resume from: ``checkpointer.recipe_checkpoint`` when set, else the default file."""
    if explicit:
        p = Path(explicit)
        return p if p.is_absolute() or p.exists() else Path(output_dir) / p
    return Path(output_dir) / RECIPE_STATE_FILE


# --------------------------------------------------------------------------- signals

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Context manager: catch SIGINT/SIGTERM as a stop request (``received``: the signal number)."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        # Python lets only the main thread install handlers; elsewhere signals keep their default.
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
        log.warning(
            "%s received: saving at the end of this step, then stopping (send it again to stop at once, "
            "losing the steps since the last save)",
            signal.Signals(signum).name,
        )


def ignore_sigint_in_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: Ctrl-C reaches the whole process group; a worker that
    died of it would break the batch the main process still needs to finish its step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
