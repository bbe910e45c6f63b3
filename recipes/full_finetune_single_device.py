"""Fine-tune the vision tower and projector of medcap, the LLM frozen: the whole run in one file.

    medcap run full_finetune_single_device --config llama3_1/8B_full_single_device \
        vision=biomedclip dataset.source=TRAIN.json tokenizer.path=LLAMA/original/tokenizer.model \
        checkpointer.checkpoint_dir=LLAMA checkpointer.output_dir=OUT/checkpoint output_dir=OUT
    medcap run --nproc_per_node 8 full_finetune_distributed --config llama3_1/8B_full ...

Both names run this file (``full_finetune_distributed.py`` is a link to it), so the
two can never drift: one process is a world of size 1, where every collective is a
no-op. What only several processes do is marked ``# distributed:`` below: join
torchrun's process group, shard the frozen decoder with FSDP2, sum the vision
side's gradients across ranks before each step, check at the end that every rank
holds the same vision weights; rank 0 writes the files.

The run, in the order of this file:

1. ``__init__``: the config, typed and checked (every key, every file) before
   anything heavy; the process group; the checkpoint folder locked, and whether
   this run resumes (a used folder is refused unless resuming or ``overwrite=True``;
   a random vision tower is refused unless ``vision_random_init=True``).
2. ``setup``: tokenizer, model (Llama weights + vision start, LLM frozen), loss,
   optimizer (``optimizer_in_bwd``: stepped inside backward), data in a seeded,
   resumable order (``group_by_length`` optional), lr scheduler; the stopped
   run's state when resuming.
3. ``train``: epochs of ``train_step`` (accumulation, gradient reduction, step,
   metrics); ``meta_model_last`` + ``recipe_state.pt`` every
   ``save_last_every_seconds``/``_steps``, ``meta_model_{epoch}`` after each
   epoch; Ctrl-C or SIGTERM saves at the next step boundary and stops
   (exit status 130 / 143); ``resume_from_checkpoint=True`` (or ``auto``)
   continues bit-identically.
4. ``cleanup``: logger closed, folder unlocked, process group left.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Deque, Dict, List, Optional

import torch
from torchtune import config as tt_config
from torchtune import training as tt_training

from medcap.config import ConfigError, run_recipe, save_resolved
from medcap.data import SkipLog
from medcap.models import load_model, save_vision_checkpoint
from medcap.training import (
    RECIPE_STATE_FILE,
    DiskFullError,
    StopSignals,
    TrainConfig,
    TrainForward,
    build_lr_scheduler,
    build_optimizer,
    capture_rng_state,
    check_vision_start,
    count_label_tokens,
    describe_model,
    init_distributed_env,
    load_recipe_state,
    open_run_folder,
    peak_memory_gib,
    progress,
    restore_rng_state,
    save_recipe_state,
    setup_data,
    setup_dataset,
    shard_frozen_decoder,
    training_summary,
)

log = logging.getLogger("medcap.training")
_SAVE, _SAVE_AND_STOP = 1, 2  # what the ranks agree to do after a step


class FullFinetuneRecipe:
    """One run: ``FullFinetuneRecipe(cfg)``, ``setup()``, ``train()``, ``cleanup()``."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg = TrainConfig.from_config(cfg)  # unknown keys and bad values stop here
        cfg.check()  # every file the run reads, before the process group and the model
        self.name = Path(__file__).stem
        self._env = env = init_distributed_env(cfg.device)  # distributed: torchrun's ranks; else a world of 1
        cfg.check_world(env.world_size)
        self.seed = tt_training.set_seed(seed=cfg.seed)
        # Progress of the run: two integers place it in the data plan (see ResumableBatchSampler).
        self.epoch = self.step_in_epoch = self.global_step = 0
        self.total_tokens = self.skip_events = 0
        self.last_loss: Optional[float] = None
        self.history: Deque[Dict[str, float]] = deque(maxlen=10_000)  # latest per-step metrics
        self.stopped_early = False
        self.interrupted_by: Optional[int] = None  # the signal that stopped training
        self._signals = StopSignals()
        self._metric_logger = None
        # The checkpoint folder's lock is held from here until cleanup().
        self._run_lock = contextlib.ExitStack()
        try:
            self._run = self._open_run_folder()
        except BaseException:
            self._run_lock.close()
            raise

    def _open_run_folder(self):
        """Rank 0 locks and inspects the checkpoint folder and tells every rank whether the
        run resumes; each rank checks where its vision tower starts (nothing built yet)."""
        cfg, env = self.cfg, self._env
        outcome: Any = None
        if env.is_main:
            try:
                outcome = open_run_folder(
                    cfg.checkpoint_dir,
                    resume=cfg.resume,
                    overwrite=cfg.overwrite,
                    recipe_checkpoint=cfg.checkpointer.recipe_checkpoint,
                    stack=self._run_lock,
                    before_claim=lambda resuming: check_vision_start(cfg, resuming=resuming),
                )
            except Exception as e:
                env.broadcast_object(f"{type(e).__name__}: {e}")  # distributed: the other ranks stop too
                raise
        outcome = env.broadcast_object(outcome)
        if isinstance(outcome, str):
            raise ConfigError(f"rank 0 stopped: {outcome}")  # reported there; one line here too
        if not env.is_main:
            check_vision_start(cfg, resuming=outcome.resuming)
        return outcome

    # ---- setup

    def setup(self) -> None:
        cfg, env = self.cfg, self._env
        if env.is_main:
            save_resolved(cfg.to_dict(), cfg.output_dir)  # the config as it runs, beside the outputs
        # metrics (DiskLogger, TensorBoardLogger, ...) are written by rank 0 alone
        self._metric_logger = tt_config.instantiate(_section(cfg.metric_logger)) if env.is_main else None
        state = load_recipe_state(self._run.state_path) if self._run.resuming else None
        if state is not None:
            log.info("resuming from %s (global step %d)", self._run.state_path, state["global_step"])
            self.seed = int(state["seed"])  # the data order is the stopped run's

        self._tokenizer = tt_config.instantiate(_section(cfg.tokenizer))
        self._setup_model(resuming=state is not None)
        self._setup_data()
        self._lr_scheduler = build_lr_scheduler(
            _section(cfg.lr_scheduler), self._optimizer, num_training_steps=cfg.epochs * self.steps_in_epoch()
        )
        if state is not None:
            self.load_state_dict(state)
        self._last_save_time, self._last_save_step = time.monotonic(), self.global_step
        self._last_written_step = -1  # global step of the current meta_model_last file
        if env.is_main:
            log.info(
                "%d samples, %d steps per epoch (batch %d x %d process(es) x %d accumulation), checkpoints in %s",
                len(self._dataset), self.steps_in_epoch(), cfg.batch_size, env.world_size,
                cfg.gradient_accumulation_steps, cfg.checkpoint_dir,
            )

    def _setup_model(self, resuming: bool) -> None:
        """The model (Llama weights + vision start, LLM frozen), the loss and the optimizer."""
        cfg, env = self.cfg, self._env
        log.info("building the model (%s, %s on %s)", cfg.model["_component_"], cfg.dtype, env.device)
        self._model = model = load_model(
            cfg.model,
            vars(cfg.checkpointer),
            device=env.device,
            dtype=cfg.dtype,
            tokenizer=self._tokenizer,
            # on resume the vision weights come from the recipe state
            vision_checkpoint=None if resuming else cfg.vision_checkpoint,
            train_vision=True,
            vision_weights_follow=resuming,
        )
        self._dtype = next(model.vision.parameters()).dtype  # images go in as the tower computes
        if cfg.enable_activation_checkpointing:
            from torchtune.modules import TransformerSelfAttentionLayer

            # only the decoder layers: they hold nearly all activations of a long sequence
            tt_training.set_activation_checkpointing(model.decoder, auto_wrap_policy={TransformerSelfAttentionLayer})

        self._loss_fn = tt_config.instantiate(_section(cfg.loss))
        self._forward = TrainForward(model, self._loss_fn, keep_graph=env.distributed)
        if env.distributed:  # distributed: shard the frozen decoder; one starting vision model everywhere
            shard_frozen_decoder(model, self._forward, env)
            env.broadcast_params(model.vision.parameters())
        self._trainable = [p for p in model.parameters() if p.requires_grad]
        self._optimizer = build_optimizer(_section(cfg.optimizer), model, optimizer_in_bwd=cfg.optimizer_in_bwd)

    def _setup_data(self) -> None:
        """The dataset and its loader, in the seeded, resumable order of ``ResumableBatchSampler``."""
        cfg, env = self.cfg, self._env
        self._dataset = setup_dataset(_section(cfg.dataset), self._tokenizer, self._model)
        self._sampler, self._dataloader = setup_data(
            self._dataset,
            env=env,
            batch_size=cfg.batch_size,
            shuffle=cfg.shuffle,
            seed=self.seed,
            pad_id=self._tokenizer.pad_id,
            num_workers=cfg.num_workers,
            group_by_length=cfg.group_by_length,
        )
        self._skip_log = getattr(self._dataset, "skip_log", None) or SkipLog(total=self._sampler.num_samples)
        # The DataLoader draws its workers' base seed from its own generator when an epoch
        # starts; that generator's state at the epoch's start lets a resumed epoch draw the same.
        self._data_generator: Optional[torch.Generator] = self._dataloader.generator
        self._epoch_data_rng = self._data_generator.get_state()

    def steps_in_epoch(self) -> int:
        n = self._sampler.batches_per_epoch() // self.cfg.gradient_accumulation_steps
        return min(n, self.cfg.max_steps_per_epoch or n)

    # ---- one step

    def train_step(self, micro_batches: List[Dict[str, Any]]) -> Dict[str, float]:
        """One optimizer step over ``gradient_accumulation_steps`` batches (per rank)."""
        t0 = time.perf_counter()
        env = self._env
        local_labels = sum(count_label_tokens(b["labels"]) for b in micro_batches)
        local_tokens = sum(int((b["tokens"] != self._tokenizer.pad_id).sum()) for b in micro_batches)
        local_skips = sum(len(b.get("skipped") or ()) for b in micro_batches)
        for b in micro_batches:
            self._skip_log.update(b.get("skipped"))
        # Normalise by the label tokens of the whole step on all ranks: the gradient is then
        # that of the mean loss over the global batch, however it is split.
        n_labels, n_tokens, n_skips = env.sum_scalars(local_labels, local_tokens, local_skips)  # distributed: summed
        norm = max(n_labels, 1.0)

        self._forward.train()
        loss_sum = 0.0
        for b in micro_batches:
            images = b.get("images")
            total, _ = self._forward(
                b["tokens"].to(env.device, non_blocking=True),
                b["labels"].to(env.device, non_blocking=True),
                None if images is None else images.to(env.device, dtype=self._dtype, non_blocking=True),
            )
            if total.requires_grad:
                (total / norm).backward()  # with optimizer_in_bwd the step happens in here
            loss_sum += float(total.detach())

        grad_norm = None
        if not self._optimizer.in_backward:
            env.reduce_grads(self._trainable)  # distributed: sum the vision side's gradients over ranks
            if self.cfg.clip_grad_norm is not None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self._trainable, self.cfg.clip_grad_norm))
            self._optimizer.step()
            self._optimizer.zero_grad()
        lr = self._optimizer.lr
        if self._lr_scheduler is not None:
            self._lr_scheduler.step()
            self._optimizer.sync_lr()

        (global_loss_sum,) = env.sum_scalars(loss_sum)  # distributed: summed over ranks
        dt = time.perf_counter() - t0
        self.global_step += 1
        self.step_in_epoch += 1
        self.total_tokens += int(n_tokens)
        self.skip_events += int(n_skips)
        metrics = {
            "loss": global_loss_sum / norm,
            "lr": lr,
            "tokens_per_second": n_tokens / max(dt, 1e-9),
            "label_tokens": n_labels,
            "peak_memory_gib": peak_memory_gib(env.device),
            "skipped_samples": float(self.skip_events),
        }
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm
        self.last_loss = metrics["loss"]
        return metrics

    # ---- the loop

    def train(self) -> Dict[str, Any]:
        """Train to the end, or to ``stop_after_steps``, or until SIGINT/SIGTERM (then the
        state is saved at the step boundary and ``interrupted_by`` names the signal)."""
        with self._signals:
            self._train_epochs()
        summary = self._report_bad_samples()
        # distributed: the point of the all-reduce is one vision model, whatever the number of ranks
        if not self._env.replicas_identical(self._model.vision.parameters()):
            raise RuntimeError("the ranks' vision weights differ after training: gradients were not synchronised")
        if self._env.distributed and self._env.is_main:
            log.info("vision weights identical on all %d ranks", self._env.world_size)
        return summary

    def _train_epochs(self) -> None:
        cfg = self.cfg
        for epoch in range(self.epoch, cfg.epochs):
            self.epoch = epoch
            n_steps = self.steps_in_epoch()
            self._start_epoch(epoch)
            bar = progress(n_steps - self.step_in_epoch, f"epoch {epoch + 1}/{cfg.epochs}", "steps",
                           enabled=cfg.progress and self._env.is_main)
            micro: List[Dict[str, Any]] = []
            with bar:
                for batch in self._dataloader if self.step_in_epoch < n_steps else ():
                    micro.append(batch)
                    if len(micro) < cfg.gradient_accumulation_steps:
                        continue
                    metrics, micro = self.train_step(micro), []
                    self.history.append(dict(metrics, step=self.global_step, epoch=epoch))
                    bar.update(1, step=self.global_step, loss=metrics["loss"])
                    if self._metric_logger is not None and self.global_step % cfg.log_every_n_steps == 0:
                        self._metric_logger.log_dict(metrics, step=self.global_step)
                    if self.step_in_epoch >= n_steps:
                        break
                    if cfg.stop_after_steps is not None and self.global_step >= cfg.stop_after_steps:
                        self.stopped_early = True  # as if the job were killed here: no extra checkpoint
                        log.warning("stopping after global step %d (stop_after_steps)", self.global_step)
                        return
                    action = self._after_step_action()
                    if action:
                        self.save("meta_model_last")
                    if action == _SAVE_AND_STOP:
                        return self._note_interrupted()
            # Epoch done: the state saved with it points at the next epoch's start.
            self.epoch, self.step_in_epoch = epoch + 1, 0
            self.save(f"meta_model_{epoch}", epoch=epoch)
            if epoch + 1 < cfg.epochs and self._env.max_scalar(float(self._signals.received is not None)):
                self._write_last_weights()
                return self._note_interrupted()
        self._write_last_weights()

    def _start_epoch(self, epoch: int) -> None:
        self._sampler.set_epoch(epoch, start_batch=self.step_in_epoch * self.cfg.gradient_accumulation_steps)
        if self.step_in_epoch == 0:
            self._epoch_data_rng = self._data_generator.get_state()
        else:
            self._data_generator.set_state(self._epoch_data_rng)  # the epoch's own start, resumed

    def _after_step_action(self) -> int:
        """0, ``_SAVE`` (a periodic save is due) or ``_SAVE_AND_STOP`` (a stop signal arrived)."""
        cfg, action = self.cfg, 0
        if cfg.save_last_every_steps and self.global_step - self._last_save_step >= cfg.save_last_every_steps:
            action = _SAVE
        if cfg.save_last_every_seconds and time.monotonic() - self._last_save_time >= cfg.save_last_every_seconds:
            action = _SAVE
        if self._signals.received is not None:
            action = _SAVE_AND_STOP
        # distributed: clocks and signals differ between ranks, and saving gathers every
        # rank's state: agree on the most any rank wants (one small all-reduce per step).
        return int(self._env.max_scalar(float(action)))

    def _note_interrupted(self) -> None:
        self.stopped_early = True
        self.interrupted_by = self._signals.received or signal.SIGTERM  # another rank's signal
        log.warning(
            "stopped by %s after global step %d; resumable state saved in %s: run the same command with "
            "resume_from_checkpoint=True (or auto) to continue",
            signal.Signals(self.interrupted_by).name, self.global_step, self.cfg.checkpoint_dir,
        )

    # ---- checkpoints and resume

    def save(self, name: str, *, epoch: Optional[int] = None) -> Optional[Path]:
        """``{name}{suffix}`` (the trainable weights) and ``recipe_state.pt``. Every rank
        calls it (the state gathers every rank's random generators); rank 0 writes."""
        state = self.state_dict()
        self._last_save_time, self._last_save_step = time.monotonic(), self.global_step
        if not self._env.is_main:
            return None
        resumable = (self.cfg.checkpoint_dir / RECIPE_STATE_FILE).is_file()
        try:
            if epoch is None:
                path = self._write_weights(name, epoch=self.epoch, step_in_epoch=self.step_in_epoch)
            else:
                path = self._write_weights(name, epoch=epoch, completed_epochs=epoch + 1)
            # the state is written last: a crash in between leaves the previous pair consistent
            save_recipe_state(self.cfg.checkpoint_dir / RECIPE_STATE_FILE, state)
        except DiskFullError as e:  # one line that says how to go on: from the last state, if there is one
            raise e.advising(
                "free some space and run the same command with resume_from_checkpoint=auto: it continues from the "
                f"last complete {RECIPE_STATE_FILE}" if resumable else
                "free some space and run the same command with overwrite=True (no resumable state was saved yet)"
            ) from e
        log.info("saved %s and %s (global step %d)", path, RECIPE_STATE_FILE, self.global_step)
        return path

    def _write_weights(self, name: str, **meta: Any) -> Path:
        path = self.cfg.checkpoint_dir / f"{name}{self.cfg.checkpoint_suffix}"
        # llm_dir: the LLM these weights were trained against; the description: everything it takes
        # to use the checkpoint alone (the model, LLM, tokenizer, transform, prompt, dtype, training)
        metadata = dict(meta, vision=self.cfg.vision, recipe=self.name, global_step=self.global_step,
                        llm_dir=str(Path(self.cfg.checkpointer.checkpoint_dir).resolve()), **self._description())
        save_vision_checkpoint(self._model, path, metadata=metadata)
        if name == "meta_model_last":
            self._last_written_step = self.global_step
        return path

    def _description(self) -> Dict[str, Any]:
        cfg = self.cfg
        training = training_summary(cfg, recipe=self.name, seed=self.seed, world_size=self._env.world_size)
        return describe_model(self._model, model_cfg=cfg.model, checkpointer=cfg.checkpointer, tokenizer=cfg.tokenizer,
                              dtype=cfg.dtype, checkpoint_dir=cfg.checkpoint_dir, training=training)

    def _write_last_weights(self) -> None:
        """Leave meta_model_last holding the latest weights."""
        if self._env.is_main and self._last_written_step != self.global_step:
            self._write_weights("meta_model_last", epoch=self.epoch, step_in_epoch=self.step_in_epoch)

    def state_dict(self) -> Dict[str, Any]:
        env, vision = self._env, self._model.vision
        # the loader's generator at the start of the epoch a resumed run continues
        data_rng = self._data_generator.get_state() if self.step_in_epoch == 0 else self._epoch_data_rng
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "total_tokens": self.total_tokens,
            "skip_events": self.skip_events,
            "seed": self.seed,
            "world_size": env.world_size,
            "sampler": self._sampler.state_dict(),
            "gradient_accumulation_steps": self.cfg.gradient_accumulation_steps,
            "optimizer": self._optimizer.state_dict(),
            "lr_scheduler": self._lr_scheduler.state_dict() if self._lr_scheduler is not None else None,
            "rng": env.all_gather_object(capture_rng_state()),  # every rank's generators
            "data_rng": env.all_gather_object(data_rng),
            "skip_log": self._merged_skip_log().state_dict(),
            # The trainable weights ride in the same file, so that the resumable state can
            # never pair with weights of another step.
            "model": {
                "visual": {k: v.detach().cpu() for k, v in vision.visual.state_dict().items()},
                "projector": {k: v.detach().cpu() for k, v in vision.projector.state_dict().items()},
            },
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue a stopped run: weights, optimizer, scheduler, position, generators."""
        env, vision = self._env, self._model.vision
        self._sampler.check_resumable(state["sampler"])
        if state["gradient_accumulation_steps"] != self.cfg.gradient_accumulation_steps:
            raise ConfigError(
                f"cannot resume exactly: gradient_accumulation_steps was {state['gradient_accumulation_steps']}, "
                f"now {self.cfg.gradient_accumulation_steps}"
            )
        with torch.no_grad():
            vision.visual.load_state_dict(state["model"]["visual"], strict=True)
            vision.projector.load_state_dict(state["model"]["projector"], strict=True)
        self._optimizer.load_state_dict(state["optimizer"])
        if self._lr_scheduler is not None:
            if state.get("lr_scheduler") is None:
                raise ConfigError("the stopped run had no lr_scheduler; remove lr_scheduler to resume it")
            self._lr_scheduler.load_state_dict(state["lr_scheduler"])
            self._optimizer.sync_lr()
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        self.global_step, self.total_tokens = int(state["global_step"]), int(state["total_tokens"])
        self.skip_events = int(state.get("skip_events", 0))
        self._skip_log.load_state_dict(state.get("skip_log", {}))  # known already: not logged again
        rngs, data_rngs = state["rng"], state.get("data_rng") or [None]
        same_world = len(rngs) == env.world_size
        if not same_world:
            log.warning("resuming on %d processes, stopped on %d: random states restarted from rank 0's",
                        env.world_size, len(rngs))
        restore_rng_state(rngs[env.rank if same_world else 0])
        data_rng = data_rngs[env.rank] if len(data_rngs) == env.world_size else data_rngs[0]
        if data_rng is not None:
            self._data_generator.set_state(data_rng)
            self._epoch_data_rng = data_rng
        log.info("resumed at epoch %d, step %d of the epoch (global step %d)",
                 self.epoch, self.step_in_epoch, self.global_step)

    # ---- end of the run

    def _merged_skip_log(self) -> SkipLog:
        """Every rank's bad-sample log in one (a collective)."""
        merged = SkipLog(total=self._skip_log.total, logger=logging.getLogger("medcap.training.quiet"))
        for st in self._env.all_gather_object(self._skip_log.state_dict()):
            merged.load_state_dict(st)
        return merged

    def _report_bad_samples(self) -> Dict[str, Any]:
        merged = self._merged_skip_log()
        summary = merged.summary()
        if self._env.is_main:
            if merged.count:  # said once: on stderr as it stands (several lines), not logged as well
                print(summary, file=sys.stderr, flush=True)
            else:
                log.info("%s", summary)
            self._metric_logger.log_dict({"bad_samples": float(merged.count)}, step=self.global_step)
        return {
            "global_step": self.global_step,
            "epoch": self.epoch,
            "loss": self.last_loss,
            "bad_samples": merged.count,
            "bad_sample_reasons": merged.reasons,
            "summary": summary,
            "stopped_early": self.stopped_early,
            "interrupted_by": self.interrupted_by,
        }

    def cleanup(self) -> None:
        """Close the logger, release the checkpoint folder, leave the process group (safe twice)."""
        if self._metric_logger is not None:
            self._metric_logger.close()
            self._metric_logger = None
        self._run_lock.close()
        self._env.shutdown()


def _section(section: Optional[Dict[str, Any]]):
    """A config section as torchtune's ``instantiate`` wants it (a DictConfig)."""
    from omegaconf import OmegaConf

    return None if section is None else OmegaConf.create(section)


def main(cfg) -> None:
    """Set up, train, clean up. A run stopped by SIGINT/SIGTERM (state saved) exits with the
    shell's status for that signal, 128 + N (130 for Ctrl-C, 143 for SIGTERM), so that a job
    script can tell it from a finished run (0)."""
    if os.environ.get("RANK", "0") != "0":
        logging.getLogger().setLevel(logging.WARNING)  # torchrun's other ranks report only problems
    recipe = FullFinetuneRecipe(cfg)
    try:
        recipe.setup()
        summary = recipe.train()
    finally:
        recipe.cleanup()
    if summary["interrupted_by"]:
        raise SystemExit(128 + int(summary["interrupted_by"]))


def recipe_main(argv: Optional[List[str]] = None) -> int:
    return run_recipe(main, argv)


if __name__ == "__main__":
    sys.exit(recipe_main())
