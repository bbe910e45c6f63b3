"""Building blocks of the fine-tuning recipe (``recipes/full_finetune_single_device.py``,
which runs the loop and calls these): the typed config, the label-only loss, the
resumable sampler and data setup, the optimizers (incl. the step in backward), the
process world (FSDP2, gradient reduction), the checkpoint folder (lock, resume or
refuse), the resumable state and the stop on SIGINT/SIGTERM. Nothing here calls
back into a recipe.

Names are resolved on first use (PEP 562), so that ``TrainConfig`` (and with it a
config's key check) loads without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from medcap import lazy_attrs

_EXPORTS = {
    "medcap.config": ["TrainConfig"],
    "medcap.training._data": ["ResumableBatchSampler", "setup_data", "setup_dataset"],
    "medcap.training._optim": [
        "LabelTokenCrossEntropy",
        "TrainForward",
        "build_lr_scheduler",
        "build_optimizer",
        "count_label_tokens",
    ],
    "medcap.training._run": [
        "RECIPE_STATE_FILE",
        "StopSignals",
        "atomic_write",
        "capture_rng_state",
        "check_vision_start",
        "init_distributed_env",
        "load_recipe_state",
        "open_run_folder",
        "peak_memory_gib",
        "restore_rng_state",
        "save_recipe_state",
        "shard_frozen_decoder",
    ],
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)

__getattr__, __dir__ = lazy_attrs(__name__, _WHERE)

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, eagerly
    from medcap.config import TrainConfig  # noqa: F401
    from medcap.training._data import ResumableBatchSampler, setup_data, setup_dataset  # noqa: F401
    from medcap.training._optim import (  # noqa: F401
        LabelTokenCrossEntropy,
        TrainForward,
        build_lr_scheduler,
        build_optimizer,
        count_label_tokens,
    )
    from medcap.training._run import (  # noqa: F401
        RECIPE_STATE_FILE,
        StopSignals,
        atomic_write,
        capture_rng_state,
        check_vision_start,
        init_distributed_env,
        load_recipe_state,
        open_run_folder,
        peak_memory_gib,
        restore_rng_state,
        save_recipe_state,
        shard_frozen_decoder,
    )
