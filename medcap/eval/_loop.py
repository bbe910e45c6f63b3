"""The one resumable evaluation loop, and the results files it writes without losing a row.

Results files that lose nothing: rows are appended to ``<name>.partial.csv`` and
flushed to disk (fsync) as they complete; the file is renamed to its final name
when the run is complete. A restarted run reads the partial file back, drops a
half-written last record (a ``kill -9`` can cut a line anywhere), and continues
after the last complete row. The finished file is byte-identical to the one an
uninterrupted run writes.

A record counts as complete only if writing its parsed fields again gives back
exactly the bytes on disk: this catches a record cut inside a quoted field
(which Python's csv reader would otherwise return silently shortened).

The one resumable evaluation loop that every suite runs through.

    items -> skip those on disk -> batch -> load images -> suite makes rows -> append -> finish

A suite (captioning, VQA-RAD, OmniMedVQA, ...) declares its items and a
``make_rows(engine, items, images) -> rows`` step; the loop owns everything
that makes a results file trustworthy:

* **one writer**: an exclusive lock per results file for the whole suite
  (``results_lock``); a second run on the same file is refused at once;
* **results tied to what made them**: ``{raw}.run.json`` beside the file holds
  the run's identity (vision checkpoint, LLM folder, the settings that change
  outputs) and a digest of its items. A file made by another model, other
  settings or another question set is never resumed or reused: the run refuses,
  naming the file to move, unless ``overwrite=True`` starts it afresh. A file
  with no record (written by the reference, or by hand) is taken as it is;
* **nothing lost**: rows go to ``{raw}.partial.csv`` (with a ``key`` column)
  as each batch completes; a restart continues with the items not on disk, in
  any order; the final file is written in item order, so a resumed run ends
  byte-identical to an uninterrupted one. Items whose image cannot be read are
  left out of this run, reported, and tried again on the next run;
* **one or many processes**: under torchrun (``Ranks``) each rank makes its
  share of the items into its own partial file, and rank 0 writes the final
  file, the same bytes one process writes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

from medcap._io import atomic_write_bytes, atomic_write_text, exclusive_lock, progress as progress_bar
from medcap.data import BadSample

if TYPE_CHECKING:  # torch only in annotations: `tools/judge.py --help` reads results files without it
    import torch


# ---- Results files ---------------------------------------------------------------

log = logging.getLogger(__name__)

BOM = "\ufeff"
# No results row comes near this; a longer candidate is garbage (and is not parsed).
_MAX_RECORD_BYTES = 1 << 22


def accuracy_name(acc: float, places: int = 4) -> str:
    """An accuracy as the reference writes it in file names: ``round(acc, places)``."""
    return f"{round(float(acc), places)}"


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


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` (medcap's one atomic writer)."""
    atomic_write_bytes(path, data)


def partial_path(final_path: str | Path) -> Path:
    final_path = Path(final_path)
    return final_path.with_name(final_path.stem + ".partial" + final_path.suffix)


def read_csv_rows(path: str | Path) -> List[Dict[str, str]]:
    """All rows of a results CSV as dicts of strings (empty cells stay empty strings)."""
    with open(path, "r", encoding="utf-8-sig", newline="") as f:
        return [dict(r) for r in csv.DictReader(f)]


