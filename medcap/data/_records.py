"""Sharegpt records: the index and each record, their tokens and labels under the Llama 3
chat template, and the bad-sample policy that keeps one broken record from killing a run.

Bad samples: the exception that names one, and the log that counts them.

A long run must not die on one broken record out of half a million. The
dataset raises :class:`BadSample` internally; under the ``skip`` policy it
moves on to the next good sample and reports what it skipped *inside the item
it returns* (``item["skipped"]``), because ``__getitem__`` usually runs in a
DataLoader worker whose memory the training process never sees. The collate
concatenates those lists into ``batch["skipped"]`` and the training loop
merges them into one :class:`SkipLog`, which logs each bad index once and
writes the end-of-run summary.

Reading sharegpt records: the index (cheap, at construction) and each record (lazy).

The index keeps every record as its raw JSON bytes in one buffer with an offset
table. Two reasons: construction does no per-record work beyond splitting the
file (a JSON Lines file is not even parsed until a record is asked for, so one
broken line is one bad sample, not a dead run), and DataLoader workers forked
from the training process share the buffer instead of slowly copying a list of
half a million dicts page by page as reference counts are touched.

Record format (the reference's, section 2 of reference-behavior.md)::

    {"conversations": [{"from": "human", "value": "①①…①\\n\\noptional instruction"},
                       {"from": "gpt", "value": "answer"}],
     "image": "relative/path.jpg", "meta": "dir=/folder;k=v"}

Decisions on the loose ends (each documented in ``parse_record``):

* roles ``human``/``user`` -> user, ``gpt``/``assistant`` -> assistant, ``system`` -> system;
* the image marker is a run of ``①`` (any length, whitespace between allowed:
  one image), ``<image>`` or ``<|image|>``, recognised in user turns only;
  at most one per sample (the model takes one image per sample);
* ``meta`` present but empty, or no ``image``: a text-only sample; a marker in
  a text-only sample is a bad sample ("marker without image");
* an image without a marker gets its placeholders prepended to the first user
  turn, separated from its text by a blank line (the reference's layout);
* no user turn, no non-empty assistant turn, unknown roles or wrong types: bad;
* text that is not valid Unicode (a lone surrogate from a JSON ``"\\ud800"``
  escape) in a message, the image path or meta: bad. Python would carry it
  through training, but writing it to a UTF-8 results file fails, so the
  evaluation (which parses records here too) would crash at every restart.

Turns -> tokens, labels and image placeholders, with truncation that never breaks the image.

Token layout (Llama 3 chat template, built from the tokenizer's public
``tokenize_message`` / ``encode``)::

    <|begin_of_text|>
    <|start_header_id|>user<|end_header_id|>\\n\\n  [text before] [image_id x N] [text after]  <|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n  answer  <|eot_id|>
    ...
    <|end_of_text|>

Each turn's text is stripped as torchtune does; the text around the image
marker is encoded as it stands, so the reference's "placeholders, blank line,
instruction" keeps its blank line. A turn without image is tokenized by
torchtune unchanged. Masks follow torchtune: ``<|begin_of_text|>`` and
``<|end_of_text|>`` masked; a turn's header, body and end share the turn's
mask (user/system masked unless ``train_on_input``; assistant unmasked).
Labels are the tokens where unmasked, ``-100`` where masked, and also ``-100``
at every placeholder and the position right after each (the reference's rule:
nothing is learnt from predicting out of image positions). Labels are not
shifted; the recipe shifts.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

# ---- Bad samples -----------------------------------------------------------------

log = logging.getLogger("medcap.data")

BAD_SAMPLE_POLICIES = ("skip", "raise")


class BadSample(Exception):
    """A record that cannot become a training sample, with the reason why.

    ``reason`` is one line that starts with a short category ("image not found",
    "corrupt image", "malformed record", "too long", ...) followed by details;
    ``index`` is the record's position in the dataset when known.
    """

    def __init__(self, reason: str, index: Optional[int] = None):
        self.reason = reason
        self.index = index
        super().__init__(f"sample {index}: {reason}" if index is not None else reason)

    def with_index(self, index: int) -> "BadSample":
        return BadSample(self.reason, index)


def reason_kind(reason: str) -> str:
    """The category of a reason: the text before its first ':' (the whole text if none)."""
    return reason.split(":", 1)[0].strip()


def check_policy(policy: str) -> str:
    if policy not in BAD_SAMPLE_POLICIES:
        raise ValueError(f"bad_samples must be one of {BAD_SAMPLE_POLICIES}, got {policy!r}")
    return policy


SkipEntries = Iterable[Union[Tuple[int, str], List[Any]]]


class SkipLog:
    """Counts skipped samples by index and logs each one the first time it is seen.

    Feed it with :meth:`update` (a collated batch, an item, or a list of
    ``(index, reason)`` pairs). The same index reported again (next epoch, or by
    another worker) is neither logged nor counted twice. Safe to share between
    threads; for processes, ship the pairs back (as the dataset does) and merge.
    """

    def __init__(self, total: Optional[int] = None, logger: Optional[logging.Logger] = None):
        self.total = total
        self._reasons: Dict[int, str] = {}
        self._events = 0
        self._lock = threading.Lock()
        self._log = logger or log

    def __getstate__(self):
        # Locks do not pickle; spawn-started DataLoader workers pickle the dataset holding us.
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def add(self, index: int, reason: str) -> bool:
        """Record one skipped sample; returns True when the index is new."""
        index = int(index)
        with self._lock:
            self._events += 1
            if index in self._reasons:
                return False
            self._reasons[index] = reason
        self._log.warning("skipping sample %d: %s", index, reason)
        return True

    def update(self, entries: Union[Mapping[str, Any], SkipEntries, None]) -> int:
        """Merge ``batch["skipped"]`` / ``item["skipped"]`` (or the dict itself); returns how many were new."""
        if entries is None:
            return 0
        if isinstance(entries, Mapping):
            entries = entries.get("skipped") or ()
        return sum(self.add(i, r) for i, r in entries)

    def merge(self, other: "SkipLog") -> int:
        return self.update(other._reasons.items())

    def __len__(self) -> int:
        return len(self._reasons)

    def __contains__(self, index: int) -> bool:
        return int(index) in self._reasons

    @property
    def count(self) -> int:
        """Distinct bad samples seen."""
        return len(self._reasons)

    @property
    def events(self) -> int:
        """Times a bad sample was met (counts repeats across epochs)."""
        return self._events

    @property
    def reasons(self) -> Dict[int, str]:
        with self._lock:
            return dict(sorted(self._reasons.items()))

    def by_kind(self) -> Dict[str, int]:
        with self._lock:
            return dict(Counter(reason_kind(r) for r in self._reasons.values()).most_common())

    def state_dict(self) -> Dict[str, Any]:
        """For resumable runs: what has been skipped so far."""
        return {"total": self.total, "reasons": {str(k): v for k, v in self.reasons.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        with self._lock:
            self.total = state.get("total", self.total)
            self._reasons.update({int(k): v for k, v in state.get("reasons", {}).items()})

    def summary(self, max_examples: int = 5) -> str:
        """A few lines for the end of a run: how many, why, and the first few."""
        n = self.count
        of = f" of {self.total}" if self.total else ""
        if n == 0:
            return f"bad samples: none skipped{of}."
        pct = f" ({100.0 * n / self.total:.2f}%)" if self.total else ""
        kinds = ", ".join(f"{c} {k}" for k, c in self.by_kind().items())
        lines = [f"bad samples: {n}{of} skipped{pct}: {kinds}."]
        for i, (idx, reason) in enumerate(self.reasons.items()):
            if i >= max_examples:
                lines.append(f"  ... and {n - max_examples} more")
                break
            lines.append(f"  #{idx}: {reason}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"SkipLog(count={self.count}, total={self.total})"


# ---- Records ---------------------------------------------------------------------

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


# --------------------------------------------------------------------------- index


class RecordIndex:
    """Raw JSON bytes of every record, in order; ``index[i]`` parses record ``i``."""

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


# --------------------------------------------------------------------------- records


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

    The image path is resolved but not checked for existence (that happens when
    the image is loaded). See the module docstring for the rules.
    """
    if not isinstance(record, Mapping):
        raise BadSample(f"malformed record: expected a JSON object, got {type(record).__name__}")
    conv = record.get(conversation_column)
    if conv is None:
        raise BadSample(f"malformed record: no {conversation_column!r} key (keys: {sorted(record)[:8]})")
    if not isinstance(conv, list) or not conv:
        raise BadSample(f"malformed record: {conversation_column!r} must be a non-empty list")

    # Which sample has an image: meta="" means none (the reference's rule); no image key, none.
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
    meta_dict = parse_meta(meta) if (has_image and meta) else {}

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

    if not any(t.role == "user" for t in turns):
        raise BadSample("malformed record: no user (human) turn")
    if not any(t.role == "assistant" and t.text.strip() for t in turns):
        raise BadSample("malformed record: no assistant (gpt) turn with text to learn from")
    if n_markers > 1:
        raise BadSample(f"malformed record: {n_markers} image markers, but a sample takes one image")
    if n_markers == 1 and not has_image:
        why = "its meta is empty" if image else "it names no image"
        raise BadSample(f"marker without image: the user turn holds an image marker but {why}")
    if has_image and n_markers == 0:
        first_user = next(t for t in turns if t.role == "user")
        body = first_user.text.strip()
        first_user.text = IMAGE_MARKER + ("\n\n" + body if body else "")

    image_path = None
    candidates: Tuple[Path, ...] = ()
    if has_image:
        cands = _image_candidates(
            image,
            meta_dict.get("dir"),
            Path(image_dir) if image_dir else None,
            Path(json_dir) if json_dir else None,
        )
        candidates = tuple(cands)
        image_path = next((c for c in cands if c.exists()), cands[0])
    return ParsedRecord(turns, image_path, candidates)


