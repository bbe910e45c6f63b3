"""The resumable state of a run (``recipe_state.pt``) and the random generators in it.

In order:

* ``capture_rng_state`` / ``restore_rng_state``: every generator a step may draw
  from (torch, CUDA, Python, numpy), as plain values;
* ``save_recipe_state`` / ``load_recipe_state``: the file, written atomically after the
  step's weights file, read with ``torch.load(weights_only=True)`` (no code unpickled);
* ``find_recipe_state``: where a resumed run looks for it.

The recipe decides what goes in (optimizer, progress, data position, generators and
the trainable weights themselves, so the state never pairs with weights of another
step): ``FullFinetuneRecipe.state_dict``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch

from medcap._io import atomic_write
from medcap.config import ConfigError

RECIPE_STATE_FILE = "recipe_state.pt"
STATE_FORMAT_VERSION = 1


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
        raise ConfigError(f"{str(path)!r} is not a readable recipe state ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or state.get("format_version") != STATE_FORMAT_VERSION:
        raise ConfigError(
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
