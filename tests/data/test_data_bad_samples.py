"""The bad-sample policy: skip to the next good sample, deterministically, and a SkipLog that
logs and counts each bad record once."""

from __future__ import annotations

import logging

from medcap.data import SkipLog
from tests.data.chat_samples import BAD
from tests.data.chat_samples import make_dataset as _ds


def test_skip_policy_moves_to_next_good_sample_deterministically(tok, tmp_path, dh, caplog):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "bad.png").write_bytes(b"not a png")
    records = [dh.rec(gpt="zero."), BAD["no assistant turn"][0], dh.rec(image="bad.png"), dh.rec(gpt="three."), dh.rec(image="gone.png")]
    ds = _ds(tok, tmp_path, dh, records)
    item = ds[1]
    assert item["index"] == 3 and [i for i, _ in item["skipped"]] == [1, 2]
    assert item["tokens"] == ds[3]["tokens"]
    wrapped = ds[4]  # the last record is bad: wraps to record 0
    assert wrapped["index"] == 0 and wrapped["skipped"][0][0] == 4
    assert ds[1]["skipped"] == item["skipped"]  # same answer the second time (known-bad cache)

    log = SkipLog(total=len(ds))
    with caplog.at_level(logging.WARNING, logger="medcap.data"):
        for i in range(len(ds)):
            log.update(ds[i])
        log.update(ds[2])  # seen again: neither logged nor counted twice
    assert log.count == 3 and sorted(log.reasons) == [1, 2, 4]
    assert sum("skipping sample" in r.message for r in caplog.records) == 3
    s = log.summary()
    assert "3 of 5 skipped (60.00%)" in s
    for kind in ("malformed record", "corrupt image", "image not found"):
        assert f"1 {kind}" in s
    assert log.events > log.count
