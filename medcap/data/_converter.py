"""What every conversion to sharegpt shares: the ``Converter`` that turns a source's
(image, text) rows into records, and the readers and writer of the files.

In order: the record's constants (50 placeholders, the caption instructions);
``MissingInput`` and ``MissingField`` (a missing input, a source whose records all
lack a field) and ``require_fields``; ``clean_text`` and ``lone_surrogate``; ``Converter``
(records and what it skipped, per source, reported through ``medcap._io.progress``; a
row holding text no UTF-8 file can store is skipped and named); the readers
``read_json_list``, ``read_jsonl`` (invalid lines counted, the first few named),
``read_csv``; ``write_records`` (one JSON list, written atomically, each ``meta`` ``dir=``
made relative to the file's folder so that a converted data set can be moved).

The sources themselves: ``_convert`` (captions: PMC-OA, VQA-RAD, the textplus set,
and the command) and ``_convert_vqa`` (SLAKE, PathVQA).
"""

from __future__ import annotations

import csv
import json
import os
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from medcap._io import atomic_write, progress
from medcap.data._records import PLACEHOLDER_CHAR


# ---- Records

NUM_PLACEHOLDERS = 50
INSTRUCTION_CHOICES = ("none", "random", "fixed")
# Our own phrasings of a caption request; "fixed" uses the first.
CAPTION_INSTRUCTIONS = (
    "Describe the image in detail.",
    "Write a caption for this medical image.",
    "What does this image show?",
    "Give a concise description of this figure.",
    "Describe the findings in this image.",
    "Summarise what is visible in this image.",
    "Explain the content of this medical image.",
    "Provide a detailed caption for the picture.",
    "What can be seen in this scan?",
    "Report on this image.",
    "Characterise the main structures shown here.",
    "Write a short report describing this image.",
    "What is depicted in this figure?",
    "Give a brief account of the image.",
    "Describe this picture for a clinician.",
    "List the notable features of this image.",
)
_NAMED_BAD_LINES = 5  # invalid JSONL lines named one by one; the rest are only counted


class MissingInput(FileNotFoundError):
    """An input file or folder the conversion needs is not there."""


class MissingField(ValueError):
    """No record of a source has a field the conversion reads from it."""


def require_fields(source: str, path: Path, items: Sequence[Any], fields: Sequence[str]) -> None:
    """Raise ``MissingField`` when some field of ``fields`` is in no record of ``items``:
    then ``path`` is not what ``source`` should be. Some records lacking it is data, not schema."""
    records = [it for it in items if isinstance(it, dict)]
    if not items:
        return
    for field in fields:
        if not any(field in r for r in records):
            seen = sorted({k for r in records[:1000] for k in r})
            raise MissingField(
                f"{source}: no record of {path} has the field {field!r} "
                f"(expected {list(fields)}; the records have {seen if seen else 'no fields: not JSON objects'})"
            )


def clean_text(text: Any) -> Optional[str]:
    """Caption text with the placeholder character rewritten; None when empty or not text."""
    if not isinstance(text, str):
        return None
    text = text.replace(PLACEHOLDER_CHAR, "(1)").strip()
    return text or None


def lone_surrogate(value: Any) -> Optional[str]:
    """Where text holds a lone UTF-16 surrogate (a broken ``\\u`` escape in its source),
    which no UTF-8 file can store: ``"\\udc80 at character 5"``; None when it holds none."""
    if not isinstance(value, str):
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"\\u{ord(value[e.start]):04x} at character {e.start}"
    return None


class _Folder:
    """``exists(rel)`` for many files of one folder, listing each directory once."""

    def __init__(self, root: Path):
        self.root = root
        self._listing: Dict[Path, frozenset] = {}

    def exists(self, rel: str) -> bool:
        p = self.root / rel
        d = p.parent
        if d not in self._listing:
            try:
                self._listing[d] = frozenset(os.listdir(d))
            except OSError:
                self._listing[d] = frozenset()
        return p.name in self._listing[d]


