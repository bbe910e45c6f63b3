"""What shapes the demo's results: its stages, its settings, and ``key=value`` on its command line.

    STAGES, RECIPE_STAGES   the stages in order; those that run a medcap recipe
    TARGET_MARGINS          how far the trained vision side must beat both the untrained
                            control and chance, on seen and on unseen combinations
    DemoSettings            every setting, with the published run's defaults (``quick()``: tiny)
    parse_settings          ``key=value`` -> settings; ``STAGE.key=value`` -> a recipe override

Each setting feeds the fingerprint of the stages it shapes (``_stages``), so changing
one redoes those stages and every later one.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

# ---- the stages and what they aim at

STAGES: Tuple[str, ...] = (
    "world",
    "tokenizer",
    "lm",
    "train",
    "eval_trained_captions",
    "eval_trained_vqa",
    "eval_control_captions",
    "eval_control_vqa",
    "report",
)
RECIPE_STAGES = {
    "train": "full_finetune_single_device",
    "eval_trained_captions": "generate",
    "eval_trained_vqa": "generate",
    "eval_control_captions": "generate",
    "eval_control_vqa": "generate",
}
# The targets (reported, not enforced; judged in ``_targets``): on each half of the test
# split, seen and unseen combinations alike, the trained vision side's figure must be
# at least the higher of the untrained control's and chance's plus this margin.
TARGET_MARGINS = {"CIDEr": 2.0, "macro_accuracy": 0.25}
DEFAULT_OUT = "datasets/demo"
CHECKPOINT = "train/checkpoint/meta_model_last.safetensors"  # the trained vision side, in the demo folder


# ---- the settings


@dataclass
class DemoSettings:
    """Everything that shapes the demo's results (``key=value`` on the command line)."""

    seed: int = 0
    n_train: int = 5000  # training images (captions)
    n_test: int = 240  # held-out images (captions and questions): half of them of held-out combinations
    held_out_per_modality: int = 2  # (modality, kind, location) triples per modality kept from training (0-2)
    questions_per_image: int = 2
    shuffle_options: int = 0  # 1: shuffled options as in OmniMedVQA (too hard for the tiny LM's letter mapping)
    image_size: int = 64
    num_image_tokens: int = 8  # placeholders per image in the JSON files (the configs' model.num_image_tokens)
    bpe_merges: int = 244  # 256 + 244 + 12 special tokens = vocabulary 512, as demo/*.yaml say
    lm_layers: int = 4
    lm_dim: int = 128
    lm_steps: int = 300
    lm_batch_size: int = 32
    lm_lr: float = 3e-3
    train_epochs: int = 8
    train_max_steps_per_epoch: Optional[int] = None
    eval_batch_size: int = 64
    threads: int = 0  # torch threads in every stage; 0: automatic

    @classmethod
    def quick(cls) -> "DemoSettings":
        """Tiny sizes for a smoke run in about a minute (the results mean nothing)."""
        return cls(
            n_train=64, n_test=16, questions_per_image=1, lm_steps=12, lm_batch_size=16,
            train_epochs=1, train_max_steps_per_epoch=2, eval_batch_size=16,
        )


# ---- key=value on the command line


def parse_settings(pairs: Sequence[str], base: DemoSettings) -> Tuple[DemoSettings, Dict[str, List[str]]]:
    """``key=value`` pairs: demo settings (``lm_steps=600``) or, for one recipe stage,
    ``STAGE.key=value`` (``train.optimizer.lr=3e-3``)."""
    types = {f.name: f.type for f in fields(DemoSettings)}
    values: Dict[str, Any] = {}
    overrides: Dict[str, List[str]] = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"medcap demo: expected key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        stage, _, sub = key.partition(".")
        if sub and stage in RECIPE_STAGES:
            overrides.setdefault(stage, []).append(f"{sub}={value}")
            continue
        if key not in types:
            raise SystemExit(
                f"medcap demo: unknown setting {key!r}; settings are {sorted(types)}, or STAGE.key=value "
                f"for the recipe stages {sorted(RECIPE_STAGES)}"
            )
        kind = str(types[key])
        try:
            if value.lower() in ("null", "none") and "Optional" in kind:
                values[key] = None
            elif "int" in kind:
                values[key] = int(value)
            elif "float" in kind:
                values[key] = float(value)
            else:
                values[key] = value
        except ValueError:
            raise SystemExit(f"medcap demo: {key}={value!r} is not a valid {kind}") from None
    return replace(base, **values), overrides
