"""Fine-tune the vision tower and projector of medcap on one device, the LLM frozen.

    medcap run full_finetune_single_device --config llama3_1/8B_full_single_device \
        vision=biomedclip dataset.source=TRAIN.json tokenizer.path=LLAMA/original/tokenizer.model \
        checkpointer.checkpoint_dir=LLAMA checkpointer.output_dir=OUT/checkpoint output_dir=OUT

What it does, step by step (the shared logic lives in ``medcap.training``):

* builds ``cfg.model`` (a ``MedcapModel``) in ``cfg.dtype``, loads the Llama
  weights from ``cfg.checkpointer`` (a Hugging Face folder), optionally the
  vision side from ``vision_checkpoint``, freezes the LLM and asserts that only
  the vision tower and projector train;
* reads ``cfg.dataset`` (torchtune's ``chat_dataset`` is swapped for medcap's
  image-aware one, and the log says so) in a seeded, resumable order;
* computes next-token cross-entropy only at label positions (chunked vocabulary
  projection); with ``optimizer_in_bwd`` each parameter is stepped inside
  backward (bitsandbytes' PagedAdamW8bit in the 8B config);
* writes ``meta_model_{epoch}`` after each epoch and ``meta_model_last`` every
  ``save_last_every_seconds`` (8 h) and/or ``save_last_every_steps`` plus at the
  end, with ``recipe_state.pt`` beside them; ``resume_from_checkpoint=True``
  continues exactly where a stopped run left off (``auto``: if there is one);
* refuses to start from a random vision tower (give ``model.vision_pretrained``
  or ``vision_checkpoint``, or ``vision_random_init=True``), locks
  ``checkpointer.output_dir`` and refuses one holding another run (unless
  ``overwrite=True``); Ctrl-C or SIGTERM saves at the next step boundary and
  exits with status 130 or 143.
"""

import sys

from omegaconf import DictConfig
from torchtune import config

from medcap.training import DistEnv, FinetuneRecipeBase, run_finetune, single_device_env


class FullFinetuneRecipeSingleDevice(FinetuneRecipeBase):
    """One process, one device: no sharding, no gradient reduction."""

    recipe_name = "full_finetune_single_device"
    distributed = False

    def _setup_env(self, cfg: DictConfig) -> DistEnv:
        return single_device_env(cfg.get("device", "cuda"))


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    run_finetune(FullFinetuneRecipeSingleDevice, cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
