"""What the single-device and distributed recipes share: every ``_setup_*`` step.

The recipe files subclass :class:`FinetuneRecipeBase` and override only what
differs: how the process joins its world (``_setup_env``), how the model is laid
over the devices (``_setup_forward``), and cleanup. Everything else is one code
path, so the two recipes cannot drift apart.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Dict, Optional, Type

import torch
from omegaconf import DictConfig
from torchtune import config as tt_config
from torchtune import training as tt_training

from medcap.training._config import TrainSettings, check_config, resolve_loss_config
from medcap.training._dist import DistEnv
from medcap.training._optim import build_lr_scheduler, build_optimizer
from medcap.training._run_dir import RunFolder, check_vision_start, open_run_folder, resume_mode
from medcap.training._setup import setup_data, setup_dataset, setup_metric_logger, setup_model, training_dtype
from medcap.training._state import load_recipe_state
from medcap.training._trainer import Trainer, TrainForward

log = logging.getLogger("medcap.training")


class FinetuneRecipeBase:
    """Fine-tune the vision tower and projector of a MedcapModel with the LLM frozen."""

    recipe_name = "full_finetune"
    distributed = False

    def __init__(self, cfg: DictConfig) -> None:
        check_config(cfg, distributed=self.distributed)
        self._env = self._setup_env(cfg)
        self._device = self._env.device
        self._dtype = training_dtype(cfg.get("dtype", "bf16"))
        self.settings = TrainSettings.from_config(cfg)
        self.seed = tt_training.set_seed(seed=cfg.get("seed"))
        self._trainer: Optional[Trainer] = None
        self._metric_logger = None
        # Holds the checkpoint folder's lock from here until cleanup().
        self._run_lock = contextlib.ExitStack()
        try:
            self._run = self._open_run_folder(cfg)
        except BaseException:
            self._run_lock.close()
            raise

    def _open_run_folder(self, cfg: DictConfig) -> RunFolder:
        """Rank 0 locks and inspects the checkpoint folder, then tells every rank whether
        the run resumes; each rank checks where its vision tower starts."""
        resume = resume_mode(cfg.get("resume_from_checkpoint", False))
        overwrite = cfg.get("overwrite", False)
        if not isinstance(overwrite, bool):
            raise ValueError(f"overwrite must be True or False, got {overwrite!r}")
        outcome: Any = None
        if self._env.is_main:
            try:
                outcome = open_run_folder(
                    self.settings.checkpoint_dir,
                    resume=resume,
                    overwrite=overwrite,
                    recipe_checkpoint=cfg.checkpointer.get("recipe_checkpoint"),
                    stack=self._run_lock,
                    before_claim=lambda resuming: check_vision_start(cfg, resuming=resuming),
                )
            except Exception as e:
                self._env.broadcast_object(f"{type(e).__name__}: {e}")
                raise
        outcome = self._env.broadcast_object(outcome)
        if isinstance(outcome, str):
            raise RuntimeError(f"rank 0 stopped: {outcome}")
        if not self._env.is_main:
            check_vision_start(cfg, resuming=outcome.resuming)
        return outcome

    # ------------------------------------------------------------------ per component

    def _setup_env(self, cfg: DictConfig) -> DistEnv:
        raise NotImplementedError

    def _setup_metric_logger(self, cfg: DictConfig):
        return setup_metric_logger(cfg, self._env)

    def _setup_resume(self, cfg: DictConfig) -> Optional[Dict[str, Any]]:
        if not self._run.resuming:
            return None
        path = self._run.state_path
        state = load_recipe_state(path)
        log.info("resuming from %s (global step %d)", path, state["global_step"])
        return state

    def _setup_tokenizer(self, cfg_tokenizer: DictConfig):
        return tt_config.instantiate(cfg_tokenizer)

    def _setup_model(self, cfg: DictConfig, resuming: bool):
        vision_checkpoint = cfg.get("vision_checkpoint")
        if resuming and vision_checkpoint:
            log.info("resuming: the vision weights come from the recipe state, not vision_checkpoint")
            vision_checkpoint = None
        return setup_model(
            cfg.model,
            cfg.checkpointer,
            device=self._device,
            dtype=self._dtype,
            vision_checkpoint=vision_checkpoint,
            enable_activation_checkpointing=cfg.get("enable_activation_checkpointing", False),
            vision_weights_follow=resuming,
        )

    def _setup_loss(self, cfg_loss: Optional[DictConfig]):
        return tt_config.instantiate(resolve_loss_config(cfg_loss))

    def _setup_forward(self, model, loss_fn) -> torch.nn.Module:
        return TrainForward(model, loss_fn)

    def _setup_optimizer(self, cfg_optimizer: DictConfig, optimizer_in_bwd: bool):
        return build_optimizer(cfg_optimizer, self._model, optimizer_in_bwd=optimizer_in_bwd)

    def _setup_data(self, cfg: DictConfig, seed: int):
        dataset = setup_dataset(cfg.dataset, self._tokenizer, self._model)
        sampler, loader = setup_data(
            dataset,
            env=self._env,
            batch_size=cfg.batch_size,
            shuffle=cfg.get("shuffle", True),
            seed=seed,
            pad_id=self._tokenizer.pad_id,
            num_workers=cfg.get("num_workers", 0),
            group_by_length=cfg.get("group_by_length", False),
        )
        return dataset, sampler, loader

    def _setup_lr_scheduler(self, cfg_lr_scheduler: Optional[DictConfig], steps_per_epoch: int):
        return build_lr_scheduler(
            cfg_lr_scheduler,
            self._optimizer,
            num_training_steps=self.settings.epochs * steps_per_epoch,
        )

    # ------------------------------------------------------------------ the run

    def setup(self, cfg: DictConfig) -> None:
        self._metric_logger = self._setup_metric_logger(cfg)
        state = self._setup_resume(cfg)
        seed = int(state["seed"]) if state is not None else self.seed  # the data order is the stopped run's
        self._tokenizer = self._setup_tokenizer(cfg.tokenizer)
        self._model = self._setup_model(cfg, resuming=state is not None)
        self._loss_fn = self._setup_loss(cfg.get("loss"))
        self._forward = self._setup_forward(self._model, self._loss_fn)
        self._optimizer = self._setup_optimizer(cfg.optimizer, cfg.get("optimizer_in_bwd", False))
        self._dataset, self._sampler, self._dataloader = self._setup_data(cfg, seed)
        self._trainer = Trainer(
            model=self._model,
            forward=self._forward,
            optimizer=self._optimizer,
            lr_scheduler=None,
            sampler=self._sampler,
            dataloader=self._dataloader,
            metric_logger=self._metric_logger,
            env=self._env,
            settings=self.settings,
            dtype=self._dtype,
            seed=seed,
            pad_id=self._tokenizer.pad_id,
            skip_log=getattr(self._dataset, "skip_log", None),
            checkpoint_metadata={"vision": cfg.get("vision", "biomedclip"), "recipe": self.recipe_name},
        )
        self._lr_scheduler = self._setup_lr_scheduler(cfg.get("lr_scheduler"), self._trainer.steps_in_epoch())
        self._trainer.lr_scheduler = self._lr_scheduler
        if state is not None:
            self._trainer.load_state_dict(state)
        if self._env.is_main:
            log.info(
                "%d samples, %d steps per epoch (batch %d x %d process(es) x %d accumulation), checkpoints in %s",
                len(self._dataset),
                self._trainer.steps_in_epoch(),
                self.settings.batch_size,
                self._env.world_size,
                self.settings.gradient_accumulation_steps,
                self.settings.checkpoint_dir,
            )

    def train(self) -> Dict[str, Any]:
        return self._trainer.train()

    def cleanup(self) -> None:
        """Close the logger and release the checkpoint folder (safe to call twice)."""
        if self._metric_logger is not None:
            self._metric_logger.close()
            self._metric_logger = None
        self._run_lock.close()


def run_finetune(recipe_cls: Type[FinetuneRecipeBase], cfg: DictConfig) -> None:
    """The body of each fine-tuning recipe's ``recipe_main``: logging, setup, train, cleanup.

    A run stopped by SIGINT/SIGTERM (state saved, see ``medcap.training._signals``) exits
    with the shell's status for that signal, 128 + N (130 for Ctrl-C, 143 for SIGTERM),
    so that a job script can tell it from a finished run (0).
    """
    # torchrun ranks other than 0 report only problems
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    recipe = recipe_cls(cfg=cfg)
    try:
        recipe.setup(cfg=cfg)
        summary = recipe.train()
    finally:
        recipe.cleanup()
    if summary.get("interrupted_by"):
        raise SystemExit(128 + int(summary["interrupted_by"]))
