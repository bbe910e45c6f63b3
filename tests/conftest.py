"""Session-wide fixtures any test area may use: a tiny HF-format Llama with its
tokenizer, a builder of tiny fused models loaded from it, ``one_thread``, the real
Llama 3 tokenizer (``llama3_tokenizer``, from the ``quicktok-v1`` test extra), and a
disk that fills up (``full_disk``)."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import struct
from pathlib import Path

import pytest

# sha256 of Meta's published Llama-3 / 3.1 original/tokenizer.model.
LLAMA3_TOKENIZER_SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory):
    """``medcap.testing.make_tiny_llm`` written once per session (read-only: do not modify).

    Keys: tokenizer_path, special_tokens_path, checkpoint_dir, checkpoint_files,
    image_token_id, model_kwargs.
    """
    from medcap.testing import make_tiny_llm

    return make_tiny_llm(tmp_path_factory.mktemp("tiny_llm"))


@pytest.fixture(scope="session")
def tiny_model(tiny_llm):
    """Builder: ``tiny_model(num_image_tokens=4, load_weights=True, seed=0, **sizes)`` -> a
    fresh ``MedcapModel`` whose decoder holds ``tiny_llm``'s weights (vision seeded by ``seed``).

    ``sizes`` may change the vision and projector sizes freely; decoder sizes other
    than ``tiny_llm``'s need ``load_weights=False``.
    """
    import torch

    from medcap.models import load_llama_weights, medcap_tiny

    decoder_state = {}  # loaded once: torchtune's checkpointer costs ~1 s (a gc.collect per shard)

    def build(num_image_tokens: int = 4, load_weights: bool = True, seed: int = 0, **sizes):
        torch.manual_seed(seed)
        model = medcap_tiny(**{**tiny_llm["model_kwargs"], **sizes}, num_image_tokens=num_image_tokens)
        if load_weights:
            if not decoder_state:
                load_llama_weights(model, tiny_llm["checkpoint_dir"], tiny_llm["checkpoint_files"])
                decoder_state.update({k: v.clone() for k, v in model.state_dict().items() if k.startswith("decoder.")})
            else:
                missing, unexpected = model.load_state_dict(decoder_state, strict=False)
                assert not unexpected and all(k.startswith("encoders.") for k in missing)
        return model

    return build


@pytest.fixture
def one_thread():
    """Toy-sized ops run far faster on one thread than on cores shared with other jobs."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _quicktok_llama3_table() -> Path:
    """quicktok's ``data/llama3.vocab``, found without running quicktok's code
    (``find_spec`` of a top-level package only locates it)."""
    spec = importlib.util.find_spec("quicktok")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("quicktok-v1 not installed: pip install quicktok-v1")
    for root in spec.submodule_search_locations:
        table = Path(root) / "data" / "llama3.vocab"
        if table.is_file():
            return table
    raise FileNotFoundError(f"quicktok is installed at {list(spec.submodule_search_locations)} but has no data/llama3.vocab")


def _tiktoken_lines(table: bytes) -> bytes:
    """quicktok's table (u32 count, then per entry u16 length, bytes, u32 rank; all
    little-endian) as tiktoken lines ``base64(bytes) rank``, in rank order."""
    (count,) = struct.unpack_from("<I", table, 0)
    offset, entries = 4, []
    for _ in range(count):
        (length,) = struct.unpack_from("<H", table, offset)
        token = table[offset + 2 : offset + 2 + length]
        (rank,) = struct.unpack_from("<I", table, offset + 2 + length)
        offset += 6 + length
        entries.append((rank, token))
    if offset != len(table):
        raise ValueError(f"quicktok llama3.vocab: {len(table) - offset} trailing bytes after {count} entries")
    entries.sort()
    return b"".join(base64.b64encode(token) + b" %d\n" % rank for rank, token in entries)


@pytest.fixture(scope="session")
def llama3_tokenizer_path(tmp_path_factory) -> str:
    """Meta's Llama 3 ``tokenizer.model`` rebuilt from quicktok-v1's table (skips when
    quicktok-v1 is not installed); checked byte for byte against the published sha256."""
    data = _tiktoken_lines(_quicktok_llama3_table().read_bytes())
    digest = hashlib.sha256(data).hexdigest()
    assert digest == LLAMA3_TOKENIZER_SHA256, f"rebuilt tokenizer.model has sha256 {digest}, not Meta's"
    path = tmp_path_factory.mktemp("llama3_tokenizer") / "tokenizer.model"
    path.write_bytes(data)
    return str(path)


@pytest.fixture(scope="session")
def llama3_tokenizer(llama3_tokenizer_path):
    """The real Llama 3 tokenizer (``medcap.models.llama3_tokenizer``): canonical special
    ids (<|begin_of_text|> 128000 ... <|eot_id|> 128009), ``image_id`` 128256."""
    from medcap.models import llama3_tokenizer as load

    return load(llama3_tokenizer_path)


# ---- a full disk, faked at the system call


class FullDisk:
    """``os.write`` to a file whose name matches ``fill(pattern)`` behaves as on a disk that
    fills up: after ``let_through`` such writes, one writes half its bytes (a short write,
    as the last free blocks go), and every later one raises ENOSPC, until ``free()``.
    medcap writes its results, caches, locks and atomic files through ``os.write``."""

    def __init__(self, monkeypatch):
        import os

        self._write, self.pattern, self.hits = os.write, None, 0
        monkeypatch.setattr(os, "write", self.write)

    def fill(self, pattern: str, let_through: int = 0) -> "FullDisk":
        import re

        self.pattern, self.left, self.short_done, self.hits = re.compile(pattern), let_through, False, 0
        return self

    def free(self) -> None:
        self.pattern = None

    def write(self, fd, data):
        import errno
        import os

        if self.pattern is not None:
            try:
                name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                name = ""
            if self.pattern.search(name):
                if self.left > 0:
                    self.left -= 1
                    return self._write(fd, data)
                self.hits += 1
                if not self.short_done and len(data) > 1:
                    self.short_done = True
                    return self._write(fd, bytes(data[: len(data) // 2]))
                raise OSError(errno.ENOSPC, "No space left on device")
        return self._write(fd, data)


@pytest.fixture
def full_disk(monkeypatch):
    """``full_disk.fill(pattern, let_through=0)`` ... ``full_disk.free()``: see ``FullDisk``."""
    return FullDisk(monkeypatch)
