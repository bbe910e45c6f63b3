"""``VllmEngine``: ``GenerationEngine``'s interface, with vLLM doing the decoding.

    engine = VllmEngine.start(model, tokenizer, llm_dir, dtype="bf16", tensor_parallel_size=2)
    try:
        texts = engine.generate_texts(prompts, images, max_new_tokens, keys)
    finally:
        engine.close()                                  # the vLLM server stops with it

What the evaluation, the single shot and the server ask of an engine (``prompt``,
``generate_tokens``, ``generate_texts``, ``batch_size``, ``chunk_size``, ``tokenizer``,
``model``, ``temperature``, ``top_k``, ``seed``) works the same; medcap builds each
prompt's embeddings (vision tower, projector, embedding table) and vLLM decodes them.
``start`` launches vLLM's server (or ``url=`` connects to a running one) and, once vLLM
holds the decoder, drops medcap's copy of its layers (``keep_embedding_side``): on a GPU
two copies of an 8B decoder would not leave vLLM its memory. What vLLM cannot do,
``score_options`` (log-likelihoods of given answers), raises :class:`BackendError`.
"""

from __future__ import annotations

import gc
import logging
from typing import List, Optional, Sequence, Union

import torch
from torch import nn

from medcap.generation._prompt import build_prompt, decode_text
from medcap.generation._vllm import VllmClient, check_model_matches, generate_tokens, llm_folder
from medcap.generation._vllm_server import VllmServer

log = logging.getLogger("medcap.generation")

# medcap's dtype names (the ``dtype`` key) as vLLM's ``--dtype`` spells them.
VLLM_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


class BackendError(RuntimeError):
    """What this backend cannot do (one line, naming the backend that can)."""


# ---- medcap's side of the model


def keep_embedding_side(model: nn.Module) -> int:
    """Drop the decoder's layers and output projection (vLLM has them), keeping the vision
    tower, the projector and the embedding table; returns the bytes freed."""
    dec = model.decoder
    freed = sum(p.numel() * p.element_size() for p in [*dec.layers.parameters(), *dec.output.parameters()])
    dec.layers = nn.ModuleList()
    dec.output = nn.Identity()
    gc.collect()  # what still referenced them (a finished batcher's caches) goes now
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return freed


# ---- The engine


class VllmEngine:
    """Batched generation with vLLM decoding; built by ``start`` (which owns the server it
    starts) or from a ``VllmClient``. Rows of one call are posted together: vLLM batches them
    continuously (``batch_size`` = its ``--max-num-seqs``)."""

    def __init__(self, model: nn.Module, tokenizer, client: VllmClient, *, server: Optional[VllmServer] = None,
                 batch_size: int = 8, temperature: float = 0.0, top_k: Optional[int] = None, seed: int = 0,
                 chunk_size: Optional[int] = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        check_model_matches(model, client.folder)
        self.model = model
        self.tokenizer = tokenizer
        self.client = client
        self.server = server
        self.batch_size = int(batch_size)
        self.temperature = float(temperature or 0.0)
        self.top_k = None if top_k is None else int(top_k)
        self.seed = int(seed or 0)
        self.chunk_size = int(chunk_size or batch_size)
        self.client.concurrency = max(self.chunk_size, self.batch_size)
        self.stop_tokens: Optional[List[int]] = list(tokenizer.stop_tokens)  # None: rows run to their budget
        self.last_stats = {}

    @classmethod
    def start(cls, model: nn.Module, tokenizer, llm_dir: str, *, dtype: str = "bf16", python: Optional[str] = None,
              url: Optional[str] = None, tensor_parallel_size: int = 1, extra_args: Sequence[str] = (),
              max_model_len: Optional[int] = None, batch_size: int = 8, **settings) -> "VllmEngine":
        """vLLM's server for ``llm_dir`` started (or ``url``'s connected), medcap's decoder
        layers dropped, the engine returned; the server stops with ``close``."""
        folder = llm_folder(llm_dir)
        check_model_matches(model, folder)
        max_len = int(max_model_len or model.decoder.max_seq_len)
        server = None
        if url:
            client = VllmClient.connect(url, folder, tokenizer=tokenizer)
            log.info("vLLM: using the server at %s (%s)", client.url, client.model_name)
        else:
            server = VllmServer(folder.path, python=python, dtype=VLLM_DTYPES.get(dtype, dtype), max_model_len=max_len,
                                tensor_parallel_size=tensor_parallel_size, max_num_seqs=batch_size,
                                extra_args=extra_args)
            log.info("vLLM: starting its server for %s (log: %s) ...", folder.path, server.log_path)
            server.start()
            log.info("vLLM: server pid %d ready at %s", server.proc.pid, server.url)
            client = server.client(tokenizer)
        try:
            freed = keep_embedding_side(model)
            log.info("vLLM holds the decoder: medcap keeps the vision side and the embedding table (%.2f GB freed)",
                     freed / 1e9)
            return cls(model, tokenizer, client, server=server, batch_size=batch_size, **settings)
        except BaseException:
            if server is not None:
                server.stop()
            raise

    def close(self) -> None:
        """Stop the server this engine started (a connected one is left running)."""
        if self.server is not None:
            self.server.stop()
            log.info("vLLM: server stopped")

    def __enter__(self) -> "VllmEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def num_image_tokens(self) -> int:
        return int(self.model.num_image_tokens)

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    def prompt(self, question_or_messages, *, has_image: bool = True) -> List[int]:
        return build_prompt(
            self.tokenizer, question_or_messages, num_image_tokens=self.num_image_tokens, has_image=has_image
        )

    def generate_tokens(self, prompts: Sequence[Sequence[int]], images: Sequence[Optional[torch.Tensor]],
                        max_new_tokens: Union[int, Sequence[int]], keys: Sequence[str]) -> List[List[int]]:
        """Per row the new tokens, the stop id left out (``GenerationEngine``'s contract)."""
        out = generate_tokens(
            self.client, self.model, prompts, images, max_new_tokens, keys, stop_token_ids=self.stop_tokens,
            temperature=self.temperature, top_k=self.top_k, seed=self.seed, embed_batch=self.batch_size,
        )
        self.last_stats = {"rows": len(out), "new_tokens": sum(len(t) for t in out)}
        return out

    def generate_texts(self, prompts: Sequence[Sequence[int]], images: Sequence[Optional[torch.Tensor]],
                       max_new_tokens: Union[int, Sequence[int]], keys: Sequence[str]) -> List[str]:
        """Texts generated for ``prompts`` (each cut at its first special token, stripped)."""
        return [decode_text(self.tokenizer, t) for t in self.generate_tokens(prompts, images, max_new_tokens, keys)]

    def score_options(self, *args, **kwargs):
        raise BackendError("scoring options by log-likelihood (vqa_scoring=loglik) needs backend=native: "
                           "vLLM's server gives no likelihoods of given answers for embedded prompts")
