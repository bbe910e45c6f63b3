"""How a run starts, before anything is built: its checkpoint folder and its vision tower.

In order:

* ``open_run_folder``: lock the folder for the whole run (a lock file *beside* it,
  ``.NAME.lock``), remove the temporary files a killed write left, decide whether this
  run resumes (``resume_from_checkpoint``: no, yes, or auto), and refuse, changing
  nothing, a new run in a folder that holds another run's files unless
  ``overwrite=True``, which deletes them first;
* ``check_vision_start``: where the vision tower's weights come from (the recipe
  state, a vision checkpoint, BiomedCLIP's weights, fetched now when ``hf-hub:``);
  a random tower is refused unless ``vision_random_init=True``.

Why one run per folder: ``docs/internals.md``.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional

from medcap._io import exclusive_lock, remove_stale_tmp
from medcap.config import ConfigError
from medcap.training._state import RECIPE_STATE_FILE, find_recipe_state

log = logging.getLogger("medcap.training")

# ---- The folder

# weights in either format, the safetensors files' JSON sidecars, the resumable state
_RUN_FILE_PATTERNS = ("meta_model_*.safetensors", "meta_model_*.pt", "meta_model_*.json", RECIPE_STATE_FILE)


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


# ---- Where the vision tower starts

_NO_VISION_SOURCE = (
    "the vision tower would start from random weights. Give model.vision_pretrained "
    "(BiomedCLIP's open_clip_pytorch_model.bin, a folder holding it, or "
    "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224), or vision_checkpoint "
    "(a medcap or reference vision checkpoint). To train a random tower on purpose, set "
    "vision_random_init=True."
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
