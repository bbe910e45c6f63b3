"""Sharegpt records: a dataset's files read into an index, one record checked into turns + an image.

In order: the record format's constants (``PLACEHOLDER_CHAR``, ``IMAGE_MARKER``, the
roles), ``Turn`` and ``ParsedRecord``; ``RecordIndex`` and ``read_index`` (one ``.json``
list, a ``.jsonl`` file, several, or a folder; each record kept as its raw JSON bytes
and parsed when asked for); then ``parse_record`` and its steps (the image and ``meta``,
the turns, the one image marker, where the image file is).

The record format is the reference's (section 2 of reference-behavior.md)::

    {"conversations": [{"from": "human", "value": "①①…①\\n\\noptional instruction"},
                       {"from": "gpt", "value": "answer"}],
     "image": "relative/path.jpg", "meta": "dir=/folder;k=v"}

A broken record raises ``BadSample`` (``_bad_samples``); turns become tokens in ``_tokens``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from medcap.data._bad_samples import BadSample


# ---- The record format

PLACEHOLDER_CHAR = "\u2460"  # '①', the reference's image placeholder character
IMAGE_MARKER = "<image>"  # the canonical marker a parsed user turn carries
# One image marker: a run of ① (spaces/newlines between them allowed), <image> or <|image|>.
MARKER_RE = re.compile(rf"{PLACEHOLDER_CHAR}(?:\s*{PLACEHOLDER_CHAR})*|<image>|<\|image\|>")
ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

JSON_SUFFIXES = (".json", ".jsonl", ".ndjson")


@dataclass
class Turn:
    """One message. A user turn of a sample with an image holds exactly one ``<image>``."""

    role: str
    text: str


@dataclass
class ParsedRecord:
    turns: List[Turn]
    image_path: Optional[Path]  # None: text-only
    image_candidates: Tuple[Path, ...] = ()  # every location tried, for the error message


# ---- The index: every record as raw JSON bytes

class RecordIndex:
    """Raw JSON bytes of every record, in order; ``index[i]`` parses record ``i``.

    The bytes sit in one buffer with an offset table, for two reasons: construction
    does no per-record work beyond splitting the file (a JSON Lines file is not even
    parsed until a record is asked for, so one broken line is one bad sample, not a
    dead run), and DataLoader workers forked from the training process share the
    buffer instead of slowly copying a list of half a million dicts page by page as
    reference counts are touched.
    """

    def __init__(self, blobs: Sequence[bytes], origins: Sequence[Tuple[int, int]], files: Sequence[Path]):
        lengths = np.fromiter((len(b) for b in blobs), dtype=np.int64, count=len(blobs))
        self._offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self._offsets[1:])
        self._buf = np.frombuffer(b"".join(blobs), dtype=np.uint8) if blobs else np.zeros(0, np.uint8)
        # origins: "file.jsonl:LINE" or "file.json[#ITEM]" per record, compressed to
        # (file number, position) so that 500k records cost two small arrays.
        self.files = list(files)
        self._origin_file = np.asarray([o[0] for o in origins], dtype=np.int32)
        self._origin_pos = np.asarray([o[1] for o in origins], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def raw(self, i: int) -> bytes:
        return self._buf[self._offsets[i] : self._offsets[i + 1]].tobytes()

    def origin(self, i: int) -> str:
        f = self.files[int(self._origin_file[i])]
        pos = int(self._origin_pos[i])
        return f"{f.name} line {pos}" if f.suffix.lower() in (".jsonl", ".ndjson") else f"{f.name} item {pos}"

    def file_of(self, i: int) -> Path:
        return self.files[int(self._origin_file[i])]

    def __getitem__(self, i: int) -> Any:
        try:
            return json.loads(self.raw(i))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadSample(f"malformed record: invalid JSON at {self.origin(i)}: {e}") from e


def _source_files(source: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]) -> List[Path]:
    paths = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    files: List[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in JSON_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"dataset folder {str(p)!r} holds no .json/.jsonl files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"dataset file not found: {str(p)!r}")
    return files


def _is_json_lines(path: Path, data: bytes) -> bool:
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return True
    if path.suffix.lower() == ".json":
        return False
    return not data.lstrip().startswith(b"[")


_WS = re.compile(r"\s*")


def _list_spans(text: str) -> List[bytes]:
    """The raw bytes of every item of a JSON list, by one pass of the stdlib decoder.

    Each item is decoded once (that is what checks the syntax) and thrown away;
    its source text is kept, so nothing is re-serialised and the record a worker
    later parses is exactly what the file says.
    """
    dec = json.JSONDecoder()
    i = _WS.match(text, 0).end()
    if text[i : i + 1] != "[":
        if text[i : i + 1] == "{":
            obj = json.loads(text)
            if isinstance(obj, dict) and isinstance(obj.get("data"), list):
                return [json.dumps(x, ensure_ascii=False).encode("utf-8") for x in obj["data"]]
        raise ValueError("the file does not start with '['")
    out: List[bytes] = []
    i += 1
    n = len(text)
    expect_item = True
    while True:
        i = _WS.match(text, i).end()
        if i >= n:
            raise ValueError("unexpected end of file inside the list")
        c = text[i]
        if c == "]":
            if out and expect_item:
                raise ValueError(f"trailing comma before ']' at char {i}")
            tail = _WS.match(text, i + 1).end()
            if tail != n:
                raise ValueError(f"extra data after the list at char {tail}")
            return out
        if c == ",":
            if expect_item:
                raise ValueError(f"unexpected ',' at char {i}")
            expect_item = True
            i += 1
            continue
        if not expect_item:
            raise ValueError(f"expected ',' or ']' at char {i}")
        _, end = dec.raw_decode(text, i)
        out.append(text[i:end].encode("utf-8"))
        i = end
        expect_item = False


def read_index(source) -> RecordIndex:
    """Build the index of one file, several files, or a folder of .json/.jsonl files.

    A ``.json`` file holds one JSON list; ``.jsonl``/``.ndjson`` (or another
    name whose content does not start with ``[``) one record per line.
    """
    files = _source_files(source)
    blobs: List[bytes] = []
    origins: List[Tuple[int, int]] = []
    for fi, path in enumerate(files):
        data = path.read_bytes()
        if data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]  # UTF-8 BOM, as written by some spreadsheet tools
        if _is_json_lines(path, data):
            for ln, line in enumerate(data.split(b"\n"), start=1):
                if line.strip():
                    blobs.append(line)
                    origins.append((fi, ln))
            continue
        try:
            spans = _list_spans(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise ValueError(
                f"cannot read dataset file {str(path)!r}: not a valid JSON list ({e}). A .json file must hold one "
                "JSON list of records; use .jsonl for one record per line (a bad line is then one bad sample)."
            ) from e
        blobs.extend(spans)
        origins.extend((fi, k) for k in range(len(spans)))
    return RecordIndex(blobs, origins, files)


# ---- One record: checked turns and an image path

def parse_meta(meta: str) -> Dict[str, str]:
    """``"dir=/a;k=v"`` -> ``{"dir": "/a", "k": "v"}`` (values may contain '=')."""
    out: Dict[str, str] = {}
    for part in meta.split(";"):
        if not part.strip():
            continue
        if "=" not in part:
            raise BadSample(f"malformed record: meta entry {part!r} is not key=value")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _check_text(text: str, what: str) -> str:
    """Refuse a lone UTF-16 surrogate (JSON ``"\\ud800"``): Python keeps it, but no UTF-8
    file can hold it, so the sample would pass training and crash the results writer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = f"\\u{ord(text[e.start]):04x}"
        raise BadSample(
            f"malformed record: {what} holds a lone surrogate {bad} at character {e.start} "
            "(a broken \\u escape in the JSON), which is not text UTF-8 can store"
        ) from None
    return text


def count_markers(text: str) -> int:
    return len(MARKER_RE.findall(text))


def _image_candidates(
    image: str, meta_dir: Optional[str], image_dir: Optional[Path], json_dir: Optional[Path]
) -> List[Path]:
    rel = Path(image)
    if rel.is_absolute():
        return [rel]
    if meta_dir:
        base = Path(meta_dir)
        if base.is_absolute():
            return [base / rel]
        # A relative dir= means the reference's working directory; image_dir and the
        # JSON file's folder are tried next so that a moved dataset still resolves.
        out = [base / rel]
        out += [d / base / rel for d in (image_dir, json_dir) if d is not None]
        return out
    return [d / rel for d in (image_dir, json_dir) if d is not None] or [rel]


def parse_record(
    record: Any,
    *,
    conversation_column: str = "conversations",
    image_column: str = "image",
    image_dir: Optional[Union[str, Path]] = None,
    json_dir: Optional[Union[str, Path]] = None,
    new_system_prompt: Optional[str] = None,
) -> ParsedRecord:
    """Check one record and turn it into turns + an image path. Raises BadSample.

    The rules on the loose ends of the reference's format:

    * roles ``human``/``user`` -> user, ``gpt``/``assistant`` -> assistant, ``system`` -> system;
    * the image marker is a run of ``①`` (any length, whitespace between allowed:
      one image), ``<image>`` or ``<|image|>``, recognised in user turns only;
      at most one per sample (the model takes one image per sample);
    * ``meta`` present but empty, or no ``image``: a text-only sample; a marker in
      a text-only sample is a bad sample ("marker without image");
    * an image without a marker gets its placeholders prepended to the first user
      turn, separated from its text by a blank line (the reference's layout);
    * no user turn, no non-empty assistant turn, unknown roles or wrong types: bad;
    * text that is not valid Unicode (a lone surrogate) in a message, the image
      path or meta: bad (see ``_check_text``).

    The image path is resolved but not checked for existence (that happens when
    the image is loaded).
    """
    if not isinstance(record, Mapping):
        raise BadSample(f"malformed record: expected a JSON object, got {type(record).__name__}")
    conv = record.get(conversation_column)
    if conv is None:
        raise BadSample(f"malformed record: no {conversation_column!r} key (keys: {sorted(record)[:8]})")
    if not isinstance(conv, list) or not conv:
        raise BadSample(f"malformed record: {conversation_column!r} must be a non-empty list")
    image, has_image, meta = _image_of(record, image_column)
    turns, n_markers = _turns(conv, new_system_prompt)
    _check_turns(turns)
    _place_image_marker(turns, n_markers, has_image, names_image=bool(image))
    if not has_image:
        return ParsedRecord(turns, None, ())
    cands = _image_candidates(
        image,
        meta.get("dir"),
        Path(image_dir) if image_dir else None,
        Path(json_dir) if json_dir else None,
    )
    return ParsedRecord(turns, next((c for c in cands if c.exists()), cands[0]), tuple(cands))


def _image_of(record: Mapping[str, Any], image_column: str) -> Tuple[Optional[str], bool, Dict[str, str]]:
    """The image the record names, whether the sample has one, and its ``meta`` entries.

    ``meta=""`` means no image (the reference's rule); so does no image key.
    """
    image = record.get(image_column)
    meta = record.get("meta")
    if meta is not None and not isinstance(meta, str):
        raise BadSample(f"malformed record: 'meta' must be a string, got {type(meta).__name__}")
    if isinstance(image, list):
        if len(image) > 1:
            raise BadSample(f"malformed record: {len(image)} images, but a sample takes one image")
        image = image[0] if image else None
    if image is not None and not isinstance(image, str):
        raise BadSample(f"malformed record: {image_column!r} must be a string path, got {type(image).__name__}")
    if image:
        _check_text(image, f"{image_column!r}")
    if meta:
        _check_text(meta, "'meta'")
    has_image = bool(image) and not (meta is not None and meta.strip() == "")
    return image, has_image, parse_meta(meta) if (has_image and meta) else {}


def _turns(conv: List[Any], new_system_prompt: Optional[str]) -> Tuple[List[Turn], int]:
    """The messages as turns (each marker in a user turn made ``IMAGE_MARKER``), and the marker count."""
    turns: List[Turn] = []
    if new_system_prompt is not None:
        turns.append(Turn("system", new_system_prompt))
    n_markers = 0
    for k, msg in enumerate(conv):
        if not isinstance(msg, Mapping) or "from" not in msg or "value" not in msg:
            raise BadSample(f"malformed record: message {k} needs 'from' and 'value'")
        role = ROLE_MAP.get(msg["from"]) if isinstance(msg["from"], str) else None
        if role is None:
            raise BadSample(f"malformed record: message {k} has unknown role {msg['from']!r} (human, gpt or system)")
        text = msg["value"]
        if not isinstance(text, str):
            raise BadSample(f"malformed record: message {k} value must be a string, got {type(text).__name__}")
        _check_text(text, f"message {k} ({msg['from']})")
        if role == "system" and new_system_prompt is not None:
            continue  # new_system_prompt replaces the record's own, as in torchtune
        if role == "user":
            found = count_markers(text)
            if found:
                n_markers += found
                text = MARKER_RE.sub(IMAGE_MARKER, text)
        turns.append(Turn(role, text))
    return turns, n_markers


def _check_turns(turns: List[Turn]) -> None:
    if not any(t.role == "user" for t in turns):
        raise BadSample("malformed record: no user (human) turn")
    if not any(t.role == "assistant" and t.text.strip() for t in turns):
        raise BadSample("malformed record: no assistant (gpt) turn with text to learn from")


def _place_image_marker(turns: List[Turn], n_markers: int, has_image: bool, names_image: bool) -> None:
    """One marker for a sample with an image (prepended to the first user turn when the
    record has none), none for a text-only sample."""
    if n_markers > 1:
        raise BadSample(f"malformed record: {n_markers} image markers, but a sample takes one image")
    if n_markers == 1 and not has_image:
        why = "its meta is empty" if names_image else "it names no image"
        raise BadSample(f"marker without image: the user turn holds an image marker but {why}")
    if has_image and n_markers == 0:
        first_user = next(t for t in turns if t.role == "user")
        body = first_user.text.strip()
        first_user.text = IMAGE_MARKER + ("\n\n" + body if body else "")
