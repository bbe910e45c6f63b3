"""Collate over mixed batches, and a DataLoader pass with workers that uses every good
sample and reports every bad one."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.utils.data import DataLoader

from medcap.data import SkipLog, collate_image_chat, image_chat_dataset


def _item(n, image=None, skipped=(), index=0):
    return {"tokens": list(range(1, n + 1)), "labels": [-100] + list(range(2, n + 1)), "image": image,
            "skipped": list(skipped), "index": index}


def test_mixed_batch_pads_right_and_stacks_only_present_images():
    a, c = torch.randn(3, 8, 8), torch.randn(3, 8, 8)
    batch = [_item(3, a, index=5), _item(5, None, skipped=[(2, "image not found: x")], index=6), _item(2, c, index=7)]
    out = collate_image_chat(batch, pad_id=9, ignore_idx=-7)
    assert out["tokens"].dtype == torch.long and out["tokens"].shape == (3, 5)
    assert out["tokens"].tolist() == [[1, 2, 3, 9, 9], [1, 2, 3, 4, 5], [1, 2, 9, 9, 9]]
    assert out["labels"].tolist() == [[-100, 2, 3, -7, -7], [-100, 2, 3, 4, 5], [-100, 2, -7, -7, -7]]
    assert out["images"].shape == (2, 3, 8, 8)
    torch.testing.assert_close(out["images"][0], a)
    torch.testing.assert_close(out["images"][1], c)  # batch order, text-only row left out
    assert out["skipped"] == [(2, "image not found: x")]
    assert out["indices"].tolist() == [5, 6, 7]


def test_text_only_batch_and_pad_to_multiple():
    out = collate_image_chat([_item(3), _item(6)], pad_id=0, pad_to_multiple_of=4)
    assert out["images"] is None and out["tokens"].shape == (2, 8)
    assert out["labels"][0, 3:].eq(-100).all()


def test_collate_rejects_inconsistent_items():
    with pytest.raises(ValueError, match="labels"):
        collate_image_chat([{"tokens": [1, 2], "labels": [1], "image": None}])
    with pytest.raises(ValueError, match="different shapes"):
        collate_image_chat([_item(2, torch.zeros(3, 4, 4)), _item(2, torch.zeros(3, 8, 8))])


def test_dataloader_with_workers_uses_every_good_sample_and_reports_every_bad(tok, tmp_path, dh):
    img = tmp_path / "img"
    for i in range(6):
        dh.save_rgb(img / f"{i}.png", 20 + i, 15, seed=i)
    (img / "zero.png").write_bytes(b"")
    dh.truncated_jpeg(img / "cut.jpg")
    records = []
    good, bad = set(), set()
    for i in range(6):
        good.add(len(records))
        records.append(dh.rec(image=f"{i}.png", gpt=f"image {i}."))
        if i % 2:
            good.add(len(records))
            records.append(dh.rec(human="hello", gpt=f"text {i}.", image=None, meta=None))
    for broken in (dh.rec(image="zero.png"), dh.rec(image="cut.jpg"), dh.rec(image="absent.png"),
                   {"conversations": [{"from": "human", "value": "x"}]}, dh.rec(human="<image>", image=None, meta=None)):
        bad.add(len(records))
        records.append(broken)
    path = dh.write_records(tmp_path / "d.json", records, img)
    ds = image_chat_dataset(tok, source=path, num_image_tokens=3, image_size=16)
    loader = DataLoader(ds, batch_size=4, num_workers=2, shuffle=False,
                        collate_fn=functools.partial(collate_image_chat, pad_id=tok.pad_id))
    log = SkipLog(total=len(ds))
    used = set()
    for batch in loader:
        log.update(batch.pop("skipped"))
        used.update(batch["indices"].tolist())
        n_img = (batch["tokens"] == tok.image_id).sum().item()
        n = 0 if batch["images"] is None else batch["images"].shape[0]
        assert n_img == 3 * n  # the model's placeholder check would pass
    assert used == good
    assert set(log.reasons) == bad
    kinds = sorted(r.split(":")[0] for r in log.reasons.values())
    assert kinds == ["corrupt image", "corrupt image", "image not found", "malformed record", "marker without image"]
    assert f"{len(bad)} of {len(records)} skipped" in log.summary()
