"""A chat-completion request body -> what the worker needs, or an :class:`APIError`.

    ChatCompletionRequest   OpenAI's request, as pydantic models: its field names, types and
                            limits (unknown fields are ignored, as OpenAI's clients send many)
    check_content_type      JSON only (415 otherwise): a page elsewhere cannot post a "simple"
                            cross-origin request (text/plain, forms) to a loopback server
    check_json_depth        nesting deeper than ``MAX_JSON_DEPTH``, found by scanning the bytes
                            (no recursion) before ``json.loads`` recurses into it
    parse_chat_request      the body's JSON checked against them, then against this server:
                            the model it serves, its token limit, the seed's range, one image
    decode_data_url         the one image: a base64 ``data:`` URL only (the server fetches
                            nothing and never opens a path a client names)
    load_image_bytes        its bytes through medcap's image loader (size in pixels checked)

Each refusal is a 4xx in OpenAI's error format whose message says where and what is
wrong. The route reads the body and validates it here instead of declaring the model as
its parameter: FastAPI would then answer a malformed body before the API key is checked,
and turn a body cut off at ``--max-body-bytes`` into a 400.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Annotated, Any, Dict, List, Literal, Optional, Tuple, Union

from pydantic import (
    BaseModel,
    Discriminator,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

# data URL media type -> (file suffix the image loader sees, magic-byte check)
IMAGE_TYPES = {
    "image/png": (".png", lambda b: b.startswith(b"\x89PNG\r\n\x1a\n")),
    "image/jpeg": (".jpg", lambda b: b.startswith(b"\xff\xd8\xff")),
    "image/jpg": (".jpg", lambda b: b.startswith(b"\xff\xd8\xff")),
    "application/dicom": (".dcm", lambda b: b[128:132] == b"DICM"),
}


# ---- errors and limits


class APIError(Exception):
    """An answer in OpenAI's error format: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> Dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; each is a ``medcap serve`` flag (defaults documented there)."""

    max_body_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_tokens: int = 1024  # the most new tokens one request may ask for
    queue_size: int = 256  # requests waiting for a slot before 503
    request_timeout_s: float = 300.0


MAX_JSON_DEPTH = 64  # OpenAI's requests nest 5 deep (messages, a message, its parts, a part, image_url)
MAX_SEED = 2**64 - 1  # the range torch.Generator.manual_seed takes without wrapping


def _need(cond: bool, message: str, param: Optional[str] = None) -> None:
    if not cond:
        raise APIError(400, message, param=param)


# ---- OpenAI's request, as pydantic models


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class ImageURL(BaseModel):
    url: StrictStr  # checked by decode_data_url


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL

    @field_validator("image_url", mode="before")
    @classmethod
    def _bare_url(cls, value: Any) -> Any:
        return {"url": value} if isinstance(value, str) else value  # ``"image_url": "data:..."`` is read too


def _part_kind(part: Any) -> Optional[str]:
    kind = part.get("type") if isinstance(part, dict) else getattr(part, "type", None)
    return {"text": "text part", "image_url": "image part"}.get(kind)


def _content_kind(content: Any) -> Optional[str]:
    return "string" if isinstance(content, str) else "parts" if isinstance(content, list) else None


# The unions' tags name no field, so that an error's location can leave them out (_where).
_TAGS = {"text part", "image part", "string", "parts"}
Part = Annotated[
    Union[Annotated[TextPart, Tag("text part")], Annotated[ImagePart, Tag("image part")]],
    Discriminator(_part_kind, custom_error_type="part_type",
                  custom_error_message="Input should be a part of type 'text' or 'image_url'"),
]
Content = Annotated[
    Union[Annotated[StrictStr, Tag("string")], Annotated[List[Part], Tag("parts")]],
    Discriminator(_content_kind, custom_error_type="content_type",
                  custom_error_message="Input should be a string or a list of parts"),
]


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Content


