"""What medcap sends vLLM and how it reads the answers: prompt embeddings over HTTP.

    embeds = prompt_embeds(model, tokens, image)           # [s, d]: text + image soft tokens, checked
    client = VllmClient(url, llm_folder(llm_dir), tokenizer=tok)
    out = client.complete([embeds], max_tokens=64, stop_token_ids=tok.stop_tokens)
    out[0].tokens, out[0].text                             # ids (stop id left out), medcap-decoded text
    for ids in client.stream(embeds, max_tokens=64, ...):  # new ids as vLLM makes them (the server)

In order: the checks of what we send (width, dtype, finite, stop ids, sampling), made
before any call; the embeddings (one prompt, or a batch through one vision forward) and
their wire form (base64 of ``torch.save`` bytes, what vLLM's ``prompt_embeds`` reads); the
LLM folder vLLM loads (``llm_folder``); ``VllmClient`` (``/v1/completions`` only: vLLM's
chat endpoint cannot carry embeddings; explicit stop ids with ``ignore_eos``; vLLM's
``token_ids`` end with the stop id, left out here as the native engine does); and
``generate_tokens``, ``GenerationEngine.generate_tokens``' contract over a client.
The server process is ``_vllm_server``, the engine the recipe uses ``_vllm_engine``.
"""

from __future__ import annotations

import base64
import io
import json
import math
import operator
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from medcap.generation._prompt import decode_text
from medcap.generation._sampling import row_seed

SERVED_NAME = "medcap-llm"


class VllmError(RuntimeError):
    """The vLLM server could not start, answer or stop (one line, naming what to look at)."""


class PromptEmbedsError(ValueError):
    """A prompt's embeddings or settings would be refused (or worse) by vLLM: caught before any call."""


# ---- What we send: checked before any call ---------------------------------------


def check_prompt_embeds(embeds: torch.Tensor, hidden_size: int, *, index: int = 0) -> None:
    """Raise :class:`PromptEmbedsError` unless ``embeds`` is a finite float ``[seq >= 1, hidden_size]``."""
    where = f"prompt {index}: prompt_embeds"
    if not isinstance(embeds, torch.Tensor):
        raise PromptEmbedsError(f"{where} must be a torch.Tensor, got {type(embeds).__name__}")
    if embeds.dim() != 2:
        raise PromptEmbedsError(f"{where} must be 2-D [seq, {hidden_size}], got shape {tuple(embeds.shape)}")
    if embeds.shape[0] < 1:
        raise PromptEmbedsError(f"{where} is empty (0 positions)")
    if embeds.shape[1] != hidden_size:
        raise PromptEmbedsError(f"{where} width {embeds.shape[1]} != the LLM's hidden size {hidden_size}")
    if not embeds.is_floating_point():
        raise PromptEmbedsError(f"{where} dtype {embeds.dtype} is not a float dtype")
    if not bool(torch.isfinite(embeds).all()):
        raise PromptEmbedsError(f"{where} holds NaN or inf")


def check_stop_ids(stop_token_ids: Sequence[int], vocab_size: int) -> List[int]:
    """Explicit stop ids as ints in ``[0, vocab_size)``; raises :class:`PromptEmbedsError`."""
    ids = []
    for t in stop_token_ids:
        try:
            if isinstance(t, bool):
                raise TypeError
            t = operator.index(t)  # int, numpy int, 0-d integer tensor
        except TypeError:
            raise PromptEmbedsError(f"stop token id {t!r} is not an integer") from None
        if not 0 <= t < vocab_size:
            raise PromptEmbedsError(f"stop token id {t} is outside the vocabulary [0, {vocab_size})")
        ids.append(t)
    if not ids:
        raise PromptEmbedsError("no stop token ids: pass the tokenizer's (medcap sends them explicitly)")
    return ids


