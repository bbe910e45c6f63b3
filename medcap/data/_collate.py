"""Batching image-chat samples: right padding, images stacked in batch order."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence

import torch

from medcap.data._tokenize import CROSS_ENTROPY_IGNORE_IDX


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
