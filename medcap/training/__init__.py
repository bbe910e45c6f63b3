"""Logic shared by the single-device and distributed fine-tuning recipes: config
checks, model and data setup, the label-only loss, the resumable sampler, the
optimizers (incl. the step in backward), the training loop and its state, the
checkpoint folder (lock, resume or refuse) and the stop on SIGINT/SIGTERM."""

from medcap.training._config import (
    CHECKPOINT_FORMATS,
    DEFAULT_SAVE_LAST_EVERY_SECONDS,
    MEDCAP_CHAT_DATASET,
    TORCHTUNE_CHAT_DATASET,
    TrainSettings,
    check_config,
    resolve_dataset_config,
    resolve_loss_config,
)
from medcap.training._dist import DistEnv, init_distributed_env, shard_frozen_decoder, single_device_env
from medcap.training._loss import IGNORE_INDEX, LabelTokenCrossEntropy, TokenLoss, count_label_tokens
from medcap.training._optim import (
    InBackwardOptimizer,
    StandardOptimizer,
    build_lr_scheduler,
    build_optimizer,
    trainable_named_parameters,
)
from medcap.training._recipe import FinetuneRecipeBase, run_finetune
from medcap.training._run_dir import (
    RunFolder,
    check_vision_start,
    checkpoint_lock_path,
    open_run_folder,
    resume_mode,
    run_files,
)
from medcap.training._sampler import ResumableBatchSampler
from medcap.training._signals import StopSignals
from medcap.training._setup import (
    sample_lengths,
    setup_data,
    setup_dataset,
    setup_metric_logger,
    setup_model,
    training_dtype,
)
from medcap.training._state import (
    RECIPE_STATE_FILE,
    atomic_write,
    capture_rng_state,
    find_recipe_state,
    load_recipe_state,
    restore_rng_state,
    save_recipe_state,
)
from medcap.training._trainer import Trainer, TrainForward, peak_memory_gib

__all__ = [
    "CHECKPOINT_FORMATS",
    "DEFAULT_SAVE_LAST_EVERY_SECONDS",
    "DistEnv",
    "FinetuneRecipeBase",
    "IGNORE_INDEX",
    "InBackwardOptimizer",
    "LabelTokenCrossEntropy",
    "MEDCAP_CHAT_DATASET",
    "RECIPE_STATE_FILE",
    "ResumableBatchSampler",
    "RunFolder",
    "StandardOptimizer",
    "StopSignals",
    "TORCHTUNE_CHAT_DATASET",
    "TokenLoss",
    "TrainForward",
    "TrainSettings",
    "Trainer",
    "atomic_write",
    "build_lr_scheduler",
    "build_optimizer",
    "capture_rng_state",
    "check_config",
    "check_vision_start",
    "checkpoint_lock_path",
    "count_label_tokens",
    "find_recipe_state",
    "init_distributed_env",
    "load_recipe_state",
    "open_run_folder",
    "peak_memory_gib",
    "resolve_dataset_config",
    "resolve_loss_config",
    "restore_rng_state",
    "resume_mode",
    "run_files",
    "run_finetune",
    "sample_lengths",
    "save_recipe_state",
    "setup_data",
    "setup_dataset",
    "setup_metric_logger",
    "setup_model",
    "shard_frozen_decoder",
    "single_device_env",
    "trainable_named_parameters",
    "training_dtype",
]
