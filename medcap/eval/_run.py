"""One suite's run, in the steps ``recipes/generate.py`` takes, and what every suite works with.

In this file, in order:

* what a suite works with: ``EvalItem`` (one row to make), ``Ranks`` (the processes
  sharing a suite under torchrun), ``SuiteRun`` (the one context every suite gets:
  output folder, checkpoint name, image loader, identity, overwrite, limit, progress,
  ranks), and what the readers share (``ready_items``: questions whose image is
  missing left out, ``limit``, the report saved beside the results file);
* the steps over one results file, in the order the recipe takes them:
  ``resume_plan`` (what is on disk: continue it, reuse it, or refuse it),
  ``pending_batches`` (the rows still to make, images loaded), ``Plan.write`` (each
  batch's rows fsync'd before the next), ``finish`` (the final file in item order:
  the same bytes whatever stopped the run and however many ranks made it); the
  files and the record beside them are ``_results``'s;
* ``make_file`` and ``run_suite``: the same steps in one call, for library users.

The rules behind resuming and refusing: ``docs/internals.md`` (evaluation).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from medcap._io import atomic_write_text, progress as progress_bar, remove_stale_tmp
from medcap.data import BadSample, image_transform, load_image
from medcap.eval._results import (
    CsvJournal,
    ResultsRefused,
    cell,
    clear_outputs,
    items_digest,
    rank_files,
    read_csv_rows,
    read_record,
    refuse_another_run,
    results_lock,
    run_record_path,
    write_csv_atomic,
    write_record,
)
from medcap.generation import prompt_text

log = logging.getLogger(__name__)

# ---- What a suite works with

OPTION_LETTERS = ("A", "B", "C", "D")
RAW_COLUMNS = ("image", "instruction", "output", "generated")  # every raw file starts with these
KEY_COLUMN = "key"  # the partial file's first column: which item a row answers
_BOT = "<|begin_of_text|>"


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

    def share(self, items: Sequence[EvalItem]) -> List[EvalItem]:
        """This rank's items: whole images (every question on an image goes to one rank,
        so its description is made once), dealt out in order of first appearance."""
        if self.world == 1:
            return list(items)
        order: Dict[str, int] = {}
        for it in items:
            order.setdefault(it.image, len(order))
        return [it for it in items if order[it.image] % self.world == self.rank]


ONE_PROCESS = Ranks()


class ImageLoader:
    """Image file -> the model's input tensor ``[3, S, S]`` (raises ``BadSample``)."""

    def __init__(self, image_size: int):
        self.transform = image_transform(image_size)

    def __call__(self, path: str) -> torch.Tensor:
        return self.transform(load_image(path))


def checkpoint_name(vision_checkpoint: Optional[str]) -> str:
    """``ckpt`` of the file names: the file name up to its first dot, as the reference
    (``meta_model_4.pt`` -> ``meta_model_4``); ``untrained`` without a checkpoint."""
    if not vision_checkpoint:
        return "untrained"
    return Path(str(vision_checkpoint)).name.split(".")[0]


@dataclass
class SuiteRun:
    """What every suite of one evaluation needs; one per run, handed to each suite."""

    output_dir: Path
    ckpt: str  # the vision checkpoint's name in the file names (``checkpoint_name``)
    image_loader: Callable[[str], torch.Tensor]
    identity: Dict[str, Any] = field(default_factory=dict)  # what the rows depend on (model, settings)
    overwrite: bool = False  # start files made by another model or other settings afresh
    limit: Optional[int] = None  # the first N items of each suite (debug)
    progress: bool = True
    ranks: Ranks = field(default_factory=Ranks)
    on_batch: Optional[Callable[[int], None]] = None  # after each batch is on disk (tests stop runs there)

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)

    def results_path(self, name: str) -> Path:
        """``output_dir / name``, the folder made."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        return self.output_dir / name


def instruction_text(tokenizer, tokens: Sequence[int]) -> str:
    """The ``instruction`` column: the prompt with special tokens written out, as the
    reference's (which has no leading ``<|begin_of_text|>``)."""
    text = prompt_text(tokenizer, tokens)
    return text[len(_BOT) :] if text.startswith(_BOT) else text


