"""Building blocks of the fine-tuning recipe (``recipes/full_finetune_single_device.py``,
which runs the loop and calls these; nothing here calls back into a recipe):

* ``_loss``: the label-only loss, and ``TrainForward`` (forward + loss, one module);
* ``_optim``: the optimizers (incl. the step in backward) and the lr schedule;
* ``_data``: the resumable batch plan, the dataset and the loader;
* ``_dist``: the process world (one process or torchrun's ranks, FSDP2, collectives);
* ``_start``: the checkpoint folder (lock, resume or refuse) and the vision tower's start;
* ``_state``: the resumable state file and the random generators in it;
* ``_describe``: what a checkpoint records so that it can be used alone;
* ``_signals``: the stop on SIGINT/SIGTERM at a step boundary.

``TrainConfig`` (``medcap.config``), ``progress`` and ``DiskFullError`` (``medcap._io``)
are exported here too, for the recipe. Names are resolved on first use (PEP 562), so that
``TrainConfig`` (and with it a config's key check) loads without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from medcap import lazy_attrs

_EXPORTS = {
    "medcap.config": ["TrainConfig"],
    "medcap._io": ["DiskFullError", "progress"],
    "medcap.training._data": ["ResumableBatchSampler", "setup_data", "setup_dataset"],
    "medcap.training._describe": ["describe_model", "training_summary"],
    "medcap.training._dist": ["init_distributed_env", "peak_memory_gib", "shard_frozen_decoder"],
    "medcap.training._loss": ["LabelTokenCrossEntropy", "TrainForward", "count_label_tokens"],
    "medcap.training._optim": ["build_lr_scheduler", "build_optimizer"],
    "medcap.training._signals": ["StopSignals"],
    "medcap.training._start": ["check_vision_start", "open_run_folder"],
    "medcap.training._state": [
        "RECIPE_STATE_FILE",
        "capture_rng_state",
        "load_recipe_state",
        "restore_rng_state",
        "save_recipe_state",
    ],
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)

__getattr__, __dir__ = lazy_attrs(__name__, _WHERE)

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, eagerly
    from medcap._io import DiskFullError, progress  # noqa: F401
    from medcap.config import TrainConfig  # noqa: F401
    from medcap.training._data import ResumableBatchSampler, setup_data, setup_dataset  # noqa: F401
    from medcap.training._describe import describe_model, training_summary  # noqa: F401
    from medcap.training._dist import init_distributed_env, peak_memory_gib, shard_frozen_decoder  # noqa: F401
    from medcap.training._loss import LabelTokenCrossEntropy, TrainForward, count_label_tokens  # noqa: F401
    from medcap.training._optim import build_lr_scheduler, build_optimizer  # noqa: F401
    from medcap.training._signals import StopSignals  # noqa: F401
    from medcap.training._start import check_vision_start, open_run_folder  # noqa: F401
    from medcap.training._state import (  # noqa: F401
        RECIPE_STATE_FILE,
        capture_rng_state,
        load_recipe_state,
        restore_rng_state,
        save_recipe_state,
    )
