"""Models: the fused model and its builders (names for configs' ``_component_``), the
Llama 3 tokenizer, and ``load_model`` (build, load the weights, freeze)."""

from medcap.models._builders import medcap_llama3_1_8b, medcap_tiny
from medcap.models._fusion import ImageTokenMismatchError, MedcapModel, assert_only_vision_trainable
from medcap.models._load import load_model
from medcap.models._tokenizer import llama3_tokenizer, write_tiktoken_tokenizer
from medcap.models._vision import BIOMEDCLIP_MEAN, BIOMEDCLIP_STD

__all__ = [
    "BIOMEDCLIP_MEAN",
    "BIOMEDCLIP_STD",
    "ImageTokenMismatchError",
    "MedcapModel",
    "assert_only_vision_trainable",
    "llama3_tokenizer",
    "load_model",
    "medcap_llama3_1_8b",
    "medcap_tiny",
    "write_tiktoken_tokenizer",
]