def loader_by_image(items: Sequence[EvalItem], load: Callable[[str], torch.Tensor]) -> Callable[[str], torch.Tensor]:
    """Rows name images by the data set's own value (their ``image`` column): load the file
    each one resolves to."""
    files = {it.image: it.file for it in items}
    return lambda image: load(files.get(image) or image)


def text_of(value: Any) -> str:
    """A data set's value as text (``None``: empty)."""
    return "" if value is None else str(value)


def unique_keys(items: List[EvalItem]) -> List[EvalItem]:
    """Keys name a question in seeds, partial files and resume checks: make repeats unique."""
    seen: Dict[str, int] = {}
    for it in items:
        seen[it.key] = seen.get(it.key, 0) + 1
        if seen[it.key] > 1:
            it.key = f"{it.key}#{seen[it.key] - 1}"
    return items


def read_question_list(path: Path, name: str, dataset_source: str | Path) -> List[Any]:
    """A data set's question file: one JSON list (a BOM allowed), or a clear error."""
    if not path.is_file():
        raise FileNotFoundError(f"{name} questions not found: {str(path)!r} (dataset_source={str(dataset_source)!r})")
    records = json.loads(path.read_text(encoding="utf-8-sig"))
    if not isinstance(records, list):
        raise ValueError(f"{path} must hold a JSON list of questions")
    return records


def drop_missing_images(items: Sequence[EvalItem]) -> Tuple[List[EvalItem], List[str]]:
    """Items whose image file exists, and the images of those that do not.

    Done after shuffling and chunking, so the split matches the reference's
    whatever is missing."""
    kept, missing = [], []
    for it in items:
        (kept if it.file is None or Path(it.file).is_file() else missing).append(it)
    return kept, [m.image for m in missing]


def ready_items(name: str, items: List[EvalItem], report: Dict[str, Any], raw_path: Path, run: SuiteRun, *,
                chunk: Optional[tuple] = None) -> List[EvalItem]:
    """What a reference suite does once its questions are read: leave out questions whose
    image is missing (reported), cut to ``run.limit``, log and save the report beside the raw file."""
    items, missing = drop_missing_images(items)
    if run.limit is not None:
        items = items[: run.limit]
    if chunk is not None and chunk[0] is not None:
        report.update(chunk=list(chunk), in_chunk=len(items) + len(missing))
    report.update(missing_images=len(missing), missing_image_examples=missing[:20])
    if run.ranks.rank == 0:  # one process reports
        parts = [f"{k}={v}" for k, v in report.items() if not k.endswith("examples") and k != "source"]
        log.info("%s: %s", name, ", ".join(parts))
        odd = {k: report[k] for k in ("left_out_modality_key", "no_option_C", "no_option_D", "missing_images",
                                      "malformed") if report.get(k)}
        if odd:
            print(f"{name}: handled records: {odd}" + (
                f" (missing images, e.g. {report['missing_image_examples'][:3]})" if report.get("missing_images") else ""),
                flush=True)
        atomic_write_text(raw_path.with_name(raw_path.stem + ".report.json"),
                          json.dumps(report, indent=1, ensure_ascii=False, default=str))
    return items


# ---- The steps over one results file


@dataclass
class Batch:
    """Items whose rows are made together, with their images (``None``: no image)."""

    items: List[EvalItem]
    images: List[Optional[torch.Tensor]]


@dataclass
class Plan:
    """What one results file still needs (``resume_plan``), and where its rows go."""

    raw_path: Path
    items: List[EvalItem]  # every item, in the final file's order
    columns: List[str]
    identity: Dict[str, Any]
    run: SuiteRun
    load_image: Callable[[str], torch.Tensor]
    unit: str = "row"
    digest: str = ""
    existed: bool = False  # the final file was there before this run
    rows: Optional[List[Dict[str, str]]] = None  # set: the file is already complete, nothing to make
    journal: Optional[CsvJournal] = None  # this rank's partial file
    on_disk: int = 0  # rows already made when this run started
    pending: List[EvalItem] = field(default_factory=list)  # this rank's share of the rest
    left_out: Dict[str, str] = field(default_factory=dict)  # key -> why its image could not be read

    @property
    def by_key(self) -> Dict[str, EvalItem]:
        return {it.key: it for it in self.items}

    def write(self, batch: Batch, rows: Sequence[Mapping[str, Any]]) -> None:
        """A batch's rows to this rank's partial file (fsync'd), each under its item's key."""
        self.journal.append({KEY_COLUMN: it.key, **r} for it, r in zip(batch.items, rows))