# ---- Tokens and labels -----------------------------------------------------------

CROSS_ENTROPY_IGNORE_IDX = -100  # = torchtune.data.CROSS_ENTROPY_IGNORE_IDX; not imported, to keep tools light


def _message(role: str, content: str):
    from torchtune.data import Message

    return Message(role=role, content=content)


@dataclass
class Tokenized:
    tokens: List[int]
    mask: List[bool]  # True = excluded from the loss
    answer: List[bool]  # True for assistant body tokens (what truncation must leave some of)
    image_starts: List[int] = field(default_factory=list)
    full_length: int = 0  # length before truncation
    truncated: bool = False


def _check_tokenizer(tokenizer) -> None:
    missing = [a for a in ("encode", "tokenize_message", "image_id", "bos_id", "eos_id", "eot_id") if not hasattr(tokenizer, a)]
    if missing:
        raise TypeError(
            f"the tokenizer {type(tokenizer).__name__} lacks {missing}; use medcap.models.llama3_tokenizer "
            "(a torchtune Llama3Tokenizer)"
        )


def _encode(tokenizer, text: str) -> List[int]:
    return tokenizer.encode(text, add_bos=False, add_eos=False) if text else []


def _tokenize_turn(tokenizer, turn: Turn, num_image_tokens: int, add_end: bool) -> tuple:
    """Tokens of one turn and, when it holds the image, the offset of its placeholders."""
    text = turn.text.strip()
    if IMAGE_MARKER not in text or turn.role != "user":
        toks = tokenizer.tokenize_message(_message(turn.role, text), add_end_tokens=add_end)
        return toks, None
    pre, post = text.split(IMAGE_MARKER, 1)
    header = tokenizer.tokenize_message(_message(turn.role, ""), add_end_tokens=False)
    start = len(header) + len(_encode(tokenizer, pre))
    toks = header + _encode(tokenizer, pre) + [tokenizer.image_id] * num_image_tokens + _encode(tokenizer, post)
    if add_end:
        toks.append(tokenizer.eot_id)
    return toks, start