def write_csv_atomic(path: str | Path, columns: Sequence[str], rows: Iterable[Mapping[str, Any]], *, bom: bool = False) -> Path:
    """Write a whole CSV at once (medcap's one atomic writer: temporary file, fsync, rename)."""
    text = (BOM if bom else "") + _format(list(columns)) + "".join(_format([cell(r.get(c)) for c in columns]) for r in rows)
    return atomic_write_bytes(Path(path), text.encode("utf-8"))


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
            with open(self.path, "wb") as f:
                f.write(header.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(self.path.parent)
            return
        data = self.path.read_bytes()
        hb = header.encode("utf-8")
        if not data.startswith(hb):
            if hb.startswith(data) and self.readonly:
                return
            if hb.startswith(data):  # killed while writing the header
                self.path.write_bytes(hb)
                return
            raise ValueError(
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
        write_bytes_atomic(self.path, hb + b"".join(keep))

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
        try:  # no O_CREAT: a journal removed under a running job is an error, never recreated headless
            fd = os.open(str(self.path), os.O_WRONLY | os.O_APPEND)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{self.path} vanished while this run was writing it (removed by another process or a user); "
                "nothing more is written to it. Run the command again to start that file anew."
            ) from None
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
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
            write_bytes_atomic(self.path, (json.dumps({"key": self._FP, "value": fingerprint}, ensure_ascii=False,
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
        with open(self.path, "ab") as f:
            for k, v in items.items():
                f.write((json.dumps({"key": k, "value": v}, ensure_ascii=False) + "\n").encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        self.data.update(items)


# ---- The loop --------------------------------------------------------------------

OPTION_LETTERS = ("A", "B", "C", "D")
KEY_COLUMN = "key"


@dataclass
class EvalItem:
    """One row to make.

    ``image`` is the data set's own value (a relative path or a name), written in
    the ``image`` column; ``path`` the file to load (default: ``image`` itself);
    ``has_image=False`` for a text-only item. ``answer`` is the reference answer
    (the ``output`` column); ``messages`` the captioning prompt; ``extra`` further
    columns known up front (options, modality, question id). ``key`` is stable
    across runs: it seeds sampling and matches rows on disk to items.
    """

    image: str
    question: str
    answer: str
    key: str
    extra: Dict[str, str] = field(default_factory=dict)
    path: Optional[str] = None
    has_image: bool = True
    messages: Optional[List[Dict[str, str]]] = None

    @property
    def file(self) -> Optional[str]:
        return (self.path or self.image) if self.has_image else None

    def options(self) -> Dict[str, str]:
        return {L: self.extra[f"option_{L}"] for L in OPTION_LETTERS if self.extra.get(f"option_{L}", "") != ""}


@dataclass
class Ranks:
    """The processes sharing one suite (``torchrun``: one per device). Each rank makes the
    rows of its share of the questions into its own partial file; rank 0 writes the
    final file, which is exactly what one process writes."""

    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = lambda: None

    def partial(self, raw_path: Path) -> Path:
        suffix = ".partial.csv" if self.world == 1 or self.rank == 0 else f".partial.rank{self.rank}.csv"
        return raw_path.with_name(raw_path.stem + suffix)

    def share(self, items: Sequence["EvalItem"]) -> List["EvalItem"]:
        """This rank's items: whole images (every question on an image goes to one rank,
        so its description is made once), dealt out in order of first appearance."""
        if self.world == 1:
            return list(items)
        order: Dict[str, int] = {}
        for it in items:
            order.setdefault(it.image, len(order))
        return [it for it in items if order[it.image] % self.world == self.rank]


ONE_PROCESS = Ranks()

MakeRows = Callable[[Any, Sequence[EvalItem], Sequence[Optional["torch.Tensor"]]], List[Dict[str, Any]]]


def run_record_path(raw_path: Path) -> Path:
    return raw_path.with_name(raw_path.stem + ".run.json")


def lock_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


def results_lock(raw_path: str | Path, ranks: Ranks = ONE_PROCESS):
    """Exclusive lock on one results file (and its partial, caches and scores); under
    several ranks, rank 0 holds that lock and each other rank one of its own."""
    raw_path = Path(raw_path)
    path = lock_path(raw_path) if ranks.rank == 0 else raw_path.with_name(f".{raw_path.name}.rank{ranks.rank}.lock")
    return exclusive_lock(
        path,
        f"the results file {raw_path}",
        hint="two evaluations must not write the same file (chunks with test_chunk_idx write different files)",
    )


def items_digest(items: Sequence[EvalItem]) -> str:
    """Which questions, in which order: changes when the data set, chunk or filters change."""
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.key}\x1f{it.image}\x1f{it.question}\x1f{it.answer}\x1e".encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:16]


def _differences(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> List[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += _differences(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out


def _read_record(path: Path) -> Optional[Dict[str, Any]]:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is unreadable ({e}); move it away (and the results beside it) to start over") from None


def _write_record(path: Path, record: Dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(record, indent=1, ensure_ascii=False, sort_keys=True))


def _check_same_run(record: Dict[str, Any], identity: Dict[str, Any], digest: str) -> List[str]:
    diffs = _differences(record.get("identity", {}), identity)
    if record.get("items_digest") != digest:
        diffs.append("the questions (data set, chunk or filters) differ")
    return diffs


def _refuse(what: Path, diffs: List[str], moved: Sequence[Path]) -> ValueError:
    names = ", ".join(str(p) for p in moved if p.exists())
    return ValueError(
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
    ] + sorted(raw_path.parent.glob(f"{stem}-*scored.partial.csv")) + _rank_files(raw_path)


def _rank_files(raw_path: Path) -> List[Path]:
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


def run_items(
    engine,
    items: Sequence[EvalItem],
    make_rows: MakeRows,
    *,
    raw_path: str | Path,
    columns: Sequence[str],
    identity: Dict[str, Any],
    image_loader: Callable[[str], torch.Tensor],
    overwrite: bool = False,
    bom: bool = True,
    progress: bool = True,
    on_batch: Optional[Callable[[int], None]] = None,
    unit: str = "row",
    ranks: Ranks = ONE_PROCESS,
) -> Tuple[List[Dict[str, str]], Dict[str, str]]:
    """Make ``raw_path`` for ``items`` (see the module docstring); the caller holds
    ``results_lock(raw_path, ranks)``. Returns ``(rows in item order, left_out)`` where
    ``left_out`` maps the keys of items whose image could not be read to the reason.

    ``on_batch(rows_on_disk)`` runs after each batch is on disk (tests interrupt there).
    With ``ranks``, every rank calls this with the same items; each makes its share.
    """
    raw_path = Path(raw_path)
    columns = list(columns)
    record_path = run_record_path(raw_path)
    digest = items_digest(items)
    partial = raw_path.with_name(raw_path.stem + ".partial.csv")
    if overwrite and ranks.rank == 0:
        clear_outputs(raw_path)
    ranks.barrier()  # every rank sees the folder after overwrite's clean-up
    record = _read_record(record_path)
    by_key = {it.key: it for it in items}
    if len(by_key) != len(items):
        raise ValueError("evaluation items must have unique keys")
    journal_columns = [KEY_COLUMN] + columns
    existed = raw_path.exists()

    if existed:
        if record is None:
            log.info("%s exists with no record of what made it (written by the reference or by hand): "
                     "taken as it is, not generated again", raw_path)
            return read_csv_rows(raw_path), {}
        diffs = _check_same_run(record, identity, digest)
        if diffs:
            raise _refuse(raw_path, diffs, outputs_of(raw_path))
        rows = read_csv_rows(raw_path)
        left_out = dict(record.get("left_out", {}))
        if not left_out:
            log.info("%s is complete (%d rows): not generated again", raw_path, len(rows))
            return rows, {}
        keys = [it.key for it in items if it.key not in left_out]
        if len(keys) != len(rows):
            raise ValueError(f"{raw_path} holds {len(rows)} rows, its record says {len(keys)}; move it away to start over")
        log.info("%s: %d item(s) were left out (unreadable images); trying them again", raw_path, len(left_out))
    elif partial.exists() or _rank_files(raw_path):  # a run stopped half-way: is it this one?
        if record is None:
            raise ValueError(f"{partial} has no record of what made it ({record_path} is missing): "
                             "move it away, or pass overwrite=True to start afresh")
        diffs = _check_same_run(record, identity, digest)
        if diffs:
            raise _refuse(partial, diffs, outputs_of(raw_path))
    ranks.barrier()  # every rank has looked at the folder before any rank writes to it
    journal = CsvJournal(raw_path, journal_columns, bom=bom, partial=ranks.partial(raw_path))
    damage = journal.damage_report()
    if damage:
        log.warning("%s", damage)
    if existed and len(journal) == 0 and ranks.rank == 0:
        # Rows on disk are the items in order, less those left out: give them their keys back.
        journal.append({KEY_COLUMN: k, **r} for k, r in zip(keys, rows))
    ranks.barrier()  # every rank has repaired its own partial (and rank 0 seeded its own) before rows are counted
    if ranks.rank == 0:
        _write_record(record_path, {"identity": identity, "items_digest": digest, "items": len(items),
                                    "complete": False, "left_out": {}})
    done = _rows_on_disk(raw_path, journal, by_key, columns, bom)
    if done:
        log.info("%s: resuming with %d of %d rows on disk", raw_path.name, len(done), len(items))
    pending = ranks.share([it for it in items if it.key not in done])
    left_out: Dict[str, str] = {}
    bar = progress_bar(len(pending), f"{raw_path.stem} ({len(done)} of {len(items)} on disk)" if done else raw_path.stem,
                       unit, enabled=progress)
    chunk = getattr(engine, "chunk_size", engine.batch_size)  # several batches: continuous batching refills slots
    for lo in range(0, len(pending), chunk):
        batch = pending[lo : lo + chunk]
        kept, images, bad = load_images(batch, image_loader)
        if bad:
            log.warning("left out %d item(s) whose image cannot be read (tried again on the next run), e.g. %s",
                        len(bad), next(iter(bad.values())))
            left_out.update(bad)
        if kept:
            rows = make_rows(engine, kept, images)
            journal.append({KEY_COLUMN: it.key, **r} for it, r in zip(kept, rows))
        bar.update(len(batch))
        if on_batch is not None:
            on_batch(len(journal))
    bar.close()
    if ranks.world > 1:
        _write_record(raw_path.with_name(f"{raw_path.stem}.left_out.rank{ranks.rank}.json"), left_out)
    ranks.barrier()  # every rank's rows are on disk
    if ranks.rank == 0:
        left_out = _finish(raw_path, items, by_key, journal, columns, bom, existed, identity, digest, left_out, ranks)
    ranks.barrier()  # the final file is written
    if ranks.rank != 0:
        left_out = dict(_read_record(record_path).get("left_out", {}))
    if left_out and ranks.rank == 0:
        log.warning("%s: %d of %d items left out because their image cannot be read; run the same command "
                    "again to retry them", raw_path, len(left_out), len(items))
    return read_csv_rows(raw_path), left_out


def _finish(raw_path: Path, items: Sequence[EvalItem], by_key: Mapping[str, EvalItem], journal: CsvJournal,
            columns: List[str], bom: bool, existed: bool, identity: Dict[str, Any], digest: str,
            left_out: Dict[str, str], ranks: Ranks) -> Dict[str, str]:
    """Rank 0: every rank's rows, in item order, into the final file; the record; clean-up."""
    done = _rows_on_disk(raw_path, journal, by_key, columns, bom)
    for f in sorted(raw_path.parent.glob(f"{raw_path.stem}.left_out.rank*.json")):
        left_out.update(_read_record(f) or {})
    left_out = {k: v for k, v in left_out.items() if k not in done}
    ordered = [{c: done[it.key][c] for c in columns} for it in items if it.key in done]
    if raw_path.exists() and not existed:
        raise ValueError(f"{raw_path} appeared while this run was making it (another process wrote it); "
                         f"it is left as it is and this run's rows stay in {journal.path}")
    write_csv_atomic(raw_path, columns, ordered, bom=bom)
    _write_record(run_record_path(raw_path), {"identity": identity, "items_digest": digest, "items": len(items),
                                              "complete": not left_out, "left_out": left_out})
    journal.path.unlink()
    for f in _rank_files(raw_path):
        if not f.name.startswith(f"{raw_path.stem}.descriptions."):
            f.unlink()
    return left_out


def _rows_on_disk(raw_path: Path, journal: CsvJournal, by_key: Mapping[str, EvalItem], columns: List[str],
                  bom: bool) -> Dict[str, Dict[str, str]]:
    """Rows by key from this rank's journal and, read-only, every other rank's partial."""
    done = _rows_by_key(journal.rows(), journal.path, by_key)
    for other in [raw_path.with_name(raw_path.stem + ".partial.csv")] + sorted(
            raw_path.parent.glob(f"{raw_path.stem}.partial.rank*.csv")):
        if other != journal.path and other.exists():
            theirs = CsvJournal(None, [KEY_COLUMN] + columns, bom=bom, partial=other, readonly=True)
            done.update(_rows_by_key(theirs.rows(), other, by_key))
    return done


def _rows_by_key(rows: Sequence[Dict[str, str]], path: Path, by_key: Mapping[str, EvalItem]) -> Dict[str, Dict[str, str]]:
    """Rows on disk by key; a row for another question set is an error, never reused."""
    out: Dict[str, Dict[str, str]] = {}
    for r in rows:
        it = by_key.get(r[KEY_COLUMN])
        if it is None or ("output" in r and r["output"] != cell(it.answer)) or ("image" in r and r["image"] != cell(it.image)):
            raise ValueError(
                f"{path} does not belong to this run: its row for key {r[KEY_COLUMN]!r} "
                f"({r.get('image')!r} / {r.get('output')!r}) matches no question of this run. "
                "Move it away (or pass overwrite=True) to start over."
            )
        out[r[KEY_COLUMN]] = r
    return out


def load_images(
    batch: Sequence[EvalItem], image_loader: Callable[[str], torch.Tensor]
) -> Tuple[List[EvalItem], List[Optional[torch.Tensor]], Dict[str, str]]:
    """``(kept items, their images (None: no image), {key: reason} of unreadable ones)``."""
    kept: List[EvalItem] = []
    images: List[Optional[torch.Tensor]] = []
    bad: Dict[str, str] = {}
    for it in batch:
        try:
            images.append(None if it.file is None else image_loader(it.file))
            kept.append(it)
        except BadSample as e:
            bad[it.key] = e.reason
    return kept, images, bad


_SAMPLE = 4 << 20  # bytes hashed at each end of a large file


def file_identity(path: str | Path) -> Dict[str, Any]:
    """A file's identity without reading gigabytes: its name, size and a sha256 of its
    size, first and last 4 MiB (all of it when smaller). Trained weights differ
    everywhere, so another checkpoint under the same name is told apart."""
    path = Path(path)
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
