"""Results files that lose nothing: rows are appended to ``<name>.partial.csv`` and
flushed to disk (fsync) as they complete; the file is renamed to its final name
when the run is complete. A restarted run reads the partial file back, drops a
half-written last record (a ``kill -9`` can cut a line anywhere), and continues
after the last complete row. The finished file is byte-identical to the one an
uninterrupted run writes.

A record counts as complete only if writing its parsed fields again gives back
exactly the bytes on disk: this catches a record cut inside a quoted field
(which Python's csv reader would otherwise return silently shortened).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

BOM = "\ufeff"


def cell(value: Any) -> str:
    """A value as it is written to a results CSV (None/NaN -> empty, CR -> LF)."""
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    # A bare CR is not quoted by the csv module when the line end is LF; normalise it.
    return str(value).replace("\r\n", "\n").replace("\r", "\n")


def _format(row: Sequence[str]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(row)
    return buf.getvalue()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def partial_path(final_path: str | Path) -> Path:
    final_path = Path(final_path)
    return final_path.with_name(final_path.stem + ".partial" + final_path.suffix)


def read_csv_rows(path: str | Path) -> List[Dict[str, str]]:
    """All rows of a results CSV as dicts of strings (empty cells stay empty strings)."""
    with open(path, "r", encoding="utf-8-sig", newline="") as f:
        return [dict(r) for r in csv.DictReader(f)]


def write_csv_atomic(path: str | Path, columns: Sequence[str], rows: Iterable[Mapping[str, Any]], *, bom: bool = False) -> Path:
    """Write a whole CSV through a temporary file and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        if bom:
            f.write(BOM)
        f.write(_format(list(columns)))
        for r in rows:
            f.write(_format([cell(r.get(c)) for c in columns]))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


class CsvJournal:
    """Append-only CSV rows with crash recovery; see the module docstring.

    ``rows()`` returns the rows already written (after recovery), ``append()``
    writes and fsyncs, ``finish()`` renames the partial file to ``final_path``.
    """

    def __init__(
        self,
        final_path: Optional[str | Path],
        columns: Sequence[str],
        *,
        bom: bool = False,
        partial: Optional[str | Path] = None,
    ):
        if final_path is None and partial is None:
            raise ValueError("CsvJournal needs final_path or partial")
        self.final_path = None if final_path is None else Path(final_path)
        self.path = Path(partial) if partial is not None else partial_path(self.final_path)
        self.columns = list(columns)
        self.bom = bom
        self._rows: List[Dict[str, str]] = []
        self.dropped_bytes = 0
        self._open()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        header = (BOM if self.bom else "") + _format(self.columns)
        if not self.path.exists() or self.path.stat().st_size == 0:
            with open(self.path, "wb") as f:
                f.write(header.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(self.path.parent)
            return
        data = self.path.read_bytes()
        hb = header.encode("utf-8")
        if not data.startswith(hb):
            if hb.startswith(data):  # killed while writing the header
                self.path.write_bytes(hb)
                return
            raise ValueError(
                f"{self.path} exists but its header is not {self.columns}; it belongs to another "
                "kind of run. Move it away (or use another output_dir) and run again."
            )
        good = len(hb)
        lines = data[len(hb) :].split(b"\n")
        # Every complete record ends with "\n", so the piece after the last one is partial.
        physical = [ln + b"\n" for ln in lines[:-1]]
        i = 0
        while i < len(physical):
            ok = False
            for j in range(i + 1, len(physical) + 1):
                chunk = b"".join(physical[i:j])
                try:
                    text = chunk.decode("utf-8")
                except UnicodeDecodeError:
                    break
                recs = list(csv.reader(io.StringIO(text, newline="")))
                if len(recs) == 1 and len(recs[0]) == len(self.columns) and _format(recs[0]) == text:
                    self._rows.append(dict(zip(self.columns, recs[0])))
                    good += len(chunk)
                    i = j
                    ok = True
                    break
            if not ok:
                break
        if good < len(data):
            self.dropped_bytes = len(data) - good
            with open(self.path, "r+b") as f:
                f.truncate(good)
                f.flush()
                os.fsync(f.fileno())

    def rows(self) -> List[Dict[str, str]]:
        return list(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def append(self, rows: Iterable[Mapping[str, Any]]) -> None:
        new = [{c: cell(r.get(c)) for c in self.columns} for r in rows]
        if not new:
            return
        with open(self.path, "ab") as f:
            f.write("".join(_format([r[c] for c in self.columns]) for r in new).encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        self._rows.extend(new)

    def finish(self, final_path: Optional[str | Path] = None) -> Path:
        """Rename the partial file to its final name (atomic)."""
        final = Path(final_path) if final_path is not None else self.final_path
        if final is None:
            raise ValueError("no final path to rename the journal to")
        os.replace(self.path, final)
        _fsync_dir(final.parent)
        return final


class JsonlCache:
    """A key -> value store appended line by line (fsync'd); a cut last line is dropped."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.data: Dict[str, Any] = {}
        if self.path.exists():
            raw = self.path.read_bytes()
            good = 0
            for line in raw.split(b"\n")[:-1]:
                try:
                    rec = json.loads(line.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    break
                self.data[rec["key"]] = rec["value"]
                good += len(line) + 1
            if good < len(raw):
                with open(self.path, "r+b") as f:
                    f.truncate(good)

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def put_many(self, items: Mapping[str, Any]) -> None:
        if not items:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as f:
            for k, v in items.items():
                f.write((json.dumps({"key": k, "value": v}, ensure_ascii=False) + "\n").encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        self.data.update(items)
