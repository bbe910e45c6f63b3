"""Resumable results files: a run cut at any byte continues after the last complete
row, and the finished file equals an uninterrupted run's."""

from __future__ import annotations

import csv

import pytest

from medcap.eval import CsvJournal, JsonlCache, read_csv_rows

COLUMNS = ["image", "instruction", "output", "generated"]
ROWS = [
    {"image": "a.png", "instruction": "<|begin_of_text|>line one\n\nline two", "output": "yes", "generated": "Yes, it is."},
    {"image": "b.png", "instruction": "q, with \"quotes\"", "output": "no", "generated": ""},
    {"image": "c ü.png", "instruction": "①①①①\n\nWhere?", "output": "left", "generated": "multi\nline\r\nanswer\x00"},
    {"image": "d.png", "instruction": "plain", "output": "1", "generated": "é"},
]


def _uninterrupted(path, bom):
    j = CsvJournal(path, COLUMNS, bom=bom)
    for r in ROWS:
        j.append([r])
    return j.finish().read_bytes()


@pytest.mark.parametrize("bom", [False, True])
def test_cut_at_every_byte_resumes_to_identical_file(tmp_path, bom):
    full = _uninterrupted(tmp_path / "ref.csv", bom)
    assert full.startswith(b"\xef\xbb\xbf") == bom
    header_end = full.index(b"\n") + 1
    # Byte offsets where each complete row ends.
    j = CsvJournal(tmp_path / "probe.csv", COLUMNS, bom=bom)
    ends = []
    for r in ROWS:
        j.append([r])
        ends.append(j.path.stat().st_size)
    for cut in range(0, len(full) + 1):
        final = tmp_path / f"cut{cut}.csv"
        partial = final.with_name(final.stem + ".partial.csv")
        partial.write_bytes(full[:cut])
        j = CsvJournal(final, COLUMNS, bom=bom)
        n_complete = sum(1 for e in ends if e <= cut) if cut >= header_end else 0
        assert len(j) == n_complete, cut
        assert j.rows() == [{c: (r[c].replace("\r\n", "\n")) for c in COLUMNS} for r in ROWS[:n_complete]]
        j.append(ROWS[n_complete:])
        assert j.finish().read_bytes() == full, cut


def test_rows_read_back_as_written(tmp_path):
    path = tmp_path / "x.csv"
    j = CsvJournal(path, COLUMNS, bom=True)
    j.append(ROWS)
    j.finish()
    back = read_csv_rows(path)
    assert [r["generated"] for r in back] == ["Yes, it is.", "", "multi\nline\nanswer\x00", "é"]
    with open(path, encoding="utf-8-sig", newline="") as f:
        assert next(csv.reader(f)) == COLUMNS


def test_foreign_partial_file_is_refused(tmp_path):
    final = tmp_path / "r.csv"
    final.with_name("r.partial.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="another"):
        CsvJournal(final, COLUMNS)


def test_jsonl_cache_drops_a_cut_line(tmp_path):
    path = tmp_path / "d.jsonl"
    c = JsonlCache(path)
    c.put_many({"img1": "a description", "img2": "another"})
    data = path.read_bytes()
    path.write_bytes(data[:-7])  # cut inside the second line
    c2 = JsonlCache(path)
    assert "img1" in c2 and "img2" not in c2 and c2["img1"] == "a description"
    c2.put_many({"img2": "again"})
    assert JsonlCache(path).data == {"img1": "a description", "img2": "again"}