def check_sampling(max_tokens: int, temperature: float, top_k: Optional[int]) -> None:
    if int(max_tokens) < 1:
        raise PromptEmbedsError(f"max_tokens must be >= 1, got {max_tokens}")
    if temperature is not None and (not math.isfinite(float(temperature)) or float(temperature) < 0):
        raise PromptEmbedsError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_k is not None and int(top_k) < 1:
        raise PromptEmbedsError(f"top_k must be None or >= 1, got {top_k}")


@torch.inference_mode()
def prompt_embeds(model, tokens: Sequence[int], image: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One prompt's embeddings ``[s, d]`` from a :class:`~medcap.models.MedcapModel`: the LLM's
    token embeddings with the image's soft tokens at the placeholders (``model.embed``),
    on the CPU, checked (placeholders vs image, width, dtype, finite)."""
    t = torch.as_tensor(list(tokens), dtype=torch.long, device=model.tok_embeddings.weight.device)
    imgs = None if image is None else image.unsqueeze(0).to(t.device)  # [1, 3, H, W]
    out = model.embed(t.unsqueeze(0), imgs)[0].detach().cpu()  # [s, d]
    check_prompt_embeds(out, model.tok_embeddings.embedding_dim)
    return out



@torch.inference_mode()
def prompt_embeds_batch(model, prompts: Sequence[Sequence[int]], images: Sequence[Optional[torch.Tensor]],
                        ) -> List[torch.Tensor]:
    """``prompt_embeds`` of several prompts through one vision forward: the prompts padded on
    the right (a position's embedding depends on its token alone), then each row cut back."""
    if not prompts:
        return []
    device = model.tok_embeddings.weight.device
    longest = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), longest, dtype=torch.long, device=device)  # [b, L]; 0 pads
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
    with_image = [im for im in images if im is not None]
    imgs = torch.stack(with_image).to(device) if with_image else None  # [n, 3, H, W], in row order
    fused = model.embed(tokens, imgs)  # [b, L, d]
    out = [fused[i, : len(p)].detach().cpu() for i, p in enumerate(prompts)]
    for i, e in enumerate(out):
        check_prompt_embeds(e, model.tok_embeddings.embedding_dim, index=i)
    return out

