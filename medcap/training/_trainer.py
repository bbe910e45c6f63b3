"""The training loop both recipes run: accumulation, (distributed) gradient reduction,
metrics, periodic and per-epoch checkpoints, exact resume."""

from __future__ import annotations

import logging
import resource
import signal
import sys
import time
from pathlib import Path
from collections import deque
from typing import Any, Deque, Dict, List, Optional

import torch
from torch import nn
from tqdm import tqdm

from medcap.checkpointing import save_vision_checkpoint
from medcap.data import SkipLog
from medcap.training._config import TrainSettings
from medcap.training._dist import DistEnv
from medcap.training._loss import IGNORE_INDEX, LabelTokenCrossEntropy, count_label_tokens
from medcap.training._sampler import ResumableBatchSampler
from medcap.training._signals import StopSignals
from medcap.training._state import (
    RECIPE_STATE_FILE,
    capture_rng_state,
    restore_rng_state,
    save_recipe_state,
)

log = logging.getLogger("medcap.training")


class TrainForward(nn.Module):
    """Fused forward + label-only loss as one module: the FSDP root in the
    distributed recipe, plain otherwise. Returns ``(loss_sum, label_count)``.

    ``keep_graph``: when a rank's batch has no image, its input embeddings would
    not need grad and backward would skip the (sharded) decoder layers, leaving
    the other ranks waiting in their all-gathers. Marking the embeddings as
    requiring grad makes every rank run the same backward.
    """

    def __init__(self, model: nn.Module, loss_fn: LabelTokenCrossEntropy, keep_graph: bool = False):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.keep_graph = keep_graph

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, images: Optional[torch.Tensor] = None):
        embeds = self.model.embed(tokens, images)  # [b, s, d]
        if self.keep_graph and torch.is_grad_enabled() and not embeds.requires_grad:
            embeds = embeds.detach().requires_grad_(True)
        hidden = self.model.hidden_states(tokens, embeds=embeds)  # [b, s, d]
        out = self.loss_fn(self.model, hidden, labels)
        return out.total, torch.tensor(out.count)