class StreamOptions(BaseModel):
    include_usage: Optional[StrictBool] = None


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``; ``max_completion_tokens`` is the newer name of
    ``max_tokens`` and wins when both are given. ``top_k`` is medcap's own."""

    model: Optional[StrictStr] = None
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=1)
    max_tokens: Optional[StrictInt] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2, strict=True)
    top_k: Optional[StrictInt] = Field(None, ge=1)
    seed: Optional[StrictInt] = None
    n: Optional[Literal[1]] = 1  # one answer per request
    stream: Optional[StrictBool] = False
    stream_options: Optional[StreamOptions] = None
    messages: List[Message] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _newer_name_wins(cls, body: Any) -> Any:
        """Given ``max_completion_tokens``, ``max_tokens`` (its deprecated name) is not read."""
        if isinstance(body, dict) and body.get("max_completion_tokens") is not None:
            body = {k: v for k, v in body.items() if k != "max_tokens"}
        return body


# ---- the request checked: OpenAI's limits, then this server's


@dataclass
class ChatRequest:
    """A checked request: the conversation in medcap's message format, its image bytes."""

    messages: List[Dict[str, str]]
    image: Optional[Tuple[bytes, str]]  # (bytes, suffix)
    max_tokens: Optional[int]  # None: the server's default budget
    temperature: Optional[float]  # None: the config's
    top_k: Optional[int]
    seed: Optional[int]
    stream: bool
    include_usage: bool


def check_content_type(value: Optional[str]) -> None:
    """``application/json``, optionally ``; charset=utf-8``; anything else is a 415."""
    media, _, params = (value or "").partition(";")
    charset = ""
    for param in params.split(";"):
        key, _, val = param.partition("=")
        if key.strip().lower() == "charset":
            charset = val.strip().strip('"').lower()
    if media.strip().lower() != "application/json" or charset not in ("", "utf-8", "utf8"):
        shown = repr(value[:60]) if value else "none"
        raise APIError(415, f"the body must be JSON sent as 'Content-Type: application/json' (got {shown}); "
                       "with curl: -H 'Content-Type: application/json'", code="unsupported_media_type")


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_CHUNK = 1 << 20


def check_json_depth(raw: bytes, limit: int = MAX_JSON_DEPTH) -> None:
    """400 when the JSON in ``raw`` nests deeper than ``limit``: strings dropped (brackets
    inside them do not count), then the running depth over the brackets left, in numpy,
    a megabyte at a time."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return  # cannot nest deeper than the brackets it holds
    brackets = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    if len(brackets) <= limit:
        return
    import numpy as np

    step = np.zeros(256, dtype=np.int8)
    step[list(b"[{")], step[list(b"]}")] = 1, -1
    depth = 0
    for start in range(0, len(brackets), _CHUNK):
        chunk = np.frombuffer(brackets, dtype=np.uint8, count=min(_CHUNK, len(brackets) - start), offset=start)
        running = np.cumsum(step[chunk], dtype=np.int64) + depth
        if int(running.max()) > limit:
            raise APIError(400, f"the request body nests JSON deeper than {limit} levels")
        depth = int(running[-1])


def parse_chat_request(raw: bytes, limits: Limits, model_name: str) -> ChatRequest:
    """Check the body of ``POST /v1/chat/completions``."""
    check_json_depth(raw)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    try:
        req = ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        raise _refusal(e) from None
    if req.model is not None and req.model != model_name:
        raise APIError(404, f"model {req.model!r} is not served here; this server serves {model_name!r}",
                       param="model", code="model_not_found")
    _need(req.seed is None or 0 <= req.seed <= MAX_SEED, "seed must be an integer from 0 to 2**64-1 "
          f"({MAX_SEED}), got {_short(req.seed)}", "seed")
    max_tokens = req.max_tokens if req.max_completion_tokens is None else req.max_completion_tokens
    _need(max_tokens is None or max_tokens <= limits.max_tokens,
          f"max_tokens must be between 1 and {limits.max_tokens} (this server's limit), got {max_tokens}", "max_tokens")
    messages, image = _conversation(req.messages)
    temperature = None if req.temperature is None else float(req.temperature)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return ChatRequest(messages, image, max_tokens, temperature, req.top_k, req.seed, bool(req.stream), include_usage)


def _short(value: Any) -> str:
    shown = str(value)
    return shown if len(shown) <= 40 else f"{shown[:20]}...({len(shown)} characters)"


def _refusal(error: ValidationError) -> APIError:
    """pydantic's first complaint as one line: where, what is wrong, what was sent."""
    first = error.errors(include_url=False)[0]
    where = _where(first["loc"])
    if not where:
        return APIError(400, "the request body must be a JSON object")
    message = f"{where}: {first['msg']}"
    sent = first.get("input")
    if first["type"] != "missing" and (sent is None or isinstance(sent, (str, int, float))):
        shown = repr(sent)
        message += f", got {shown if len(shown) <= 60 else shown[:57] + '...'}"
    return APIError(400, message, param=where)