class Converter:
    """Turns (image, text) pairs into records; counts what it skips, per source."""

    def __init__(self, instruction: str = "none", seed: int = 0, progress: bool = True):
        if instruction not in INSTRUCTION_CHOICES:
            raise ValueError(f"instruction must be one of {INSTRUCTION_CHOICES}, got {instruction!r}")
        self.instruction = instruction
        self.rng = random.Random(seed)
        self.progress = progress
        self.skipped: Dict[str, Counter] = {}
        self.warnings: List[str] = []

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)
        print(f"WARNING: {msg}", file=sys.stderr)

    def unstorable(self, source: str, where: str, **values: Any) -> bool:
        """Whether a value of a row holds a lone surrogate: the row is then skipped,
        counted under "lone surrogate" and named (``where``: its file and position; the
        first few of each source), as ``validate-data`` and training name such a record."""
        for name, value in values.items():
            found = lone_surrogate(value)
            if found:
                skipped = self.skipped.setdefault(source, Counter())
                skipped["lone surrogate"] += 1
                if skipped["lone surrogate"] <= _NAMED_BAD_LINES:
                    print(f"WARNING: {source}: {where}: the {name} holds a lone surrogate {found} (a broken \\u "
                          "escape), which no UTF-8 file can store; skipped", file=sys.stderr)
                return True
        return False

    def human_value(self) -> str:
        marker = PLACEHOLDER_CHAR * NUM_PLACEHOLDERS
        if self.instruction == "none":
            return marker
        if self.instruction == "fixed":
            return marker + "\n\n" + CAPTION_INSTRUCTIONS[0]
        return marker + "\n\n" + self.rng.choice(CAPTION_INSTRUCTIONS)

    def records(self, source: str, pairs: Iterable[Tuple[Any, Any]], image_dir: Path, total: Optional[int] = None,
                origin: Optional[Path] = None):
        """``pairs`` of (image path relative to ``image_dir``, text) -> records.

        Each record: a human turn of 50 ``①`` (plus a blank line and a caption request
        with ``--instruction random|fixed``), a gpt turn with the text (``①`` rewritten to
        ``(1)``), ``image`` relative to ``meta``'s ``dir=`` (absolute here; ``write_records``
        writes it relative to the output file). ``origin``: the file the pairs come from,
        named with a skipped row's position.
        """
        if not image_dir.is_dir():
            raise MissingInput(f"{source}: image folder not found: {image_dir}")
        skipped = self.skipped.setdefault(source, Counter())
        folder = _Folder(image_dir)
        meta = f"dir={image_dir.resolve()}"
        out = []
        with progress(total, source, "rec", enabled=self.progress) as bar:
            for k, (image, text) in enumerate(pairs):
                value = self.human_value()  # drawn for every input row, so choices do not depend on what is skipped
                text = clean_text(text)
                if not isinstance(image, str) or not image:
                    skipped["no image name"] += 1
                elif text is None:
                    skipped["empty text"] += 1
                elif self.unstorable(source, f"{origin or source} item {k}", image=image, text=text):
                    pass
                elif not folder.exists(image):
                    skipped["missing image"] += 1
                else:
                    out.append(
                        {
                            "conversations": [{"from": "human", "value": value}, {"from": "gpt", "value": text}],
                            "image": image,
                            "meta": meta,
                        }
                    )
                bar.update(1)
        if skipped:
            print(f"{source}: {len(out)} records, skipped " + ", ".join(f"{n} {k}" for k, n in skipped.items()), file=sys.stderr)
        return out


# ---- Reading and writing files

def read_json_list(path: Path) -> List[Any]:
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, list):
        raise ValueError(f"{path} must hold a JSON list, got {type(data).__name__}")
    return data


def read_jsonl(path: Path, invalid: Optional[Counter] = None) -> List[Any]:
    """The JSON values of ``path``'s non-blank lines; lines that are not JSON are skipped,
    counted under ``"invalid JSON line"`` in ``invalid`` and the first few named."""
    out = []
    bad = 0
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    bad += 1
                    if bad <= _NAMED_BAD_LINES:
                        print(f"WARNING: {path} line {n}: invalid JSON ({e}); skipped", file=sys.stderr)
    if bad > _NAMED_BAD_LINES:
        print(f"WARNING: {path}: {bad} invalid JSON lines in all; skipped", file=sys.stderr)
    if bad and invalid is not None:
        invalid["invalid JSON line"] += bad
    return out


def read_csv(path: Path, columns: Sequence[str]) -> List[Dict[str, str]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # case reports are long fields
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing columns {missing} (has {reader.fieldnames})")
        return list(reader)


def relative_meta(meta: str, folder: Path) -> str:
    """``meta`` with an absolute ``dir=`` rewritten relative to ``folder`` (the JSON file's):
    medcap's reader resolves it against the file's folder, so file and images move together."""
    parts = []
    for part in meta.split(";"):
        key, eq, value = part.partition("=")
        if key.strip() == "dir" and eq and os.path.isabs(value.strip()):
            part = "dir=" + Path(os.path.relpath(value.strip(), folder)).as_posix()
        parts.append(part)
    return ";".join(parts)


def write_records(path: Path, records: List[Dict[str, Any]]) -> Path:
    """One JSON list, one record per line (readable, grep-able), written atomically; each
    ``meta`` ``dir=`` relative to ``path``'s folder (``relative_meta``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = path.parent.resolve()

    def line(r: Dict[str, Any]) -> str:
        if isinstance(r.get("meta"), str):
            r = {**r, "meta": relative_meta(r["meta"], folder)}
        return json.dumps(r, ensure_ascii=False)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("[\n")
            for k, r in enumerate(records):
                f.write(("," if k else "") + line(r) + "\n")
            f.write("]\n")

    atomic_write(path, write)
    print(f"wrote {path} ({len(records)} records)", file=sys.stderr)
    return path