def peak_memory_gib(device: torch.device, reset: bool = True) -> float:
    """CUDA: peak allocated since the last reset. CPU: the process's peak RSS so far."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return peak
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


class Trainer:
    """Runs epochs of optimizer steps over a :class:`ResumableBatchSampler`'s plan.

    Step ``k`` of epoch ``e`` consumes batches ``k*G .. k*G+G-1`` of that epoch's
    plan (``G`` = gradient_accumulation_steps), so progress is two integers and a
    resumed run skips exactly what was consumed.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        forward: nn.Module,
        optimizer,
        lr_scheduler,
        sampler: ResumableBatchSampler,
        dataloader,
        metric_logger,
        env: DistEnv,
        settings: TrainSettings,
        dtype: torch.dtype,
        seed: int,
        pad_id: int,
        skip_log: Optional[SkipLog] = None,
        checkpoint_metadata: Optional[Dict[str, Any]] = None,
    ):
        self.model = model
        self.forward = forward
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.sampler = sampler
        self.dataloader = dataloader
        self.metric_logger = metric_logger
        self.env = env
        self.s = settings
        self.dtype = dtype
        self.seed = seed
        self.pad_id = pad_id
        self.skip_log = skip_log if skip_log is not None else SkipLog(total=sampler.num_samples)
        self.checkpoint_metadata = dict(checkpoint_metadata or {})
        self.trainable = [p for p in model.parameters() if p.requires_grad]

        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.total_tokens = 0
        self.skip_events = 0
        self.last_loss: Optional[float] = None
        # The latest per-step metrics (for tests and benchmarks); bounded for long runs.
        self.history: Deque[Dict[str, float]] = deque(maxlen=10_000)
        self._last_save_time = time.monotonic()
        self._last_save_step = 0
        self._last_written_step = -1  # global step of the current meta_model_last file
        self.stopped_early = False
        self.interrupted_by: Optional[int] = None  # the signal that stopped training, if any
        self._signals = StopSignals()
        # The DataLoader draws its workers' base seed from this generator when an epoch's
        # iterator is made; its state at the epoch's start lets a resumed epoch draw the same.
        self.data_generator: Optional[torch.Generator] = getattr(dataloader, "generator", None)
        self._epoch_data_rng = self._data_rng()

    # ------------------------------------------------------------------ plan

    def steps_in_epoch(self) -> int:
        n = self.sampler.batches_per_epoch() // self.s.gradient_accumulation_steps
        if self.s.max_steps_per_epoch is not None:
            n = min(n, self.s.max_steps_per_epoch)
        return n

    # ------------------------------------------------------------------ state

    def _data_rng(self) -> Optional[torch.Tensor]:
        return self.data_generator.get_state() if self.data_generator is not None else None

    def _resume_data_rng(self) -> Optional[torch.Tensor]:
        """The loader generator's state at the start of the epoch a resumed run continues:
        the current one at an epoch boundary, else the one this epoch started with."""
        return self._data_rng() if self.step_in_epoch == 0 else self._epoch_data_rng

    def state_dict(self) -> Dict[str, Any]:
        rng = self.env.all_gather_object(capture_rng_state())  # every rank's generators
        skipped = self.env.all_gather_object(self.skip_log.state_dict())
        merged = SkipLog(total=self.skip_log.total, logger=logging.getLogger("medcap.training.quiet"))
        for st in skipped:
            merged.load_state_dict(st)
        vision = self.model.vision
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "total_tokens": self.total_tokens,
            "skip_events": self.skip_events,
            "seed": self.seed,
            "world_size": self.env.world_size,
            "sampler": self.sampler.state_dict(),
            "gradient_accumulation_steps": self.s.gradient_accumulation_steps,
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            "rng": rng,
            "data_rng": self.env.all_gather_object(self._resume_data_rng()),
            "skip_log": merged.state_dict(),
            # The trainable weights ride in the same file, so that the resumable
            # state can never pair with weights of another step.
            "model": {
                "visual": {k: v.detach().cpu() for k, v in vision.visual.state_dict().items()},
                "projector": {k: v.detach().cpu() for k, v in vision.projector.state_dict().items()},
            },
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue a stopped run: weights, optimizer, scheduler, position, generators."""
        self.sampler.check_resumable(state["sampler"])
        if state["gradient_accumulation_steps"] != self.s.gradient_accumulation_steps:
            raise ValueError(
                f"cannot resume exactly: gradient_accumulation_steps was {state['gradient_accumulation_steps']}, "
                f"now {self.s.gradient_accumulation_steps}"
            )
        vision = self.model.vision
        with torch.no_grad():
            vision.visual.load_state_dict(state["model"]["visual"], strict=True)
            vision.projector.load_state_dict(state["model"]["projector"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None:
            if state.get("lr_scheduler") is None:
                raise ValueError("the stopped run had no lr_scheduler; remove lr_scheduler to resume it")
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
            self.optimizer.sync_lr()
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.total_tokens = int(state["total_tokens"])
        self.skip_events = int(state.get("skip_events", 0))
        self._last_save_step = self.global_step
        self.skip_log.load_state_dict(state.get("skip_log", {}))  # known already: not logged again
        rngs = state["rng"]
        if len(rngs) == self.env.world_size:
            restore_rng_state(rngs[self.env.rank])
        else:
            log.warning("resuming on %d processes, stopped on %d: random states restarted from rank 0's",
                        self.env.world_size, len(rngs))
            restore_rng_state(rngs[0])
        self._restore_data_rng(state.get("data_rng"))
        log.info(
            "resumed at epoch %d, step %d of the epoch (global step %d)",
            self.epoch, self.step_in_epoch, self.global_step,
        )

    def _restore_data_rng(self, saved: Optional[List[Optional[torch.Tensor]]]) -> None:
        if self.data_generator is None or not saved:
            return  # a state written before the loader had its own generator
        mine = saved[self.env.rank] if len(saved) == self.env.world_size else saved[0]
        if mine is not None:
            self.data_generator.set_state(mine)
            self._epoch_data_rng = mine

    # ------------------------------------------------------------------ checkpoints

    def _write_weights(self, name: str, **meta: Any) -> Path:
        path = self.s.checkpoint_dir / f"{name}{self.s.checkpoint_suffix}"
        metadata = dict(self.checkpoint_metadata)
        metadata.update(meta, global_step=self.global_step)
        save_vision_checkpoint(self.model, path, metadata=metadata)
        if name == "meta_model_last":
            self._last_written_step = self.global_step
        return path

    def save(self, name: str, *, epoch: Optional[int] = None) -> Optional[Path]:
        """Write ``{name}{suffix}`` (trainable weights only) and the resumable state.
        Collective (all ranks call it); rank 0 writes."""
        state = self.state_dict()
        # Every rank tracks when the last save was, so that they agree on the next one.
        self._last_save_time = time.monotonic()
        self._last_save_step = self.global_step
        if not self.env.is_main:
            return None
        if epoch is None:
            path = self._write_weights(name, epoch=self.epoch, step_in_epoch=self.step_in_epoch)
        else:
            path = self._write_weights(name, epoch=epoch, completed_epochs=epoch + 1)
        save_recipe_state(self.s.checkpoint_dir / RECIPE_STATE_FILE, state)
        log.info("saved %s and %s (global step %d)", path, RECIPE_STATE_FILE, self.global_step)
        return path

    _SAVE, _SAVE_AND_STOP = 1, 2

    def _after_step_action(self) -> int:
        """0, ``_SAVE`` (periodic save due) or ``_SAVE_AND_STOP`` (a stop signal arrived)."""
        action = 0
        if self.s.save_last_every_steps and self.global_step - self._last_save_step >= self.s.save_last_every_steps:
            action = self._SAVE
        if self.s.save_last_every_seconds and time.monotonic() - self._last_save_time >= self.s.save_last_every_seconds:
            action = self._SAVE
        if self._signals.received is not None:
            action = self._SAVE_AND_STOP
        # Ranks' clocks and signals differ: agree (the most any rank wants), since saving
        # gathers states. One small all-reduce per step.
        return int(self.env.max_scalar(float(action)))

    def _stop_requested(self) -> bool:
        return self.env.max_scalar(float(self._signals.received is not None)) > 0

    # ------------------------------------------------------------------ one step

    def _to_device(self, batch: Dict[str, Any]):
        dev = self.env.device
        tokens = batch["tokens"].to(dev, non_blocking=True)
        labels = batch["labels"].to(dev, non_blocking=True)
        images = batch.get("images")
        if images is not None:
            images = images.to(dev, dtype=self.dtype, non_blocking=True)
        return tokens, labels, images

    def train_step(self, micro_batches: List[Dict[str, Any]]) -> Dict[str, float]:
        t0 = time.perf_counter()
        local_labels = sum(count_label_tokens(b["labels"], IGNORE_INDEX) for b in micro_batches)
        local_tokens = sum(int((b["tokens"] != self.pad_id).sum()) for b in micro_batches)
        local_skips = sum(len(b.get("skipped") or ()) for b in micro_batches)
        for b in micro_batches:
            self.skip_log.update(b.get("skipped"))
        # Normalise by the label tokens of the whole optimizer step on all ranks: the
        # gradient is then that of the mean loss over the global batch, whatever the
        # split into micro-batches and ranks.
        n_labels, n_tokens, n_skips = self.env.sum_scalars(local_labels, local_tokens, local_skips)
        norm = max(n_labels, 1.0)

        self.forward.train()
        loss_sum = 0.0
        for b in micro_batches:
            tokens, labels, images = self._to_device(b)
            total, _ = self.forward(tokens, labels, images)
            loss = total / norm
            if loss.requires_grad:
                loss.backward()  # with optimizer_in_bwd the step happens in here
            loss_sum += float(total.detach())

        grad_norm = None
        if not self.optimizer.in_backward:
            self.env.reduce_grads(self.trainable)
            if self.s.clip_grad_norm is not None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, self.s.clip_grad_norm))
            self.optimizer.step()
            self.optimizer.zero_grad()
        lr = self.optimizer.lr
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
            self.optimizer.sync_lr()

        (global_loss_sum,) = self.env.sum_scalars(loss_sum)
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
            "peak_memory_gib": peak_memory_gib(self.env.device),
            "skipped_samples": float(self.skip_events),
        }
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm
        self.last_loss = metrics["loss"]
        return metrics

    # ------------------------------------------------------------------ loop

    def train(self) -> Dict[str, Any]:
        """Train to the end, or until stop_after_steps, or until SIGINT/SIGTERM (then
        the state is saved at the step boundary and ``interrupted_by`` names the signal)."""
        with self._signals:
            self._train_epochs()
        return self.finish()

    def _start_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch, start_batch=self.step_in_epoch * self.s.gradient_accumulation_steps)
        if self.step_in_epoch == 0:
            self._epoch_data_rng = self._data_rng()
        elif self.data_generator is not None and self._epoch_data_rng is not None:
            self.data_generator.set_state(self._epoch_data_rng)  # the epoch's own start, resumed

    def _train_epochs(self) -> None:
        G = self.s.gradient_accumulation_steps
        stop = interrupted = False
        for epoch in range(self.epoch, self.s.epochs):
            self.epoch = epoch
            n_steps = self.steps_in_epoch()
            self._start_epoch(epoch)
            pbar = tqdm(
                total=n_steps,
                initial=self.step_in_epoch,
                desc=f"epoch {epoch + 1}/{self.s.epochs}",
                disable=not self.env.is_main,
                dynamic_ncols=True,
            )
            micro: List[Dict[str, Any]] = []
            for batch in (self.dataloader if self.step_in_epoch < n_steps else ()):
                micro.append(batch)
                if len(micro) < G:
                    continue
                metrics = self.train_step(micro)
                micro = []
                self.history.append(dict(metrics, step=self.global_step, epoch=epoch))
                pbar.update(1)
                pbar.set_postfix(step=self.global_step, loss=f"{metrics['loss']:.4f}")
                if self.global_step % self.s.log_every_n_steps == 0:
                    self.metric_logger.log_dict(metrics, step=self.global_step)
                if self.step_in_epoch >= n_steps:
                    break
                if self.s.stop_after_steps is not None and self.global_step >= self.s.stop_after_steps:
                    stop = True  # as if the job were killed here: no extra checkpoint
                    break
                action = self._after_step_action()
                if action:
                    self.save("meta_model_last")
                if action == self._SAVE_AND_STOP:
                    interrupted = True
                    break
            pbar.close()
            if stop:
                self.stopped_early = True
                log.warning("stopping after global step %d (stop_after_steps)", self.global_step)
                break
            if interrupted:
                self._note_interrupted()
                break  # saved just above
            # Epoch done: the state saved with it points at the next epoch's start.
            self.epoch, self.step_in_epoch = epoch + 1, 0
            self.save(f"meta_model_{epoch}", epoch=epoch)
            if epoch + 1 < self.s.epochs and self._stop_requested():
                self._write_last_weights()
                self._note_interrupted()
                break
        else:
            self._write_last_weights()

    def _write_last_weights(self) -> None:
        """Leave meta_model_last holding the latest weights."""
        if self.env.is_main and self._last_written_step != self.global_step:
            self._write_weights("meta_model_last", epoch=self.epoch, step_in_epoch=self.step_in_epoch)

    def _note_interrupted(self) -> None:
        self.stopped_early = True
        self.interrupted_by = self._signals.received or signal.SIGTERM  # another rank's signal
        log.warning(
            "stopped by %s after global step %d; resumable state saved in %s: run the same command with "
            "resume_from_checkpoint=True (or auto) to continue",
            signal.Signals(self.interrupted_by).name,
            self.global_step,
            self.s.checkpoint_dir,
        )

    def finish(self) -> Dict[str, Any]:
        """Merge every rank's bad-sample log and report it."""
        gathered = self.env.all_gather_object(self.skip_log.state_dict())
        merged = SkipLog(total=self.skip_log.total, logger=logging.getLogger("medcap.training.quiet"))
        for st in gathered:
            merged.load_state_dict(st)
        summary = merged.summary()
        if self.env.is_main:
            log.info("%s", summary)
            if merged.count:
                print(summary, file=sys.stderr)
            self.metric_logger.log_dict({"bad_samples": float(merged.count)}, step=self.global_step)
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
