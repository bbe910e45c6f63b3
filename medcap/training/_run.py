"""A run's life on disk and in the process: its checkpoint folder, its resumable state,
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
import random
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np
import torch

from medcap._fs import exclusive_lock, remove_stale_tmp
# one implementation for every atomic file write; re-exported for medcap.training's users
from medcap.checkpointing import atomic_write
from medcap.config import ConfigError

log = logging.getLogger("medcap.training")

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
        from medcap.models._vision import _resolve_open_clip_file

        return str(_resolve_open_clip_file(source))
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
