"""Data: the image-aware sharegpt chat dataset, image loading and transform, collate,
the bad-sample policy, ``validate-data`` and the logic behind the data tools.

Names are resolved on first use (PEP 562), so that the data tools
(``tools/convert_to_sharegpt.py``) start without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from medcap import lazy_attrs

_EXPORTS = {
    "medcap.data._convert": ["convert_main"],
    "medcap.data._dataset": ["chat_dataset", "collate_image_chat", "image_chat_dataset"],
    "medcap.data._image": ["image_transform", "load_image", "resize_center_crop"],
    "medcap.data._preprocess": ["preprocess_images"],
    "medcap.data._records": [
        "CROSS_ENTROPY_IGNORE_IDX",
        "IMAGE_MARKER",
        "PLACEHOLDER_CHAR",
        "BadSample",
        "SkipLog",
        "Turn",
        "make_labels",
        "parse_record",
        "read_index",
        "tokenize_conversation",
    ],
    "medcap.data._validate": ["validate_main"],
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)

__getattr__, __dir__ = lazy_attrs(__name__, _WHERE)

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, eagerly
    from medcap.data._convert import convert_main  # noqa: F401
    from medcap.data._dataset import chat_dataset, collate_image_chat, image_chat_dataset  # noqa: F401
    from medcap.data._image import image_transform, load_image, resize_center_crop  # noqa: F401
    from medcap.data._preprocess import preprocess_images  # noqa: F401
    from medcap.data._records import (  # noqa: F401
        CROSS_ENTROPY_IGNORE_IDX,
        IMAGE_MARKER,
        PLACEHOLDER_CHAR,
        BadSample,
        SkipLog,
        Turn,
        make_labels,
        parse_record,
        read_index,
        tokenize_conversation,
    )
    from medcap.data._validate import validate_main  # noqa: F401
