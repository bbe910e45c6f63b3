"""Resumable results files: a run cut at any byte continues after the last complete
row, and the finished file equals an uninterrupted run's; one writer per file."""

from __future__ import annotations

import csv

import pytest

from medcap.eval import read_csv_rows
from medcap.eval._results import CsvJournal, JsonlCache

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


def test_a_damaged_row_in_the_middle_costs_only_itself(tmp_path, caplog):
    """A garbled record mid-file (a torn write followed by more rows): every intact row
    before and after it is kept, the damage is reported, and recovery is linear."""
    final = tmp_path / "r.csv"
    j = CsvJournal(final, COLUMNS)
    rows = [{"image": f"{i}.png", "instruction": f'line "{i}"\nmore', "output": str(i), "generated": f"g{i}"}
            for i in range(3000)]
    j.append(rows)
    data = j.path.read_bytes()
    cut = data.index(b"1500.png")
    # Row 1500 loses its middle (from inside its quoted field to its last line): its
    # quotes no longer balance, so a naive reader would swallow every later row.
    torn = data[:cut] + data[cut : cut + 20] + b"\n" + data[data.index(b"1501.png") :]
    j.path.write_bytes(torn)
    import time

    t0 = time.perf_counter()
    j2 = CsvJournal(final, COLUMNS)
    elapsed = time.perf_counter() - t0
    kept = [r["output"] for r in j2.rows()]
    assert kept == [str(i) for i in range(3000) if i != 1500]
    assert j2.dropped_bytes > 0 and "dropped 1 damaged record" in j2.damage_report()
    assert CsvJournal(final, COLUMNS).rows() == j2.rows()  # the file was rewritten with the intact rows
    assert elapsed < 20  # the quadratic scan took minutes for this size
    # A cut row with the next row glued onto its line (no newline between) costs both.
    j2.path.write_bytes(torn.replace(b"\n" + data[data.index(b"1501.png") :], data[data.index(b"1501.png") :]))
    assert [r["output"] for r in CsvJournal(final, COLUMNS).rows()] == [str(i) for i in range(3000) if i not in (1500, 1501)]


def test_append_never_recreates_a_vanished_journal(tmp_path):
    j = CsvJournal(tmp_path / "r.csv", COLUMNS)
    j.append(ROWS[:1])
    j.path.unlink()
    with pytest.raises(FileNotFoundError, match="vanished"):
        j.append(ROWS[1:2])
    assert not j.path.exists()


def test_a_second_writer_is_refused_at_once_naming_the_holder(tmp_path):
    import os
    import subprocess
    import sys
    import textwrap

    from medcap._io import LockedError
    from medcap.eval import results_lock

    raw = tmp_path / "omnimedvqa-omit-raw-ck-0_50.csv"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from medcap.eval import results_lock
            with results_lock({str(raw)!r}):
                print("held", flush=True)
                time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=rf"in use by process {holder.pid}") as e:
            with results_lock(raw):
                pass
        assert e.value.holder == holder.pid
    finally:
        holder.kill()
        holder.wait()
    # The kernel released it with the process: the next run goes ahead.
    with results_lock(raw):
        assert os.path.exists(raw.with_name("." + raw.name + ".lock"))