def resume_plan(suite, items: Sequence[EvalItem], run: SuiteRun) -> Plan:
    """What is on disk for ``suite.raw_path`` (with ``suite.columns``, ``suite.identity``,
    ``suite.unit``), and so what this run makes; the caller holds ``results_lock``.
    Images load through ``suite.load_image`` where a suite has one (images inside
    parquet files), else ``run.image_loader``.

    A finished file made by the same model and settings is reused (its rows made
    again only for items left out because their image could not be read); one with no
    record (the reference's, or written by hand) is taken as it is; a partial file of
    the same run is continued; anything made otherwise is refused, naming the files to
    move, unless ``run.overwrite`` starts afresh. Every rank calls this with the same items.
    """
    raw_path, ranks = Path(suite.raw_path), run.ranks
    partial = raw_path.with_name(raw_path.stem + ".partial.csv")
    plan = Plan(raw_path, list(items), list(suite.columns), dict(suite.identity), run,
                getattr(suite, "load_image", run.image_loader), unit=suite.unit, digest=items_digest(items))
    if run.overwrite and ranks.rank == 0:
        clear_outputs(raw_path)
    ranks.barrier()  # every rank sees the folder after overwrite's clean-up
    record = read_record(run_record_path(raw_path))
    if len(plan.by_key) != len(items):
        raise ValueError("evaluation items must have unique keys")
    plan.existed = raw_path.exists()
    keyed_rows: List[Tuple[str, Dict[str, str]]] = []
    if plan.existed:
        plan.rows, keyed_rows = _finished_file(plan, record)
        if plan.rows is not None:
            return plan
    elif partial.exists() or rank_files(raw_path):  # a run stopped half-way: is it this one?
        if record is None:
            raise ResultsRefused(f"{partial} has no record of what made it ({run_record_path(raw_path)} is missing): "
                                 "move it away, or pass overwrite=True to start afresh")
        refuse_another_run(partial, record, plan.identity, plan.digest, raw_path)
    ranks.barrier()  # every rank has looked at the folder before any rank writes to it
    _open_journal(plan, keyed_rows)
    done = _rows_on_disk(plan)
    if done:
        log.info("%s: resuming with %d of %d rows on disk", raw_path.name, len(done), len(items))
    plan.on_disk = len(done)
    plan.pending = ranks.share([it for it in plan.items if it.key not in done])
    return plan


def _finished_file(plan: Plan, record: Optional[Dict[str, Any]]):
    """A final file already there: ``(its rows, [])`` when nothing is left to make, else
    ``(None, [(key, row), ...])``: the rows on disk, keyed again, and their items left
    out earlier (unreadable images) made now."""
    raw_path = plan.raw_path
    if record is None:
        log.info("%s exists with no record of what made it (written by the reference or by hand): "
                 "taken as it is, not generated again", raw_path)
        return read_csv_rows(raw_path), []
    refuse_another_run(raw_path, record, plan.identity, plan.digest, raw_path)
    rows = read_csv_rows(raw_path)
    left_out = dict(record.get("left_out", {}))
    if not left_out:
        log.info("%s is complete (%d rows): not generated again", raw_path, len(rows))
        leftover = plan.run.ranks.partial(raw_path)
        if plan.run.ranks.rank == 0 and leftover.exists():  # stopped between the final file and this clean-up
            log.info("removing %s: its rows are all in %s", leftover, raw_path.name)
            leftover.unlink()
        return rows, []
    keys = [it.key for it in plan.items if it.key not in left_out]
    if len(keys) != len(rows):
        raise ResultsRefused(f"{raw_path} holds {len(rows)} rows, its record says {len(keys)}; move it away to start over")
    log.info("%s: %d item(s) were left out (unreadable images); trying them again", raw_path, len(left_out))
    return None, list(zip(keys, rows))


