"""Checkpoints: Llama weights from Hugging Face folders, and the trained vision side
(medcap's safetensors + JSON format, and the reference's ``{'visual','projector'}`` .pt)."""

from medcap.checkpointing._llama import load_llama_weights
from medcap.checkpointing._vision import (
    atomic_write,
    load_vision_checkpoint,
    load_vision_weights,
    save_vision_checkpoint,
)

__all__ = [
    "atomic_write",
    "load_llama_weights",
    "load_vision_checkpoint",
    "load_vision_weights",
    "save_vision_checkpoint",
]
