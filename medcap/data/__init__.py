"""Data: the image-aware sharegpt chat dataset, image loading and transform, collate,
the bad-sample policy, ``validate-data`` and the logic behind the data tools.

Names are resolved on first use (PEP 562), so that the data tools
(``tools/convert_to_sharegpt.py``) start without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "medcap.data._collate": ["collate_image_chat"],
    "medcap.data._convert": ["CAPTION_INSTRUCTIONS", "Converter", "clean_text", "convert_main"],
    "medcap.data._dataset": ["ImageChatDataset", "chat_dataset", "image_chat_dataset"],
    "medcap.data._image": [
        "DEFAULT_MAX_IMAGE_PIXELS",
        "ImageTransform",
        "image_transform",
        "load_dicom",
        "load_image",
        "pad_to_square",
        "resize_center_crop",
        "to_rgb",
    ],
    "medcap.data._preprocess": ["find_images", "preprocess_file", "preprocess_image", "preprocess_images"],
    "medcap.data._records": [
        "IMAGE_MARKER",
        "PLACEHOLDER_CHAR",
        "ParsedRecord",
        "Turn",
        "parse_meta",
        "parse_record",
        "read_index",
    ],
    "medcap.data._skip": ["BAD_SAMPLE_POLICIES", "BadSample", "SkipLog"],
    "medcap.data._tokenize": [
        "CROSS_ENTROPY_IGNORE_IDX",
        "Tokenized",
        "make_labels",
        "tokenize_conversation",
        "truncate_tokenized",
    ],
    "medcap.data._validate": ["format_report", "validate_data", "validate_main"],
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'medcap.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, eagerly
    from medcap.data._collate import collate_image_chat  # noqa: F401
    from medcap.data._convert import CAPTION_INSTRUCTIONS, Converter, clean_text, convert_main  # noqa: F401
    from medcap.data._dataset import ImageChatDataset, chat_dataset, image_chat_dataset  # noqa: F401
    from medcap.data._image import (  # noqa: F401
        DEFAULT_MAX_IMAGE_PIXELS,
        ImageTransform,
        image_transform,
        load_dicom,
        load_image,
        pad_to_square,
        resize_center_crop,
        to_rgb,
    )
    from medcap.data._preprocess import find_images, preprocess_file, preprocess_image, preprocess_images  # noqa: F401
    from medcap.data._records import (  # noqa: F401
        IMAGE_MARKER,
        PLACEHOLDER_CHAR,
        ParsedRecord,
        Turn,
        parse_meta,
        parse_record,
        read_index,
    )
    from medcap.data._skip import BAD_SAMPLE_POLICIES, BadSample, SkipLog  # noqa: F401
    from medcap.data._tokenize import (  # noqa: F401
        CROSS_ENTROPY_IGNORE_IDX,
        Tokenized,
        make_labels,
        tokenize_conversation,
        truncate_tokenized,
    )
    from medcap.data._validate import format_report, validate_data, validate_main  # noqa: F401
