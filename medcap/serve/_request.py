"""A chat-completion request body -> what the worker needs, or an :class:`APIError`.

Everything a client sends is checked here before it reaches the model: the JSON
shape, the one image (a base64 ``data:`` URL only: the server fetches nothing and
never opens a path a client names), its size in pixels, the prompt length and the
token budget. Each refusal is a 4xx with a message that says what is wrong.
"""

from __future__ import annotations

import base64
import binascii
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

# data URL media type -> (file suffix the image loader sees, magic-byte check)
IMAGE_TYPES = {
    "image/png": (".png", lambda b: b.startswith(b"\x89PNG\r\n\x1a\n")),
    "image/jpeg": (".jpg", lambda b: b.startswith(b"\xff\xd8\xff")),
    "image/jpg": (".jpg", lambda b: b.startswith(b"\xff\xd8\xff")),
    "application/dicom": (".dcm", lambda b: b[128:132] == b"DICM"),
}
ROLES = ("system", "user", "assistant")


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


def _need(cond: bool, message: str, param: Optional[str] = None) -> None:
    if not cond:
        raise APIError(400, message, param=param)


def _int_field(body: Dict[str, Any], name: str) -> Optional[int]:
    v = body.get(name)
    if v is None:
        return None
    _need(isinstance(v, int) and not isinstance(v, bool), f"{name} must be an integer, got {v!r}", name)
    return v


def parse_chat_request(body: Any, limits: Limits, model_name: str) -> ChatRequest:
    """Check the JSON body of ``POST /v1/chat/completions``."""
    _need(isinstance(body, dict), "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != model_name:
        raise APIError(404, f"model {model!r} is not served here; this server serves {model_name!r}",
                       param="model", code="model_not_found")
    max_tokens = _int_field(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _int_field(body, "max_tokens")
    if max_tokens is not None:
        _need(1 <= max_tokens <= limits.max_tokens,
              f"max_tokens must be between 1 and {limits.max_tokens} (this server's limit), got {max_tokens}",
              "max_tokens")
    temperature = body.get("temperature")
    if temperature is not None:
        _need(isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and 0 <= temperature <= 2,
              f"temperature must be a number between 0 and 2, got {temperature!r}", "temperature")
        temperature = float(temperature)
    top_k = _int_field(body, "top_k")
    _need(top_k is None or top_k >= 1, f"top_k must be >= 1, got {top_k}", "top_k")
    seed = _int_field(body, "seed")
    n = body.get("n", 1)
    _need(n in (1, None), f"n must be 1 (one answer per request), got {n!r}", "n")
    stream = body.get("stream", False)
    _need(isinstance(stream, bool) or stream is None, f"stream must be true or false, got {stream!r}", "stream")
    opts = body.get("stream_options") or {}
    _need(isinstance(opts, dict), "stream_options must be an object", "stream_options")
    messages, image = _messages(body.get("messages"))
    return ChatRequest(messages, image, max_tokens, temperature, top_k, seed, bool(stream),
                       bool(opts.get("include_usage")))


def _messages(raw: Any) -> Tuple[List[Dict[str, str]], Optional[Tuple[bytes, str]]]:
    """OpenAI messages -> medcap messages (the image marker where the image was) + the image."""
    from medcap.generation import clean_text
    from medcap.generation import question_messages

    _need(isinstance(raw, list) and raw, "messages must be a non-empty list", "messages")
    out: List[Dict[str, str]] = []
    image = None
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        _need(isinstance(m, dict), f"{where} must be an object", where)
        role = m.get("role")
        _need(role in ROLES, f"{where}.role must be one of {list(ROLES)}, got {role!r}", where)
        text, img = _content(m.get("content"), where)
        if img is not None:
            _need(image is None, "a request may carry one image (the model sees one image per conversation); "
                  f"{where} holds another", where)
            _need(role == "user", f"{where}: images go in a user message", where)
            image = img
            out.extend(question_messages(text or None))  # the image, a blank line, the question
        else:
            out.append({"role": role, "content": clean_text(text)})
    _need(out[-1]["role"] == "user", "the last message must be the user's", "messages")
    return out, image


def _content(content: Any, where: str) -> Tuple[str, Optional[Tuple[bytes, str]]]:
    if isinstance(content, str):
        return content, None
    _need(isinstance(content, list), f"{where}.content must be a string or a list of parts", where)
    texts: List[str] = []
    image = None
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        _need(isinstance(part, dict), f"{at} must be an object", at)
        kind = part.get("type")
        if kind == "text":
            _need(isinstance(part.get("text"), str), f"{at}.text must be a string", at)
            texts.append(part["text"])
        elif kind == "image_url":
            _need(image is None, f"{where} holds two images; a request may carry one", at)
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            image = decode_data_url(url, at)
        else:
            raise APIError(400, f"{at}.type must be 'text' or 'image_url', got {kind!r}", param=at)
    return "\n".join(texts), image


def decode_data_url(url: Any, where: str = "image_url") -> Tuple[bytes, str]:
    """``data:<type>;base64,<data>`` -> (bytes, file suffix); anything else is refused."""
    _need(isinstance(url, str), f"{where}.image_url.url must be a string", where)
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
    from medcap.data import load_image
    from medcap.data._records import BadSample

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
