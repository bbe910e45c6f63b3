"""The training dataset and its collate: sharegpt records -> tokens, labels and an image
-> padded batches.

In order: ``ImageChatDataset`` (construction reads the JSON index and nothing else; a
record is parsed, tokenized, truncated and its image loaded in ``__getitem__``, which
runs in DataLoader workers); its builders ``image_chat_dataset`` and ``chat_dataset``
(torchtune's ``chat_dataset`` arguments: a torchtune config changes only its
``_component_``); then ``collate_image_chat`` (right padding, images stacked in batch
order). Each item is::

    {"tokens": List[int], "labels": List[int],        # labels unshifted
     "image": FloatTensor[3, S, S] | None,             # None: text-only sample
     "index": int,                                     # the record actually used
     "skipped": List[Tuple[int, str]]}                 # bad records passed over to get here
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch.utils.data import Dataset

from medcap.data._bad_samples import BadSample, SkipLog, check_policy
from medcap.data._image import DEFAULT_MAX_IMAGE_PIXELS, ImageTransform, load_image
from medcap.data._records import ParsedRecord, RecordIndex, parse_record, read_index
from medcap.data._tokens import CROSS_ENTROPY_IGNORE_IDX, Tokenized, make_labels, tokenize_conversation, truncate_tokenized


# ---- The dataset

_SPLIT_RE = re.compile(r"^\s*(\w+)\s*(?:\[\s*([-\d.]*%?)\s*:\s*([-\d.]*%?)\s*\])?\s*$")


def _split_bounds(split: str, n: int) -> range:
    """``"train"`` (all), or a Hugging Face style slice ``"train[:90%]"``, ``"train[100:]"``."""
    m = _SPLIT_RE.match(split or "train")
    if not m or m.group(1) != "train":
        raise ValueError(
            f"split {split!r} is not supported: a JSON dataset has one split, 'train', "
            "optionally sliced like 'train[:95%]' or 'train[1000:]'"
        )

    def bound(s: Optional[str], default: int) -> int:
        if s is None or s == "":
            return default
        v = round(n * float(s[:-1]) / 100) if s.endswith("%") else int(s)
        return max(0, min(n, v + n if v < 0 else v))

    return range(bound(m.group(2), 0), bound(m.group(3), n))


class ImageChatDataset(Dataset):
    """See the module docstring; build it with :func:`image_chat_dataset`."""

    def __init__(
        self,
        tokenizer,
        *,
        source: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
        num_image_tokens: int = 50,
        image_size: int = 224,
        max_seq_len: Optional[int] = None,
        train_on_input: bool = False,
        conversation_column: str = "conversations",
        image_column: str = "image",
        new_system_prompt: Optional[str] = None,
        image_dir: Optional[Union[str, os.PathLike]] = None,
        bad_samples: str = "skip",
        split: str = "train",
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ):
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
        if not hasattr(tokenizer, "image_id"):
            raise TypeError(
                f"the tokenizer {type(tokenizer).__name__} has no image_id; use medcap.models.llama3_tokenizer"
            )
        self._tokenizer = tokenizer
        self.source = source
        self.num_image_tokens = int(num_image_tokens)
        self.image_size = int(image_size)
        self.max_seq_len = max_seq_len if max_seq_len else getattr(tokenizer, "max_seq_len", None)
        self.train_on_input = bool(train_on_input)
        self.conversation_column = conversation_column
        self.image_column = image_column
        self.new_system_prompt = new_system_prompt
        self.image_dir = Path(image_dir) if image_dir else None
        self.bad_samples = check_policy(bad_samples)
        self.max_image_pixels = int(max_image_pixels)
        self.transform = ImageTransform(self.image_size)
        self._index: RecordIndex = read_index(source)
        self._rows = _split_bounds(split, len(self._index))
        # Per-process memory of records already found bad: a later epoch skips them
        # without re-decoding, and still reports them (the SkipLog dedups).
        self._known_bad: Dict[int, str] = {}
        self.skip_log = SkipLog(total=len(self))

    # ---- plumbing

    def __len__(self) -> int:
        return len(self._rows)

    def record(self, index: int) -> Any:
        """The raw record (parsed JSON) behind dataset index ``index``. Raises BadSample."""
        return self._index[self._rows[index]]

    def origin(self, index: int) -> str:
        """Where record ``index`` sits in its file ("train.jsonl line 12", "train.json item 3")."""
        return self._index.origin(self._rows[index])

    def parse(self, index: int) -> ParsedRecord:
        """Record ``index`` as checked turns and a resolved image path. Raises BadSample."""
        row = self._rows[index]
        return parse_record(
            self._index[row],
            conversation_column=self.conversation_column,
            image_column=self.image_column,
            image_dir=self.image_dir,
            json_dir=self._index.file_of(row).parent,
            new_system_prompt=self.new_system_prompt,
        )

    def tokenize(self, parsed: ParsedRecord) -> Tokenized:
        """Untruncated tokens/mask of a parsed record."""
        return tokenize_conversation(
            self._tokenizer,
            parsed.turns,
            num_image_tokens=self.num_image_tokens,
            train_on_input=self.train_on_input,
        )

    def load_image(self, parsed: ParsedRecord):
        """The transformed image tensor ``[3, S, S]`` of a parsed record (None when text-only)."""
        if parsed.image_path is None:
            return None
        if not parsed.image_path.exists() and len(parsed.image_candidates) > 1:
            tried = ", ".join(str(c) for c in parsed.image_candidates)
            raise BadSample(f"image not found: tried {tried}")
        img = load_image(parsed.image_path, max_pixels=self.max_image_pixels)
        try:
            return self.transform(img)
        except Exception as e:  # a transform failure is a property of this file, not of the run
            raise BadSample(f"corrupt image: {parsed.image_path}: transform failed: {type(e).__name__}: {e}") from e

    # ---- samples

    def build(self, index: int) -> Dict[str, Any]:
        """Sample ``index`` or BadSample: text first (cheap), then the image."""
        parsed = self.parse(index)
        full = self.tokenize(parsed)
        t = truncate_tokenized(full, self.max_seq_len, self.num_image_tokens)
        image = self.load_image(parsed)
        return {
            "tokens": t.tokens,
            "labels": make_labels(t, self.num_image_tokens),
            "image": image,
            "index": index,
            "full_length": t.full_length,
            "truncated": t.truncated,
        }

    def check(self, index: int) -> Dict[str, Any]:
        """What validate-data reports for one record: ok/reason, length, truncation, image."""
        try:
            s = self.build(index)
        except BadSample as e:
            return {"index": index, "ok": False, "reason": e.reason}
        return {
            "index": index,
            "ok": True,
            "length": s["full_length"],
            "truncated": s["truncated"],
            "has_image": s["image"] is not None,
        }

    def __getitem__(self, index: int) -> Dict[str, Any]:
        """Sample ``index``; a bad record never kills a run.

        Under ``bad_samples="skip"`` it is the first good record among ``index, index+1,
        ...`` (wrapping), so ``len`` and any sampler stay valid and the choice is
        deterministic; the records passed over travel back in ``item["skipped"]`` for a
        :class:`SkipLog` in the training process. Under ``"raise"`` a bad record raises
        :class:`BadSample` naming its index and reason.
        """
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} samples")
        skipped: List[tuple] = []
        for step in range(n):
            i = (index + step) % n
            reason = self._known_bad.get(i)
            if reason is None:
                try:
                    item = self.build(i)
                except BadSample as e:
                    reason = e.reason
                    self._known_bad[i] = reason
                else:
                    del item["full_length"], item["truncated"]
                    item["skipped"] = skipped
                    return item
            if self.bad_samples == "raise":
                raise BadSample(reason, i)
            skipped.append((i, reason))
        raise RuntimeError(
            f"every one of the {n} samples in {self.source!s} is bad; first reasons: "
            + "; ".join(f"#{i}: {r}" for i, r in skipped[:3])
            + ". Run `medcap validate-data` on the file for the full list."
        )

    def __repr__(self) -> str:
        return (
            f"ImageChatDataset(source={self.source!s}, samples={len(self)}, num_image_tokens={self.num_image_tokens}, "
            f"image_size={self.image_size}, max_seq_len={self.max_seq_len}, bad_samples={self.bad_samples!r})"
        )


def image_chat_dataset(
    tokenizer,
    *,
    source: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
    num_image_tokens: int = 50,
    image_size: int = 224,
    max_seq_len: Optional[int] = None,
    train_on_input: bool = False,
    conversation_style: str = "sharegpt",
    conversation_column: str = "conversations",
    image_column: str = "image",
    bad_samples: str = "skip",
    new_system_prompt: Optional[str] = None,
    image_dir: Optional[Union[str, os.PathLike]] = None,
    split: str = "train",
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    packed: bool = False,
) -> ImageChatDataset:
    """A sharegpt image-chat dataset from a ``.json`` list, a ``.jsonl`` file, several, or a folder.

    Args:
        tokenizer: a Llama 3 tokenizer (``medcap.models.llama3_tokenizer``); its ``image_id``
            is the placeholder token.
        source: the dataset file(s) or folder.
        num_image_tokens: placeholders per image; must equal the projector's output count.
        image_size: side of the square image the vision tower takes.
        max_seq_len: truncate longer samples from the end (never into the image);
            defaults to the tokenizer's ``max_seq_len``; None: no limit.
        train_on_input: also learn the user/system turns.
        conversation_style: only ``"sharegpt"``.
        conversation_column / image_column: record keys.
        bad_samples: ``"skip"`` (default; next good sample, reported) or ``"raise"``.
        new_system_prompt: replaces the records' system turns with this one.
        image_dir: where relative image paths are looked for when ``meta`` has no
            absolute ``dir=`` (after ``dir=`` itself); the JSON file's folder is tried last.
        split: ``"train"`` or a slice such as ``"train[:95%]"``.
        max_image_pixels: decompression-bomb guard.
        packed: not supported (an image sample cannot be packed); True is an error.
    """
    _refuse_unsupported(conversation_style, packed)
    return ImageChatDataset(
        tokenizer,
        source=source,
        num_image_tokens=num_image_tokens,
        image_size=image_size,
        max_seq_len=max_seq_len,
        train_on_input=train_on_input,
        conversation_column=conversation_column,
        image_column=image_column,
        new_system_prompt=new_system_prompt,
        image_dir=image_dir,
        bad_samples=bad_samples,
        split=split,
        max_image_pixels=max_image_pixels,
    )


def _refuse_unsupported(conversation_style: str, packed: bool) -> None:
    if conversation_style != "sharegpt":
        raise ValueError(
            f"conversation_style {conversation_style!r} is not supported: medcap reads sharegpt records "
            "({'conversations': [{'from', 'value'}], 'image', 'meta'})"
        )
    if packed:
        raise ValueError(
            "packed=True is not supported: packing would merge image samples whose placeholders the model "
            "fills per sample. Set dataset.packed=False."
        )


def chat_dataset(
    tokenizer,
    *,
    source: str,
    conversation_column: str = "conversations",
    conversation_style: str = "sharegpt",
    train_on_input: bool = False,
    new_system_prompt: Optional[str] = None,
    packed: bool = False,
    filter_fn=None,
    split: str = "train",
    max_seq_len: Optional[int] = None,
    chat_format: Optional[str] = None,
    data_files: Optional[Union[str, Sequence[str]]] = None,
    num_image_tokens: int = 50,
    image_size: int = 224,
    bad_samples: str = "skip",
    image_dir: Optional[str] = None,
    **kwargs: Any,
) -> ImageChatDataset:
    """``torchtune.datasets.chat_dataset``'s arguments, giving an :class:`ImageChatDataset`.

    So that a config written for torchtune (or the reference's
    ``dataset.source=TRAIN.json``) works by changing only ``_component_``.
    ``source`` is the JSON path, or ``"json"`` with ``data_files`` (Hugging Face
    style). ``filter_fn``, ``chat_format`` and other Hugging Face loader options
    have no meaning here and are refused rather than silently ignored.
    """
    if filter_fn is not None:
        raise ValueError("filter_fn is not supported by medcap's chat_dataset; filter the JSON file instead")
    if chat_format is not None:
        raise ValueError(
            "chat_format is not supported: the Llama 3 tokenizer applies its own chat template with special tokens"
        )
    if kwargs:
        raise ValueError(f"unsupported chat_dataset arguments for a medcap dataset: {sorted(kwargs)}")
    if source in ("json", "jsonl") and data_files is None:
        raise ValueError(f"source={source!r} needs data_files=PATH (or pass the file as source)")
    return image_chat_dataset(
        tokenizer,
        source=data_files if source in ("json", "jsonl") else source,
        num_image_tokens=num_image_tokens,
        image_size=image_size,
        max_seq_len=max_seq_len,
        train_on_input=train_on_input,
        conversation_style=conversation_style,
        conversation_column=conversation_column,
        bad_samples=bad_samples,
        new_system_prompt=new_system_prompt,
        image_dir=image_dir,
        split=split,
        packed=packed,
    )


# ---- Collate

def collate_image_chat(
    batch: Sequence[Mapping[str, Any]],
    pad_id: int = 0,
    ignore_idx: int = CROSS_ENTROPY_IGNORE_IDX,
    pad_to_multiple_of: int = 1,
) -> Dict[str, Any]:
    """Pad and stack dataset items.

    Returns ``tokens`` and ``labels`` ``LongTensor[b, L]`` (right padded with
    ``pad_id`` / ``ignore_idx``; ``L`` rounded up to ``pad_to_multiple_of``),
    ``images`` ``FloatTensor[n, 3, S, S]`` holding only the samples that have an
    image, in batch order (what ``MedcapModel`` pairs with the placeholder runs),
    or None when no sample has one, ``indices`` (LongTensor[b], the records used)
    and ``skipped`` (list of ``(index, reason)`` the dataset passed over; merge
    it into a ``SkipLog`` and drop it before moving the batch to a device).
    """
    if not batch:
        raise ValueError("collate_image_chat got an empty batch")
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    lengths = [len(s["tokens"]) for s in batch]
    for k, s in enumerate(batch):
        if len(s["labels"]) != lengths[k]:
            raise ValueError(f"sample {k}: {lengths[k]} tokens but {len(s['labels'])} labels")
    width = max(lengths)
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    tokens = torch.full((len(batch), width), pad_id, dtype=torch.long)  # [b, L]
    labels = torch.full((len(batch), width), ignore_idx, dtype=torch.long)  # [b, L]
    for k, s in enumerate(batch):
        tokens[k, : lengths[k]] = torch.as_tensor(s["tokens"], dtype=torch.long)
        labels[k, : lengths[k]] = torch.as_tensor(s["labels"], dtype=torch.long)

    imgs: List[torch.Tensor] = [s["image"] for s in batch if s.get("image") is not None]
    if imgs:
        shapes = {tuple(i.shape) for i in imgs}
        if len(shapes) > 1:
            raise ValueError(f"images of different shapes in one batch: {sorted(shapes)}; use one image_size")
        images = torch.stack(imgs).float()  # [n, 3, S, S]
    else:
        images = None
    skipped: List[tuple] = []
    for s in batch:
        skipped.extend(tuple(x) for x in s.get("skipped") or ())
    out: Dict[str, Any] = {"tokens": tokens, "labels": labels, "images": images, "skipped": skipped}
    if all("index" in s for s in batch):
        out["indices"] = torch.as_tensor([s["index"] for s in batch], dtype=torch.long)
    return out
