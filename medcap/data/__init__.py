"""Data: sharegpt image-chat records -> the training dataset and its batches, plus the
tools that check and prepare data sets.

On the training path, in order: ``_records`` (the index of a dataset's files and one
record checked into turns + an image path), ``_tokens`` (turns -> tokens and labels
with image placeholders), ``_image`` (decoding and the transform), ``_dataset`` (the
dataset and collate); ``_bad_samples`` (the skip policy) serves them all. Off the
path: ``_validate`` (``medcap validate-data``), ``_preprocess``
(``tools/preprocess_images.py``) and ``_convert`` with ``_converter`` and
``_convert_vqa`` (``tools/convert_to_sharegpt.py``).

Names are resolved on first use (PEP 562), so that the data tools start without
importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from medcap import lazy_attrs

_EXPORTS = {
    "medcap.data._bad_samples": ["BadSample", "SkipLog"],
    "medcap.data._convert": ["convert_main"],
    "medcap.data._convert_vqa": ["vqa_parquet_columns"],
    "medcap.data._dataset": ["chat_dataset", "collate_image_chat", "image_chat_dataset"],
    "medcap.data._image": ["decode_image_bytes", "image_transform", "load_image", "resize_center_crop"],
    "medcap.data._preprocess": ["preprocess_images", "preprocess_main"],
    "medcap.data._records": ["IMAGE_MARKER", "PLACEHOLDER_CHAR", "Turn", "parse_record", "read_index"],
    "medcap.data._tokens": ["CROSS_ENTROPY_IGNORE_IDX", "make_labels", "tokenize_conversation"],
    "medcap.data._validate": ["validate_main"],
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)

__getattr__, __dir__ = lazy_attrs(__name__, _WHERE)

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, eagerly
    from medcap.data._bad_samples import BadSample, SkipLog  # noqa: F401
    from medcap.data._convert import convert_main  # noqa: F401
    from medcap.data._convert_vqa import vqa_parquet_columns  # noqa: F401
    from medcap.data._dataset import chat_dataset, collate_image_chat, image_chat_dataset  # noqa: F401
    from medcap.data._image import decode_image_bytes, image_transform, load_image, resize_center_crop  # noqa: F401
    from medcap.data._preprocess import preprocess_images, preprocess_main  # noqa: F401
    from medcap.data._records import IMAGE_MARKER, PLACEHOLDER_CHAR, Turn, parse_record, read_index  # noqa: F401
    from medcap.data._tokens import CROSS_ENTROPY_IGNORE_IDX, make_labels, tokenize_conversation  # noqa: F401
    from medcap.data._validate import validate_main  # noqa: F401