def tokenize_conversation(
    tokenizer,
    turns: Sequence[Turn],
    *,
    num_image_tokens: int,
    train_on_input: bool = False,
    add_end_tokens: bool = True,
) -> Tokenized:
    """Tokenize turns with the Llama 3 template, expanding the image marker into
    ``num_image_tokens`` copies of ``tokenizer.image_id``.

    ``add_end_tokens=False`` leaves the last turn open (no ``<|eot_id|>``, no
    ``<|end_of_text|>``): for a prompt, end the turns with an empty assistant turn.
    """
    _check_tokenizer(tokenizer)
    tokens: List[int] = [tokenizer.bos_id]
    mask: List[bool] = [True]
    answer: List[bool] = [False]
    starts: List[int] = []
    for k, turn in enumerate(turns):
        last = k == len(turns) - 1
        toks, start = _tokenize_turn(tokenizer, turn, num_image_tokens, add_end=add_end_tokens or not last)
        if start is not None:
            starts.append(len(tokens) + start)
        masked = turn.role != "assistant" and not train_on_input
        is_answer = turn.role == "assistant"
        if is_answer:
            # The header is not the answer: only body tokens count as "something to learn".
            header_len = len(tokenizer.tokenize_message(_message(turn.role, ""), add_end_tokens=False))
            flags = [False] * header_len + [True] * (len(toks) - header_len)
        else:
            flags = [False] * len(toks)
        tokens += toks
        mask += [masked] * len(toks)
        answer += flags
    if add_end_tokens:
        tokens.append(tokenizer.eos_id)
        mask.append(True)
        answer.append(False)
    return Tokenized(tokens, mask, answer, starts, full_length=len(tokens))


