"""Fine-tune the vision tower and projector of medcap on several processes (torchrun).

    medcap run --nproc_per_node 8 full_finetune_distributed --config llama3_1/8B_full \
        epochs=5 batch_size=8 vision=biomedclip dataset.source=TRAIN.json ...

Distributed layout (see ``medcap.training._dist`` for the reasoning):

* NCCL on CUDA, Gloo on CPU; one process per device;
* the frozen LLM's decoder layers are sharded with FSDP2 (``fully_shard``);
* the vision tower and projector are one model replicated on every rank: each
  rank's gradients are summed across ranks before every optimizer step, so all
  ranks take the same step on the global batch and their copies stay identical
  (the reference let each rank train its own copy and saved rank 0's);
* rank 0 writes the checkpoints (the vision weights are whole on every rank).

Everything else (data, loss, optimizer, checkpoints, resume) is the same code
as the single-device recipe, in ``medcap.training``.
"""

import logging
import sys

import torch
from omegaconf import DictConfig
from torchtune import config

from medcap.training import (
    DistEnv,
    FinetuneRecipeBase,
    TrainForward,
    init_distributed_env,
    run_finetune,
    shard_frozen_decoder,
)


class FullFinetuneRecipeDistributed(FinetuneRecipeBase):
    """torchrun ranks: FSDP2-sharded frozen decoder, replicated and all-reduced vision side."""

    recipe_name = "full_finetune_distributed"
    distributed = True

    def _setup_env(self, cfg: DictConfig) -> DistEnv:
        return init_distributed_env(cfg.get("device", "cuda"))

    def _setup_forward(self, model, loss_fn) -> torch.nn.Module:
        forward = TrainForward(model, loss_fn, keep_graph=self._env.distributed)
        if self._env.distributed:
            shard_frozen_decoder(model, forward, self._env)
            # Same starting weights everywhere, whatever each rank's random init was.
            self._env.broadcast_params(model.vision.parameters())
        return forward

    def train(self):
        summary = super().train()
        # The point of this recipe: one vision model, whatever the number of ranks.
        if not self._env.replicas_identical(self._model.vision.parameters()):
            raise RuntimeError("the ranks' vision weights differ after training: gradients were not synchronised")
        if self._env.distributed and self._env.is_main:
            logging.getLogger("medcap.training").info(
                "vision weights identical on all %d ranks", self._env.world_size
            )
        return summary

    def cleanup(self) -> None:
        super().cleanup()
        self._env.shutdown()


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    run_finetune(FullFinetuneRecipeDistributed, cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