def _where(loc: Tuple[Union[str, int], ...]) -> str:
    """``('messages', 0, 'content', 'parts', 1, 'image part', 'image_url')`` -> ``messages[0].content[1].image_url``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in _TAGS:
            out += f".{part}" if out else str(part)
    return out


def _conversation(messages: List[Message]) -> Tuple[List[Dict[str, str]], Optional[Tuple[bytes, str]]]:
    """OpenAI messages -> medcap messages (the image marker where the image was) + the image."""
    from medcap.generation import clean_text, question_messages

    out: List[Dict[str, str]] = []
    image = None
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        text, img = _content(m.content, where)
        if img is None:
            out.append({"role": m.role, "content": clean_text(text)})
            continue
        _need(image is None, "a request may carry one image (the model sees one image per conversation); "
              f"{where} holds another", where)
        _need(m.role == "user", f"{where}: images go in a user message", where)
        image = img
        out.extend(question_messages(text or None))  # the image, a blank line, the question
    _need(out[-1]["role"] == "user", "the last message must be the user's", "messages")
    return out, image


def _content(content: Union[str, List[Union[TextPart, ImagePart]]], where: str) -> Tuple[str, Optional[Tuple[bytes, str]]]:
    if isinstance(content, str):
        return content, None
    texts: List[str] = []
    image = None
    for j, part in enumerate(content):
        if isinstance(part, TextPart):
            texts.append(part.text)
            continue
        at = f"{where}.content[{j}]"
        _need(image is None, f"{where} holds two images; a request may carry one", at)
        image = decode_data_url(part.image_url.url, at)
    return "\n".join(texts), image


# ---- the image


def decode_data_url(url: str, where: str = "image_url") -> Tuple[bytes, str]:
    """``data:<type>;base64,<data>`` -> (bytes, file suffix); anything else is refused."""
    if not url.startswith("data:"):
        scheme = url.split(":", 1)[0][:20] if ":" in url else "a path"
        raise APIError(400, f"{where}: only base64 data URLs (data:image/png;base64,...) are accepted; this "
                       f"server fetches no URL and opens no file ({scheme} refused)", param=where)
    head, sep, data = url[5:].partition(",")
    _need(bool(sep) and head.endswith(";base64"), f"{where}: the data URL must be base64 (data:TYPE;base64,...)", where)
    mime = head[: -len(";base64")].split(";")[0].strip().lower()
    _need(mime in IMAGE_TYPES, f"{where}: image type {mime!r} is not accepted; send one of "
          f"{sorted(IMAGE_TYPES)}", where)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{where}: the data URL is not valid base64", param=where) from None
    suffix, looks_right = IMAGE_TYPES[mime]
    _need(looks_right(raw), f"{where}: the data is not a {mime} file (its first bytes do not match)", where)
    return raw, suffix


def load_image_bytes(data: bytes, suffix: str, max_pixels: int):
    """Image bytes -> 8-bit RGB PIL image through the same loader as image files
    (so an image served here is preprocessed exactly as ``medcap caption`` does it).
    The bytes go to a private temporary file the server names itself."""
    from medcap.data import BadSample, load_image

    fd, path = tempfile.mkstemp(prefix="medcap-serve-", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            img = load_image(path, max_pixels=max_pixels)
        except BadSample as e:
            reason = str(getattr(e, "reason", None) or e).replace(path, "the image")
            raise APIError(400, f"the image cannot be used: {reason}", param="image_url") from None
        except (MemoryError, OverflowError) as e:  # a file crafted past the loader's checks
            raise APIError(400, f"the image cannot be used: {type(e).__name__}", param="image_url") from None
        return img
    finally:
        os.unlink(path)
