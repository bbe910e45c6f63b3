"""Data: the image-aware sharegpt chat dataset, image loading and transform, collate,
the bad-sample policy, ``validate-data`` and the logic behind the data tools."""

from medcap.data._collate import collate_image_chat
from medcap.data._convert import CAPTION_INSTRUCTIONS, Converter, clean_text, convert_main
from medcap.data._dataset import ImageChatDataset, chat_dataset, image_chat_dataset
from medcap.data._image import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageTransform,
    image_transform,
    load_dicom,
    load_image,
    pad_to_square,
    resize_center_crop,
    to_rgb,
)
from medcap.data._preprocess import find_images, preprocess_file, preprocess_image, preprocess_images
from medcap.data._records import (
    IMAGE_MARKER,
    PLACEHOLDER_CHAR,
    ParsedRecord,
    Turn,
    parse_meta,
    parse_record,
    read_index,
)
from medcap.data._skip import BAD_SAMPLE_POLICIES, BadSample, SkipLog
from medcap.data._tokenize import Tokenized, make_labels, tokenize_conversation, truncate_tokenized
from medcap.data._validate import format_report, validate_data, validate_main

__all__ = [
    "BAD_SAMPLE_POLICIES",
    "BadSample",
    "CAPTION_INSTRUCTIONS",
    "Converter",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "IMAGE_MARKER",
    "ImageChatDataset",
    "ImageTransform",
    "PLACEHOLDER_CHAR",
    "ParsedRecord",
    "SkipLog",
    "Tokenized",
    "Turn",
    "chat_dataset",
    "clean_text",
    "collate_image_chat",
    "convert_main",
    "find_images",
    "format_report",
    "image_chat_dataset",
    "image_transform",
    "load_dicom",
    "load_image",
    "make_labels",
    "pad_to_square",
    "parse_meta",
    "parse_record",
    "preprocess_file",
    "preprocess_image",
    "preprocess_images",
    "read_index",
    "resize_center_crop",
    "to_rgb",
    "tokenize_conversation",
    "truncate_tokenized",
    "validate_data",
    "validate_main",
]