def _open_journal(plan: Plan, keyed_rows: List[Tuple[str, Dict[str, str]]]) -> None:
    """This rank's partial file, repaired after a crash; rank 0 records the run beside it."""
    ranks = plan.run.ranks
    if ranks.rank == 0:  # first: a partial file is never without the record that says what made it
        write_record(run_record_path(plan.raw_path), {"identity": plan.identity, "items_digest": plan.digest,
                                                        "items": len(plan.items), "complete": False, "left_out": {}})
    plan.journal = CsvJournal(plan.raw_path, [KEY_COLUMN] + plan.columns, bom=True, partial=ranks.partial(plan.raw_path))
    damage = plan.journal.damage_report()
    if damage:
        log.warning("%s", damage)
    if plan.existed and len(plan.journal) == 0 and ranks.rank == 0:
        # Rows on disk are the items in order, less those left out: give them their keys back.
        plan.journal.append({KEY_COLUMN: k, **r} for k, r in keyed_rows)
    ranks.barrier()  # every rank has repaired its own partial (and rank 0 seeded its own) before rows are counted


def pending_batches(plan: Plan, engine) -> Iterator[Batch]:
    """The items not on disk (this rank's share), as many at once as the engine takes
    (``chunk_size``: continuous batching refills its slots from them), images loaded.
    Items whose image cannot be read are left out of this run (``plan.left_out``) and
    tried again on the next. The caller makes each batch's rows and ``plan.write``s them."""
    if plan.rows is not None:
        return
    run, name = plan.run, plan.raw_path.stem
    bar = progress_bar(len(plan.pending), f"{name} ({plan.on_disk} of {len(plan.items)} on disk)" if plan.on_disk
                       else name, plan.unit, enabled=run.progress and run.ranks.rank == 0)
    chunk = getattr(engine, "chunk_size", engine.batch_size)
    for lo in range(0, len(plan.pending), chunk):
        items = plan.pending[lo : lo + chunk]
        batch, bad = load_images(items, plan.load_image)
        if bad:
            log.warning("left out %d item(s) whose image cannot be read (tried again on the next run), e.g. %s",
                        len(bad), next(iter(bad.values())))
            plan.left_out.update(bad)
        if batch.items:
            yield batch  # its rows are made and written before this resumes
        bar.update(len(items))
        if run.on_batch is not None:
            run.on_batch(len(plan.journal))
    bar.close()


def load_images(items: Sequence[EvalItem], image_loader: Callable[[str], torch.Tensor]) -> Tuple[Batch, Dict[str, str]]:
    """``(the items with their images, {key: reason} of those whose image cannot be read)``."""
    batch = Batch([], [])
    bad: Dict[str, str] = {}
    for it in items:
        try:
            batch.images.append(None if it.file is None else image_loader(it.file))
            batch.items.append(it)
        except BadSample as e:
            bad[it.key] = e.reason
    return batch, bad


def finish(plan: Plan) -> List[Dict[str, str]]:
    """The final file: every rank's rows in item order (rank 0 writes it, the same bytes
    one uninterrupted process writes), its record, the partial files removed. Returns
    its rows; ``plan.left_out`` names the items left out for unreadable images."""
    if plan.rows is not None:
        return plan.rows
    raw_path, ranks = plan.raw_path, plan.run.ranks
    if ranks.world > 1:
        write_record(raw_path.with_name(f"{raw_path.stem}.left_out.rank{ranks.rank}.json"), plan.left_out)
    ranks.barrier()  # every rank's rows are on disk
    if ranks.rank == 0:
        _write_final_file(plan)
    ranks.barrier()  # the final file is written
    if ranks.rank != 0:
        plan.left_out = dict(read_record(run_record_path(raw_path)).get("left_out", {}))
    if plan.left_out and ranks.rank == 0:
        log.warning("%s: %d of %d items left out because their image cannot be read; run the same command "
                    "again to retry them", raw_path, len(plan.left_out), len(plan.items))
    return read_csv_rows(raw_path)