def encode_embeds(embeds: torch.Tensor, dtype: Optional[torch.dtype] = None) -> str:
    """The wire form: base64 of ``torch.save`` bytes (contiguous, CPU, optionally cast)."""
    t = embeds.detach().cpu().contiguous()
    if dtype is not None:
        t = t.to(dtype)
    buf = io.BytesIO()
    torch.save(t, buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# ---- The frozen LLM as vLLM reads it: a Hugging Face folder ----------------------


@dataclass(frozen=True)
class LlmFolder:
    """What the client must know of the model the server loads (from ``config.json``)."""

    path: str
    hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    head_dim: int
    architecture_given: bool = True  # False: a Llama config.json without "architectures" (the demo's)


def llm_folder(path: str | os.PathLike) -> LlmFolder:
    """Check an HF model folder (``config.json`` + ``*.safetensors``, a Llama) and read its sizes.

    It is the folder medcap loads the frozen decoder from (``checkpoint_dir``: the tiny test
    and demo LLMs, Llama-3.1-8B-Instruct as downloaded); vLLM loads the same weights."""
    p = Path(path)
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"vLLM needs a Hugging Face model folder: {str(cfg_path)!r} not found")
    if not any(p.glob("*.safetensors")):
        raise FileNotFoundError(f"no *.safetensors weights in {str(p)!r}")
    cfg = json.loads(cfg_path.read_text())
    arch = cfg.get("architectures") or []
    # transformers writes no "architectures" for a LlamaConfig saved on its own (medcap demo's
    # LLM): model_type says what it is, and the server is told (--hf-overrides).
    given = bool(arch)
    if not given and cfg.get("model_type") == "llama":
        arch = ["LlamaForCausalLM"]
    if "LlamaForCausalLM" not in arch:
        raise ValueError(f"{str(p)!r} holds {arch or 'no architecture'}, not LlamaForCausalLM")
    hidden = int(cfg["hidden_size"])
    return LlmFolder(
        path=str(p.resolve()),
        hidden_size=hidden,
        vocab_size=int(cfg["vocab_size"]),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        head_dim=int(cfg.get("head_dim") or hidden // int(cfg["num_attention_heads"])),
        architecture_given=given,
    )


def check_model_matches(model, folder: LlmFolder) -> None:
    """The medcap model's embedding table must have the folder's shape (same LLM)."""
    vocab, width = model.tok_embeddings.weight.shape
    if (vocab, width) != (folder.vocab_size, folder.hidden_size):
        raise ValueError(
            f"the medcap model's LLM embeds {vocab} x {width}, but {folder.path!r} is "
            f"{folder.vocab_size} x {folder.hidden_size}: not the same LLM"
        )


# ---- The client ----------------------------------------------------------------------


@dataclass
class Completion:
    tokens: List[int]  # generated ids, the stop id left out (as the native engine returns them)
    text: str  # decoded by medcap's tokenizer (cut at the first special token, stripped); "" without one
    finish_reason: str  # "stop" (a stop id) or "length" (max_tokens)
    logprobs: Optional[List[Dict[int, float]]] = None  # per generated token: top ids -> log-prob


def _is_greedy(temperature: Optional[float], top_k: Optional[int]) -> bool:
    return temperature is None or float(temperature) <= 0 or top_k == 1


def _http_error(e: urllib.error.HTTPError) -> VllmError:
    detail = e.read().decode(errors="replace")
    try:
        detail = json.loads(detail).get("error", {}).get("message", detail)
    except (ValueError, AttributeError):
        pass
    return VllmError(f"vLLM answered {e.code}: {' '.join(str(detail).split())[:300]}")


class VllmClient:
    """Posts prompt embeddings to ``/v1/completions``; every check happens before the first post.
    ``connect(url, folder)``: a client of a server someone else started, checked first."""

    def __init__(
        self,
        url: str,
        folder: LlmFolder,
        *,
        tokenizer=None,
        max_model_len: Optional[int] = None,
        concurrency: int = 64,
        timeout: float = 600.0,
        wire_dtype: Optional[torch.dtype] = None,
        model_name: str = SERVED_NAME,
    ):
        self.url = url.rstrip("/")
        self.folder = folder
        self.tokenizer = tokenizer
        self.max_model_len = int(max_model_len or folder.max_position_embeddings)
        self.concurrency = int(concurrency)
        self.timeout = float(timeout)
        self.wire_dtype = wire_dtype  # e.g. torch.bfloat16 halves the bytes for a bf16 server
        self.model_name = model_name

    @classmethod
    def connect(cls, url: str, folder: LlmFolder, **kwargs) -> "VllmClient":
        """A client of the vLLM server at ``url``, which must serve ``folder`` (the ``root``
        of one of its ``/v1/models``); its name and ``max_model_len`` are read from there."""
        base = url.rstrip("/")
        try:
            with urllib.request.urlopen(base + "/v1/models", timeout=30) as r:
                models = json.loads(r.read()).get("data") or []
        except urllib.error.HTTPError as e:
            raise _http_error(e) from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise VllmError(f"no vLLM server answers at {base}: {e}") from None
        for m in models:
            root = str(m.get("root") or "")
            if root and os.path.isdir(root) and Path(root).resolve() == Path(folder.path):
                return cls(base, folder, model_name=str(m["id"]), max_model_len=m.get("max_model_len"), **kwargs)
        served = ", ".join(f"{m.get('id')} ({m.get('root')})" for m in models) or "nothing"
        raise VllmError(f"the vLLM server at {base} serves {served}, not {folder.path}")

    def _check(self, embeds, budgets, seeds, stop_token_ids, temperature, top_k) -> List[int]:
        """Every refusal before any call; the stop ids as ints."""
        n = len(embeds)
        if len(budgets) != n or len(seeds) != n:
            raise PromptEmbedsError(f"{n} prompts but {len(budgets)} max_tokens and {len(seeds)} seeds")
        # None: no stop id at all, every row runs to its budget (benchmarks); [] is a mistake
        stops = [] if stop_token_ids is None else check_stop_ids(stop_token_ids, self.folder.vocab_size)
        for i, (e, m) in enumerate(zip(embeds, budgets)):
            check_prompt_embeds(e, self.folder.hidden_size, index=i)
            check_sampling(m, temperature or 0.0, top_k)
            if e.shape[0] + m > self.max_model_len:
                raise PromptEmbedsError(
                    f"prompt {i}: {e.shape[0]} positions + {m} new tokens exceed max_model_len {self.max_model_len}"
                )
        return stops

    def _body(self, embeds, max_tokens, stops, temperature, top_k, seed, logprobs=None, stream=False) -> dict:
        greedy = _is_greedy(temperature, top_k)
        body = {
            "model": self.model_name,
            "prompt_embeds": encode_embeds(embeds, self.wire_dtype),
            "max_tokens": int(max_tokens),
            "temperature": 0.0 if greedy else float(temperature),
            "top_k": 1 if greedy else (int(top_k) if top_k else 0),  # vLLM: 0 = no cut
            "top_p": 1.0,
            "stop_token_ids": stops,
            "ignore_eos": True,  # only our stop ids stop a row, not the folder's eos_token_id
            "skip_special_tokens": False,
            "return_token_ids": True,
        }
        if seed is not None and not greedy:
            body["seed"] = int(seed)
        if logprobs is not None:
            body["logprobs"] = int(logprobs)
            body["return_tokens_as_token_ids"] = True  # keys "token_id:<id>", no tokenizer needed
        if stream:
            body["stream"] = True
        return body

    def complete(
        self,
        embeds: Sequence[torch.Tensor],
        *,
        max_tokens: int | Sequence[int],
        stop_token_ids: Optional[Sequence[int]],
        temperature: float = 0.0,
        top_k: Optional[int] = None,
        seed: Optional[int] | Sequence[Optional[int]] = None,
        logprobs: Optional[int] = None,
    ) -> List[Completion]:
        """One completion per prompt, in order, posted concurrently (vLLM batches them).
        ``temperature <= 0`` or ``top_k == 1``: greedy. ``seed``: one for all rows or one per
        row (sampling draws from vLLM's per-request stream). ``stop_token_ids=None``: none."""
        n = len(embeds)
        budgets = [int(max_tokens)] * n if isinstance(max_tokens, int) else [int(m) for m in max_tokens]
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * n
        stops = self._check(embeds, budgets, seeds, stop_token_ids, temperature, top_k)
        if logprobs is not None and int(logprobs) < 0:
            raise PromptEmbedsError(f"logprobs must be None or >= 0, got {logprobs}")
        bodies = [self._body(e, m, stops, temperature, top_k, s, logprobs) for e, m, s in zip(embeds, budgets, seeds)]
        if n <= 1:
            choices = [self._post(b) for b in bodies]
        else:
            with ThreadPoolExecutor(max_workers=min(self.concurrency, n)) as pool:
                choices = list(pool.map(self._post, bodies))
        return [self._completion(c, set(stops)) for c in choices]

    def stream(self, embeds: torch.Tensor, *, max_tokens: int, stop_token_ids: Sequence[int],
               temperature: float = 0.0, top_k: Optional[int] = None, seed: Optional[int] = None) -> "CompletionStream":
        """One prompt, streamed: iterate for the new ids as vLLM makes them; ``close()`` ends
        the request early (vLLM aborts a request whose client leaves)."""
        stops = self._check([embeds], [int(max_tokens)], [seed], stop_token_ids, temperature, top_k)
        body = self._body(embeds, max_tokens, stops, temperature, top_k, seed, stream=True)
        return CompletionStream(self._open(body), set(stops))

    def _open(self, body: dict):
        req = urllib.request.Request(
            self.url + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            raise _http_error(e) from None
        except (urllib.error.URLError, OSError) as e:
            raise VllmError(f"vLLM server at {self.url} did not answer: {e}") from None

    def _post(self, body: dict) -> dict:
        with self._open(body) as r:
            try:
                return json.loads(r.read())["choices"][0]
            except (OSError, ValueError, KeyError, IndexError) as e:
                raise VllmError(f"vLLM server at {self.url} gave no completion: {e}") from None

    def _completion(self, choice: dict, stops: set) -> Completion:
        ids = [int(t) for t in (choice.get("token_ids") or [])]
        lps = None
        if choice.get("logprobs"):
            lps = [
                {int(k.split(":", 1)[1]): float(v) for k, v in (top or {}).items()}
                for top in choice["logprobs"].get("top_logprobs") or []
            ]
        if ids and ids[-1] in stops and choice.get("finish_reason") == "stop":
            ids = ids[:-1]
            if lps is not None:
                lps = lps[: len(ids)]
        text = decode_text(self.tokenizer, ids) if self.tokenizer is not None else ""
        return Completion(tokens=ids, text=text, finish_reason=str(choice.get("finish_reason")), logprobs=lps)


class CompletionStream:
    """Server-sent events of one streamed completion: iterating yields lists of new token ids
    (a stop id left out); ``finish_reason`` is set at the end; ``close`` ends the request."""

    def __init__(self, response, stops: set):
        self._resp, self._stops = response, stops
        self.finish_reason: Optional[str] = None

    def __iter__(self):
        try:
            for raw in self._resp:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    return
                msg = json.loads(data)
                if "error" in msg:
                    err = msg["error"]
                    raise VllmError(f"vLLM failed the request: {err.get('message', err) if isinstance(err, dict) else err}")
                for choice in msg.get("choices") or []:
                    ids = [int(t) for t in choice.get("token_ids") or []]
                    cut = next((k for k, t in enumerate(ids) if t in self._stops), len(ids))
                    self.finish_reason = choice.get("finish_reason") or self.finish_reason
                    if ids[:cut]:
                        yield ids[:cut]
        except (OSError, ValueError) as e:
            raise VllmError(f"the stream from vLLM broke off: {e}") from None
        finally:
            self.close()

    def close(self) -> None:
        self._resp.close()

    def __enter__(self) -> "CompletionStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- Rows in, tokens out: GenerationEngine.generate_tokens' contract --------------------


def generate_tokens(
    client: VllmClient,
    model,
    prompts: Sequence[Sequence[int]],
    images: Sequence[Optional[torch.Tensor]],
    max_new_tokens: int | Sequence[int],
    keys: Sequence[str],
    *,
    stop_token_ids: Optional[Sequence[int]],
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    seed: int = 0,
    embed_batch: int = 16,
) -> List[List[int]]:
    """What ``GenerationEngine.generate_tokens`` returns, decoded by vLLM: per row the new
    tokens without the stop id. The embeddings are made ``embed_batch`` rows per vision
    forward. Sampled row ``key`` draws with vLLM's seed ``row_seed(seed, key)``, so it does
    not depend on its batch (the streams differ from the native engine's: sampled texts are
    not comparable across backends, greedy ones are)."""
    n = len(prompts)
    if len(images) != n or len(keys) != n:
        raise ValueError("prompts, images and keys must have the same length")
    check_model_matches(model, client.folder)
    budgets = [int(max_new_tokens)] * n if isinstance(max_new_tokens, int) else [int(m) for m in max_new_tokens]
    rows = [i for i in range(n) if budgets[i] > 0]  # a budget of 0 (a prompt that fills its room) makes nothing
    step = max(1, int(embed_batch))
    embeds: List[torch.Tensor] = []
    for lo in range(0, len(rows), step):
        part = rows[lo : lo + step]
        embeds += prompt_embeds_batch(model, [prompts[i] for i in part], [images[i] for i in part])
    out = client.complete(
        embeds, max_tokens=[budgets[i] for i in rows], stop_token_ids=stop_token_ids, temperature=temperature,
        top_k=top_k, seed=[row_seed(seed, keys[i]) for i in rows],
    )
    tokens: List[List[int]] = [[] for _ in range(n)]
    for i, c in zip(rows, out):
        tokens[i] = c.tokens
    return tokens
