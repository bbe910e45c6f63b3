"""A results file and the files beside it: rows that are never lost, and a record of
what made them.

In this file, in order:

* cells and whole CSV files (``cell``, ``read_csv_rows``, ``write_csv_atomic``);
* ``CsvJournal``: rows appended to ``<name>.partial.csv`` and fsync'd as they
  complete, renamed to the final name when the file is complete. Reopened after a
  crash, it drops a half-written last record (a ``kill -9`` can cut a line
  anywhere) or a damaged one in the middle and keeps every intact row, so the
  finished file is byte-identical to an uninterrupted run's;
* ``JsonlCache``: a key -> value file appended line by line, fingerprinted with
  what produced its values (the VQA descriptions);
* the record beside a results file (``{raw}.run.json``: the identity of the model
  and settings, a digest of the questions), the files a suite keeps,
  ``results_lock`` (one writer per results file) and ``ResultsRefused`` (files this
  run must not touch: one line for the user, exit status 2).

Why each rule exists: ``docs/internals.md`` (evaluation, results files).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

from medcap._cmdline import UserError
from medcap._io import append_durably, atomic_write_bytes, atomic_write_text, disk_errors, exclusive_lock

log = logging.getLogger(__name__)

# ---- Cells and CSV files

BOM = "\ufeff"


def accuracy_name(acc: float, places: int = 4) -> str:
    """An accuracy as the reference writes it in file names: rounded as numpy rounds
    (``np.round(acc, places)``: the value scaled by ``10**places``, rounded half to even
    as a binary double, scaled back), which differs from Python's ``round`` when the
    scaled value lands on a half (93/160 -> 0.5812 here, 0.5813 by ``round``)."""
    acc = float(acc)
    if not math.isfinite(acc):
        return f"{acc}"
    scale = 10.0 ** places
    return f"{round(acc * scale) / scale}"  # round(x) of a float: half to even on the exact double, as rint


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


def read_csv_rows(path: str | Path) -> List[Dict[str, str]]:
    """All rows of a results CSV as dicts of strings (empty cells stay empty strings)."""
    with open(path, "r", encoding="utf-8-sig", newline="") as f:
        return [dict(r) for r in csv.DictReader(f)]


def write_csv_atomic(path: str | Path, columns: Sequence[str], rows: Iterable[Mapping[str, Any]], *, bom: bool = False) -> Path:
    """Write a whole CSV at once (medcap's one atomic writer: temporary file, fsync, rename)."""
    text = (BOM if bom else "") + _format(list(columns)) + "".join(_format([cell(r.get(c)) for c in columns]) for r in rows)
    return atomic_write_bytes(Path(path), text.encode("utf-8"))


# ---- The journal

# No results row comes near this; a longer candidate is garbage (and is not parsed).
_MAX_RECORD_BYTES = 1 << 22


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


def _scan_records(body: bytes, parse: Callable[[bytes], Any]) -> Iterator[Tuple[Tuple[int, int], Any]]:
    """Split ``body`` into candidate records and parse each, in one linear pass.

    A record written by the csv module ends at a newline outside quotes, i.e. where
    the number of ``"`` since its start is even. A candidate that does not parse as a
    whole row is reported (``None``) and the scan resumes at the next physical line,
    so one damaged record costs only itself, not every row after it. Yields
    ``((start, end), parsed_or_None)``; an unterminated tail is yielded as ``None``.
    """
    # Line starts and the quote parity before each line (prefix parity).
    starts = [0]
    parity = [0]
    p = 0
    for line in body.split(b"\n")[:-1]:
        p ^= line.count(b'"') & 1
        starts.append(starts[-1] + len(line) + 1)
        parity.append(p)
    n = len(starts) - 1  # complete physical lines
    # next_same[i][b]: the first line end j >= i+1 whose prefix parity is b (record end).
    nxt = [[n + 1, n + 1] for _ in range(n + 2)]
    for j in range(n, 0, -1):
        nxt[j - 1] = list(nxt[j])
        nxt[j - 1][parity[j]] = j
    i = 0
    while i < n:
        j = nxt[i][parity[i]]
        if j > n:  # quotes never balance again: the rest may hold a cut record; resync
            yield (starts[i], starts[i + 1]), None
            i += 1
            continue
        row = parse(body[starts[i] : starts[j]])
        if row is None:
            yield (starts[i], starts[i + 1]), None
            i += 1
        else:
            yield (starts[i], starts[j]), row
            i = j
    if starts[n] < len(body):
        yield (starts[n], len(body)), None


def partial_path(final_path: str | Path) -> Path:
    final_path = Path(final_path)
    return final_path.with_name(final_path.stem + ".partial" + final_path.suffix)


class CsvJournal:
    """Append-only CSV rows with crash recovery (module docstring).

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
        readonly: bool = False,
    ):
        if final_path is None and partial is None:
            raise ValueError("CsvJournal needs final_path or partial")
        self.final_path = None if final_path is None else Path(final_path)
        self.path = Path(partial) if partial is not None else partial_path(self.final_path)
        self.columns = list(columns)
        self.bom = bom
        self._rows: List[Dict[str, str]] = []
        self.dropped_bytes = 0
        self.dropped: List[Tuple[int, int]] = []  # byte spans (in the body) of records left out
        self._cut_tail_only = False
        self.readonly = readonly  # read another process's journal: parse, never repair or create
        self._open()

    def _open(self) -> None:
        header = (BOM if self.bom else "") + _format(self.columns)
        if self.readonly and not self.path.exists():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.readonly and (not self.path.exists() or self.path.stat().st_size == 0):
            append_durably(self.path, header.encode("utf-8"), create=True)  # on a full disk: empty, or absent
            _fsync_dir(self.path.parent)
            return
        data = self.path.read_bytes()
        hb = header.encode("utf-8")
        if not data.startswith(hb):
            if hb.startswith(data) and self.readonly:
                return
            if hb.startswith(data):  # killed while writing the header
                atomic_write_bytes(self.path, hb)
                return
            raise ResultsRefused(
                f"{self.path} exists but its header is not {self.columns}; it belongs to another "
                "kind of run. Move it away (or use another output_dir) and run again."
            )
        body = data[len(hb) :]
        keep: List[bytes] = []
        kept_end = 0
        for (lo, hi), ok in _scan_records(body, self._parse):
            if ok is not None:
                self._rows.append(ok)
                keep.append(body[lo:hi])
                kept_end = hi
            else:
                self.dropped.append((lo, hi))
        good = len(hb) + sum(len(k) for k in keep)
        if good == len(data) or self.readonly:
            return
        self.dropped_bytes = len(data) - good
        # Everything dropped lies after the last intact record: a kill mid-write.
        self._cut_tail_only = all(lo >= kept_end for lo, _ in self.dropped)
        if self._cut_tail_only:
            # Only the last record was cut (a kill mid-write): truncating is enough.
            with open(self.path, "r+b") as f:
                f.truncate(good)
                f.flush()
                os.fsync(f.fileno())
            return
        # Damage in the middle: rewrite the intact records (atomically), dropping the rest.
        atomic_write_bytes(self.path, hb + b"".join(keep))

    def _parse(self, chunk: bytes) -> Optional[Dict[str, str]]:
        """The row a candidate record holds, or None when it is not one whole row."""
        if len(chunk) > _MAX_RECORD_BYTES:
            return None
        try:
            text = chunk.decode("utf-8")
        except UnicodeDecodeError:
            return None
        recs = list(csv.reader(io.StringIO(text, newline="")))
        if len(recs) == 1 and len(recs[0]) == len(self.columns) and _format(recs[0]) == text:
            return dict(zip(self.columns, recs[0]))
        return None

    def damage_report(self) -> str:
        """One line for the log: how much of the file was dropped, and why."""
        if not self.dropped_bytes:
            return ""
        if self._cut_tail_only:
            return f"{self.path}: dropped a half-written last row ({self.dropped_bytes} bytes); it is made again"
        return (
            f"{self.path}: kept {len(self._rows)} intact rows, dropped {len(self.dropped)} damaged record(s) "
            f"({self.dropped_bytes} bytes: cut, garbled or not in this file's {len(self.columns)}-column layout); "
            "their rows are made again"
        )

    def rows(self) -> List[Dict[str, str]]:
        return list(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def append(self, rows: Iterable[Mapping[str, Any]]) -> None:
        new = [{c: cell(r.get(c)) for c in self.columns} for r in rows]
        if not new:
            return
        data = "".join(_format([r[c] for c in self.columns]) for r in new).encode("utf-8")
        try:  # not created: a journal removed under a running job is an error, never recreated headless
            append_durably(self.path, data)  # whole rows or none, even on a full disk
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{self.path} vanished while this run was writing it (removed by another process or a user); "
                "nothing more is written to it. Run the command again to start that file anew."
            ) from None
        self._rows.extend(new)

    def finish(self, final_path: Optional[str | Path] = None) -> Path:
        """Rename the partial file to its final name (atomic)."""
        final = Path(final_path) if final_path is not None else self.final_path
        if final is None:
            raise ValueError("no final path to rename the journal to")
        with disk_errors(final.parent, what=final.name):
            os.replace(self.path, final)
        _fsync_dir(final.parent)
        return final


# ---- The cache

class JsonlCache:
    """A key -> value store appended line by line (fsync'd); a cut last line is dropped.

    With ``fingerprint`` (a JSON-able dict of what produced the values), the file's
    first line records it; a file made under another fingerprint is discarded
    with a log line instead of being reused.
    """

    _FP = "__fingerprint__"

    def __init__(self, path: str | Path, fingerprint: Optional[Dict[str, Any]] = None):
        self.path = Path(path)
        self.data: Dict[str, Any] = {}
        self.discarded = 0
        found_fp: Any = None
        if self.path.exists():
            raw = self.path.read_bytes()
            good = 0
            for line in raw.split(b"\n")[:-1]:
                try:
                    rec = json.loads(line.decode("utf-8"))
                    key, value = rec["key"], rec["value"]
                except (UnicodeDecodeError, ValueError, KeyError, TypeError):
                    break
                if key == self._FP:
                    found_fp = value
                else:
                    self.data[key] = value
                good += len(line) + 1
            if good < len(raw):
                with open(self.path, "r+b") as f:
                    f.truncate(good)
        if fingerprint is not None and found_fp != fingerprint:
            if self.path.exists() and (self.data or found_fp is not None):
                self.discarded = len(self.data)
                log.info("%s: discarding %d cached entries made %s", self.path, self.discarded,
                         "with other settings" if found_fp is not None else "with no record of their settings")
            self.data = {}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.path, (json.dumps({"key": self._FP, "value": fingerprint}, ensure_ascii=False,
                                                      sort_keys=True) + "\n").encode("utf-8"))

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def __len__(self) -> int:
        return len(self.data)

    def put_many(self, items: Mapping[str, Any]) -> None:
        if not items:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps({"key": k, "value": v}, ensure_ascii=False) + "\n" for k, v in items.items())
        append_durably(self.path, lines.encode("utf-8"), create=True)  # whole lines or none, even on a full disk
        self.data.update(items)


# ---- What made a results file: its record, and one writer at a time

_SAMPLE = 4 << 20  # bytes hashed at each end of a large file


def file_identity(path: str | Path) -> Dict[str, Any]:
    """A file's identity without reading gigabytes: its name, size and a sha256 of its
    size, first and last 4 MiB (all of it when smaller). Trained weights differ
    everywhere, so another checkpoint under the same name is told apart."""
    path = Path(path)
    if path.is_dir():  # a model folder (medcap export's): its files' identities
        return folder_identity(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(_SAMPLE))
        if size > 2 * _SAMPLE:
            f.seek(size - _SAMPLE)
        h.update(f.read(_SAMPLE))
    return {"name": path.name, "size": size, "sha256_sampled": h.hexdigest()[:24]}


def folder_identity(folder: str | Path, files: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """A model folder's identity: its name, and the identity of its weight and config
    files (the ones given, else every ``*.safetensors``/``*.bin``/``*.json`` in it)."""
    folder = Path(folder)
    names = list(files) if files else sorted(
        p.name for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin", ".json", ".pt")
    ) if folder.is_dir() else []
    for extra in ("config.json",):
        if (folder / extra).is_file() and extra not in names:
            names.append(extra)
    return {"name": folder.name, "files": {n: file_identity(folder / n)["sha256_sampled"] for n in names if (folder / n).is_file()}}


def run_record_path(raw_path: Path) -> Path:
    return raw_path.with_name(raw_path.stem + ".run.json")


def results_lock(raw_path: str | Path, ranks=None):
    """Exclusive lock on one results file (and its partial, caches and scores); under
    several ranks (``Ranks``), rank 0 holds that lock and each other rank one of its own."""
    raw_path = Path(raw_path)
    rank = 0 if ranks is None else ranks.rank
    name = f".{raw_path.name}.lock" if rank == 0 else f".{raw_path.name}.rank{rank}.lock"
    return exclusive_lock(
        raw_path.with_name(name),
        f"the results file {raw_path}",
        hint="two evaluations must not write the same file (chunks with test_chunk_idx write different files)",
    )


def items_digest(items: Sequence[Any]) -> str:
    """Which questions, in which order: changes when the data set, chunk or filters change."""
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.key}\x1f{it.image}\x1f{it.question}\x1f{it.answer}\x1e".encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:16]


def read_record(path: Path) -> Optional[Dict[str, Any]]:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ResultsRefused(f"{path} is unreadable ({e}); move it away (and the results beside it) to start over") from None


def write_record(path: Path, record: Dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(record, indent=1, ensure_ascii=False, sort_keys=True))


def _differences(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> List[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += _differences(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out


class ResultsRefused(UserError, ValueError):
    """The output folder holds results this run must not touch (another model's, another
    kind of run's, unreadable ones); the message names what to move. A user's refusal,
    reported in one line (``medcap run: error: ...``, exit status 2)."""


def refuse_another_run(what: Path, record: Dict[str, Any], identity: Dict[str, Any], digest: str,
                       raw_path: Path) -> None:
    """A file made by another model, other settings or another question set is never reused:
    the error names the files to move."""
    diffs = _differences(record.get("identity", {}), identity)
    if record.get("items_digest") != digest:
        diffs.append("the questions (data set, chunk or filters) differ")
    if diffs:
        names = ", ".join(str(p) for p in outputs_of(raw_path) if p.exists())
        raise ResultsRefused(
            f"{what} was made by another model or with other settings ({'; '.join(diffs[:6])}). "
            f"Its rows are not reused: move {names} away, or pass overwrite=True to start afresh."
        )


def outputs_of(raw_path: Path) -> List[Path]:
    """Every file a suite keeps for ``raw_path`` (what ``overwrite=True`` removes)."""
    stem = raw_path.stem
    return [
        raw_path,
        raw_path.with_name(stem + ".partial.csv"),
        run_record_path(raw_path),
        raw_path.with_name(stem + ".descriptions.jsonl"),
    ] + sorted(raw_path.parent.glob(f"{stem}-*scored.partial.csv")) + rank_files(raw_path)


def rank_files(raw_path: Path) -> List[Path]:
    """What other ranks (of this or an earlier run, of any size) left for ``raw_path``."""
    stem = raw_path.stem
    return sorted(raw_path.parent.glob(f"{stem}.partial.rank*.csv")) + sorted(
        raw_path.parent.glob(f"{stem}.descriptions.rank*.jsonl")) + sorted(raw_path.parent.glob(f"{stem}.left_out.rank*.json"))


def clear_outputs(raw_path: Path) -> None:
    """``overwrite=True``: remove what an earlier run left for ``raw_path``."""
    for p in outputs_of(Path(raw_path)):
        if p.exists():
            log.info("overwrite=True: removing %s", p)
            p.unlink()