def _write_final_file(plan: Plan) -> None:
    """Rank 0: every rank's rows, in item order, into the final file; the record; clean-up."""
    raw_path = plan.raw_path
    done = _rows_on_disk(plan)
    for f in sorted(raw_path.parent.glob(f"{raw_path.stem}.left_out.rank*.json")):
        plan.left_out.update(read_record(f) or {})
    plan.left_out = {k: v for k, v in plan.left_out.items() if k not in done}
    ordered = [{c: done[it.key][c] for c in plan.columns} for it in plan.items if it.key in done]
    if raw_path.exists() and not plan.existed:
        raise ResultsRefused(f"{raw_path} appeared while this run was making it (another process wrote it); "
                             f"it is left as it is and this run's rows stay in {plan.journal.path}")
    # The record first, then the final file: should either write fail (a full disk), the
    # next run finds the partial file and its record, and makes the final file again.
    write_record(run_record_path(raw_path), {"identity": plan.identity, "items_digest": plan.digest,
                                              "items": len(plan.items), "complete": not plan.left_out,
                                              "left_out": plan.left_out})
    write_csv_atomic(raw_path, plan.columns, ordered, bom=True)
    plan.journal.path.unlink()
    for f in rank_files(raw_path):
        if not f.name.startswith(f"{raw_path.stem}.descriptions."):
            f.unlink()
    # a rank killed mid-write left its temporary file; every rank now waits at the barrier
    remove_stale_tmp(raw_path.parent, prefixes=(f"{raw_path.stem}.", f"{raw_path.stem}-"))


def _rows_on_disk(plan: Plan) -> Dict[str, Dict[str, str]]:
    """Rows by key from this rank's journal and, read-only, every other rank's partial."""
    raw_path, by_key = plan.raw_path, plan.by_key
    done = _rows_by_key(plan.journal.rows(), plan.journal.path, by_key)
    for other in [raw_path.with_name(raw_path.stem + ".partial.csv")] + sorted(
            raw_path.parent.glob(f"{raw_path.stem}.partial.rank*.csv")):
        if other != plan.journal.path and other.exists():
            theirs = CsvJournal(None, [KEY_COLUMN] + plan.columns, bom=True, partial=other, readonly=True)
            done.update(_rows_by_key(theirs.rows(), other, by_key))
    return done


def _rows_by_key(rows: Sequence[Dict[str, str]], path: Path, by_key: Mapping[str, EvalItem]) -> Dict[str, Dict[str, str]]:
    """Rows on disk by key; a row for another question set is an error, never reused."""
    out: Dict[str, Dict[str, str]] = {}
    for r in rows:
        it = by_key.get(r[KEY_COLUMN])
        if it is None or ("output" in r and r["output"] != cell(it.answer)) or ("image" in r and r["image"] != cell(it.image)):
            raise ResultsRefused(
                f"{path} does not belong to this run: its row for key {r[KEY_COLUMN]!r} "
                f"({r.get('image')!r} / {r.get('output')!r}) matches no question of this run. "
                "Move it away (or pass overwrite=True) to start over."
            )
        out[r[KEY_COLUMN]] = r
    return out


def make_file(engine, suite, items: Sequence[EvalItem], run: SuiteRun) -> Tuple[List[Dict[str, str]], Dict[str, str]]:
    """``suite.raw_path`` for ``items``, in the steps above: ``(its rows, items left out)``.
    The caller holds ``results_lock``."""
    plan = resume_plan(suite, items, run)
    for batch in pending_batches(plan, engine):
        plan.write(batch, suite.make_rows(engine, batch.items, batch.images))
    return finish(plan), plan.left_out


def run_suite(engine, suite, run: SuiteRun) -> Dict[str, Any]:
    """One suite, whole: the steps ``recipes/generate.py`` takes, in its order (read there)."""
    items = suite.read()
    with results_lock(suite.raw_path, run.ranks):
        rows, left_out = make_file(engine, suite, items, run)
        if run.ranks.rank != 0:  # rank 0 scores
            return {"raw_path": str(suite.raw_path), "rows": len(rows), "left_out": left_out}
        result = suite.score(engine, rows, left_out)
    suite.report(result)
    return result
