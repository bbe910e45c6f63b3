"""Building blocks of the fine-tuning recipe (``recipes/full_finetune_single_device.py``,
which runs the loop and calls these): the typed config, the label-only loss, the
resumable sampler and data setup, the optimizers (incl. the step in backward), the
process world (FSDP2, gradient reduction), the checkpoint folder (lock, resume or
refuse), the resumable state and the stop on SIGINT/SIGTERM. Nothing here calls
back into a recipe."""

from medcap.training._config import TrainConfig
from medcap.training._dist import init_distributed_env, peak_memory_gib, shard_frozen_decoder
from medcap.training._loss import LabelTokenCrossEntropy, TrainForward, count_label_tokens
from medcap.training._optim import build_lr_scheduler, build_optimizer
from medcap.training._data import ResumableBatchSampler, setup_data, setup_dataset
from medcap.training._run import (
    RECIPE_STATE_FILE,
    StopSignals,
    atomic_write,
    capture_rng_state,
    check_vision_start,
    load_recipe_state,
    open_run_folder,
    restore_rng_state,
    save_recipe_state,
)

__all__ = [
    "LabelTokenCrossEntropy",
    "RECIPE_STATE_FILE",
    "ResumableBatchSampler",
    "StopSignals",
    "TrainConfig",
    "TrainForward",
    "atomic_write",
    "build_lr_scheduler",
    "build_optimizer",
    "capture_rng_state",
    "check_vision_start",
    "count_label_tokens",
    "init_distributed_env",
    "load_recipe_state",
    "open_run_folder",
    "peak_memory_gib",
    "restore_rng_state",
    "save_recipe_state",
    "setup_data",
    "setup_dataset",
    "shard_frozen_decoder",
]
