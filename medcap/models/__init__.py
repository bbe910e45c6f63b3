"""Models: the fused model and its builders (names for configs' ``_component_``), the
Llama 3 tokenizer, ``load_model`` (build, load the weights, freeze), and the
checkpoints of the trained vision side (medcap's safetensors + JSON format, and the
reference's ``{'visual','projector'}`` .pt)."""

from medcap.models._checkpoint import (
    load_llama_weights,
    load_model,
    load_vision_checkpoint,
    load_vision_weights,
    save_vision_checkpoint,
)
from medcap.models._model import (
    BIOMEDCLIP_MEAN,
    BIOMEDCLIP_STD,
    ImageTokenMismatchError,
    MedcapModel,
    assert_only_vision_trainable,
    biomedclip_tower,
    hf_llama3_1_config,
    medcap_fusion,
    medcap_llama3_1_8b,
    medcap_tiny,
    tiny_tower,
)
from medcap.models._tokenizer import llama3_tokenizer, model_vocab_size, write_tiktoken_tokenizer

__all__ = [
    "BIOMEDCLIP_MEAN",
    "BIOMEDCLIP_STD",
    "ImageTokenMismatchError",
    "MedcapModel",
    "assert_only_vision_trainable",
    "biomedclip_tower",
    "hf_llama3_1_config",
    "llama3_tokenizer",
    "load_llama_weights",
    "load_model",
    "load_vision_checkpoint",
    "load_vision_weights",
    "medcap_fusion",
    "medcap_llama3_1_8b",
    "medcap_tiny",
    "model_vocab_size",
    "save_vision_checkpoint",
    "tiny_tower",
    "write_tiktoken_tokenizer",
]
