"""Models: the fused model and its builders (names for configs' ``_component_``), the
Llama 3 tokenizer, ``load_model`` (build, load the weights, freeze), and the
checkpoints of the trained vision side (medcap's safetensors + JSON format, and the
reference's ``{'visual','projector'}`` .pt).

Where each lives: ``_model`` (the model and its builders), ``_tokenizer``,
``_llama_weights`` (the frozen LLM from a Hugging Face folder), ``_vision_checkpoint``
(the trained part to and from disk), ``_load`` (``load_model``, the dtype names).
"""

from medcap.models._llama_weights import load_llama_weights
from medcap.models._load import load_model, resolve_dtype
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
    open_clip_weights_file,
    tiny_tower,
)
from medcap.models._tokenizer import llama3_tokenizer, model_vocab_size, write_tiktoken_tokenizer
from medcap.models._vision_checkpoint import load_vision_checkpoint, load_vision_weights, save_vision_checkpoint

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
    "open_clip_weights_file",
    "resolve_dtype",
    "save_vision_checkpoint",
    "tiny_tower",
    "write_tiktoken_tokenizer",
]