def truncate_tokenized(t: Tokenized, max_seq_len: Optional[int], num_image_tokens: int) -> Tokenized:
    """Cut text from the end of the conversation so that ``len(tokens) <= max_seq_len``.

    The cut keeps ``max_seq_len - 1`` tokens and ends with ``<|end_of_text|>``
    (masked), exactly where the text stops: a cut answer is not closed with
    ``<|eot_id|>``, so the model is never taught to stop mid-sentence. Refuses
    (``BadSample("too long: ...")``) when the cut would reach an image
    placeholder or leave no assistant text to learn from.
    """
    if not max_seq_len or len(t.tokens) <= max_seq_len:
        return t
    if max_seq_len < 2:
        raise BadSample(f"too long: max_seq_len={max_seq_len} cannot hold any sample")
    keep = max_seq_len - 1
    eos = t.tokens[-1]
    for s in t.image_starts:
        if s + num_image_tokens > keep:
            raise BadSample(
                f"too long: {t.full_length} tokens > max_seq_len {max_seq_len}, and the image placeholders "
                f"end at token {s + num_image_tokens}: the image cannot fit"
            )
    if not any(t.answer[:keep]):
        first = t.answer.index(True) if True in t.answer else len(t.tokens)
        raise BadSample(
            f"too long: {t.full_length} tokens > max_seq_len {max_seq_len}, and the prompt "
            f"(with its image) takes {first} tokens, leaving nothing of the answer to learn from"
        )
    return Tokenized(
        tokens=t.tokens[:keep] + [eos],
        mask=t.mask[:keep] + [True],
        answer=t.answer[:keep] + [False],
        image_starts=list(t.image_starts),
        full_length=t.full_length,
        truncated=True,
    )


def make_labels(t: Tokenized, num_image_tokens: int, ignore_idx: int = CROSS_ENTROPY_IGNORE_IDX) -> List[int]:
    """Unshifted labels: token where unmasked, ``ignore_idx`` where masked, at every
    image placeholder, and at the position right after each placeholder."""
    labels = [ignore_idx if m else tok for tok, m in zip(t.tokens, t.mask)]
    n = len(labels)
    for s in t.image_starts:
        # placeholders s .. s+N-1 and each one's next position: s .. s+N
        for p in range(s, min(s + num_image_tokens + 1, n)):
            labels[p] = ignore_idx
    return labels
