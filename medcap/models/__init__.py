"""Models: the vision tower, projector, fused model, builders and tokenizers."""

from medcap.models._builders import (
    LLAMA3_IMAGE_TOKEN_ID,
    NUM_IMAGE_TOKENS,
    VISION_CHOICES,
    check_vision,
    medcap_fusion,
    medcap_llama3_1_8b,
    medcap_tiny,
)
from medcap.models._fusion import ImageTokenMismatchError, MedcapModel, assert_only_vision_trainable
from medcap.models._tokenizer import (
    IMAGE_TOKEN,
    llama3_tokenizer,
    model_vocab_size,
    special_token_map,
    write_tiktoken_tokenizer,
)
from medcap.models._vision import (
    BIOMEDCLIP_HUB_ID,
    BIOMEDCLIP_MEAN,
    BIOMEDCLIP_STD,
    ImageTower,
    VisionEncoder,
    biomedclip_tower,
    load_open_clip_visual,
    projector,
    tiny_tower,
)

__all__ = [
    "BIOMEDCLIP_HUB_ID",
    "BIOMEDCLIP_MEAN",
    "BIOMEDCLIP_STD",
    "IMAGE_TOKEN",
    "ImageTokenMismatchError",
    "ImageTower",
    "LLAMA3_IMAGE_TOKEN_ID",
    "MedcapModel",
    "NUM_IMAGE_TOKENS",
    "VISION_CHOICES",
    "VisionEncoder",
    "assert_only_vision_trainable",
    "biomedclip_tower",
    "check_vision",
    "llama3_tokenizer",
    "load_open_clip_visual",
    "medcap_fusion",
    "medcap_llama3_1_8b",
    "medcap_tiny",
    "model_vocab_size",
    "projector",
    "special_token_map",
    "tiny_tower",
    "write_tiktoken_tokenizer",
]
