"""Prompts in, text out: the Llama 3 prompts, the continuous batcher that keeps every slot
busy, and ``GenerationEngine``, which the evaluation, ``medcap caption`` and the server call.

Prompts with the real Llama 3 special tokens, and their text form.

The reference built its generation prompts by decoding the chat template to
text and encoding that text again, so the model saw ``<|start_header_id|>``
spelled out as ordinary text. Here a prompt is the token list the training
data tokenizer makes (``medcap.data.tokenize_conversation``: the Llama 3 chat
template with real special tokens, the image marker expanded to
``num_image_tokens`` placeholder ids, the text around it kept as it stands),
ending with an open assistant header. Training and inference therefore see
the same layout, token for token.

A message is ``{"role": "system" | "user" | "assistant", "content": str}``; in
a user turn ``<image>``, ``<|image|>`` or a run of ``①`` marks the image.
Questions and generated text put into prompts go through :func:`clean_text`,
so that they can never be read as an image marker.

``prompt_text`` writes a prompt as text with the special tokens spelled out and
the image as ``①`` x ``num_image_tokens`` (what the reference's ``instruction``
column held); ``parse_prompt_text`` reads it back into messages, which rebuild
the same tokens, so the question and the prompt can be recovered from a
results file.

Continuous batching: ``batch_size`` slots kept busy; a finished row's slot is
refilled with the next waiting prompt (its image included) while the others
keep decoding.

Each slot owns one row of a fixed-shape KV cache ``[slots, kv_heads, cache_len,
head_dim]`` and writes a token's keys and values at the column equal to the
token's position, so no row is ever padded on the left and rows of different
lengths share one decode step. Attention is over the whole cache row with a mask
``column <= position``: columns beyond a row's position (a previous row's leftovers,
right padding of its prefill) are never seen, and are overwritten before they
could be.

The decode step always has the same shapes (``token [B, 1]``, ``pos [B, 1]``),
whichever slots are busy, which is what lets ``torch.compile`` capture it once
(CUDA graphs on a GPU). Prefill runs the newcomers alone, right padded, eagerly.

    batcher = ContinuousBatcher(model, tokenizer.stop_tokens, slots=16, cache_len=1024)
    req = batcher.submit(prompt, image, max_new_tokens=200, generator=None)
    batcher.run_until_done()      # or call batcher.step() from a serving loop
    req.tokens                    # the new tokens, stop token left out

``submit`` may be called from another thread while ``step`` runs (the waiting
queue is locked); ``step`` itself is for one thread.

A model, its tokenizer and the sampling settings, bundled for the evaluation
code: prompts in, stripped texts out, batched, one random stream per row.
"""

from __future__ import annotations

import collections
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torchtune.modules.attention import MultiHeadAttention

from medcap.data import IMAGE_MARKER, PLACEHOLDER_CHAR, Turn, tokenize_conversation
from medcap.generation._generate import (
    _check_fits,
    _model_dtype,
    decode_one_token,
    generate,
    generate_reference,
    is_greedy,
    make_generators,
    row_seed,
    sample,
    score_options,
)

# ---- Prompts ---------------------------------------------------------------------

# The image markers a user turn may carry (the data module's set).
_MARKER = re.compile(rf"{PLACEHOLDER_CHAR}(?:\s*{PLACEHOLDER_CHAR})*|<image>|<\|image\|>")

MessageLike = Mapping[str, Any]


def clean_text(text: Any) -> str:
    """Text that cannot be mistaken for an image marker: ``①`` -> ``(1)`` (the dataset
    converters' rule), ``<image>`` / ``<|image|>`` -> ``(image)``."""
    s = str(text).replace(PLACEHOLDER_CHAR, "(1)")
    return s.replace("<|image|>", "(image)").replace(IMAGE_MARKER, "(image)")


def question_messages(question: str | None, *, has_image: bool = True) -> List[Dict[str, str]]:
    """One user turn: the image (when ``has_image``), a blank line and the question,
    the layout of the reference's training data."""
    q = clean_text(question).strip() if question else ""
    if has_image:
        content = IMAGE_MARKER + ("\n\n" + q if q else "")
    elif q:
        content = q
    else:
        raise ValueError("a prompt needs an image or a question")
    return [{"role": "user", "content": content}]


def _turns(messages: Sequence[MessageLike]) -> Tuple[List[Turn], int]:
    turns: List[Turn] = []
    n_images = 0
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content", "")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"message {i}: role must be system, user or assistant, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string (mark the image with {IMAGE_MARKER!r})")
        if role == "user":
            found = len(_MARKER.findall(content))
            n_images += found
            content = _MARKER.sub(IMAGE_MARKER, content)
        turns.append(Turn(role, content))
    return turns, n_images


def build_prompt(
    tokenizer,
    question_or_messages: Union[str, None, Sequence[MessageLike]],
    *,
    num_image_tokens: int,
    has_image: bool = True,
) -> List[int]:
    """Token ids of a generation prompt, ending with an open assistant header.

    ``question_or_messages`` is a question (one user turn: the image when
    ``has_image``, a blank line, the question; ``None``: the image alone, a
    captioning prompt) or a list of messages; a trailing
    assistant message with empty content is the open turn. At most one image.
    """
    if question_or_messages is None or isinstance(question_or_messages, str):
        messages: List[MessageLike] = question_messages(question_or_messages, has_image=has_image)
    else:
        messages = list(question_or_messages)
    if messages and messages[-1].get("role") == "assistant" and not str(messages[-1].get("content", "")).strip():
        messages = messages[:-1]
    if not messages:
        raise ValueError("a prompt needs at least one message")
    if messages[-1].get("role") == "assistant":
        raise ValueError("the last message is an assistant turn with content: nothing is left to generate")
    turns, n_images = _turns(messages)
    if n_images > 1:
        raise ValueError(f"the messages hold {n_images} image markers; a prompt takes one image")
    if n_images and not has_image:
        raise ValueError("the messages hold an image marker but has_image=False")
    if has_image and not n_images:
        raise ValueError(f"has_image=True but no user turn holds an image marker ({IMAGE_MARKER!r})")
    turns.append(Turn("assistant", ""))
    return list(
        tokenize_conversation(tokenizer, turns, num_image_tokens=num_image_tokens, add_end_tokens=False).tokens
    )


def special_ids(tokenizer) -> set:
    """Every special token id of a Llama 3 tokenizer, the image placeholder included."""
    return set(tokenizer.special_tokens.values()) | {tokenizer.image_id}


def decode_text(tokenizer, tokens: Sequence[int]) -> str:
    """Generated tokens -> text: cut at the first special token, decoded, stripped."""
    specials = special_ids(tokenizer)
    cut = list(tokens)
    for i, t in enumerate(cut):
        if t in specials:
            cut = cut[:i]
            break
    return tokenizer.decode(cut, truncate_at_eos=False, skip_special_tokens=False).strip()


def prompt_text(tokenizer, tokens: Sequence[int]) -> str:
    """The prompt as text with the special tokens written out and each image
    placeholder token written as ``①`` (the reference's ``instruction`` column)."""
    image_id = tokenizer.image_id
    parts: List[str] = []
    run: List[int] = []
    for t in list(tokens) + [None]:
        if t == image_id or t is None:
            if run:
                parts.append(tokenizer.decode(run, truncate_at_eos=False, skip_special_tokens=False))
                run = []
            if t is not None:
                parts.append(PLACEHOLDER_CHAR)
        else:
            run.append(t)
    return "".join(parts)


_TURN = re.compile(
    r"<\|start_header_id\|>(?P<role>[a-z]+)<\|end_header_id\|>\n\n(?P<body>.*?)(?P<end><\|eot_id\|>|<\|eom_id\|>|\Z)",
    re.DOTALL,
)


def parse_prompt_text(text: str) -> List[Dict[str, str]]:
    """Read :func:`prompt_text` output back into messages; the open assistant turn at
    the end is left out. The run of ``①`` becomes the ``<image>`` marker."""
    s = str(text)
    if s.startswith("<|begin_of_text|>"):
        s = s[len("<|begin_of_text|>") :]
    messages: List[Dict[str, str]] = []
    pos = 0
    while pos < len(s):
        m = _TURN.match(s, pos)
        if m is None:
            raise ValueError(f"cannot read a chat turn at character {pos} of the prompt text: {s[pos:pos + 60]!r}")
        role, body, closed = m.group("role"), m.group("body"), bool(m.group("end"))
        if not closed and role == "assistant" and not body.strip():
            break  # the open assistant turn
        if role == "user":
            body = _MARKER.sub(IMAGE_MARKER, body)
        messages.append({"role": role, "content": body})
        pos = m.end()
        if not closed:
            break
    return messages


def message_text(message: MessageLike) -> str:
    """The text of a message with its image marker removed, stripped."""
    return _MARKER.sub("", str(message.get("content", ""))).strip()


def message_has_image(message: MessageLike) -> bool:
    return message.get("role") == "user" and bool(_MARKER.search(str(message.get("content", ""))))


def question_from_instruction(instruction: str) -> str:
    """The text of the last user turn of an ``instruction`` (how the scoring step and
    the judge recover the question)."""
    users = [m for m in parse_prompt_text(instruction) if m["role"] == "user"]
    if not users:
        raise ValueError(f"no user turn in the instruction: {str(instruction)[:80]!r}")
    return message_text(users[-1])


def prompt_tokens_from_text(tokenizer, text: str, *, num_image_tokens: int) -> Tuple[List[int], bool]:
    """Rebuild a prompt's tokens from its text form; returns ``(tokens, has_image)``."""
    messages = parse_prompt_text(text)
    has_image = any(message_has_image(m) for m in messages)
    return build_prompt(tokenizer, messages, num_image_tokens=num_image_tokens, has_image=has_image), has_image


# ---- Continuous batching ---------------------------------------------------------

class SlotKVCache(nn.Module):
    """A KV cache whose rows are independent slots, each written at its own column.

    ``update`` is called by torchtune's attention with the new keys and values.
    Decoding (``prefill_slots is None``): one token per slot, written at column
    ``write_pos[slot]``. Prefill: ``k_val [n, h, L, d]`` written at columns ``0..L-1``
    of the slots ``prefill_slots [n]``.
    """

    def __init__(self, slots: int, cache_len: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype):
        super().__init__()
        shape = (slots, num_kv_heads, cache_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("write_pos", torch.zeros(slots, dtype=torch.long), persistent=False)
        self.register_buffer("slot_ids", torch.arange(slots), persistent=False)
        self.prefill_slots: Optional[torch.Tensor] = None
        self.batch_size = slots

    def reset(self) -> None:  # torchtune's reset_caches calls it; slots are overwritten anyway
        pass

    def regroup(self, keep: torch.Tensor, slots: int) -> None:
        """Rows ``keep`` become rows ``0..len(keep)-1`` of a cache of ``slots`` rows."""
        for name in ("k_cache", "v_cache"):
            old = getattr(self, name)
            new = old.new_zeros((slots, *old.shape[1:]))
            new[: keep.numel()] = old.index_select(0, keep)
            setattr(self, name, new)
        self.write_pos = self.write_pos.new_zeros(slots)
        self.slot_ids = torch.arange(slots, device=self.slot_ids.device)
        self.batch_size = slots

    def update(self, k_val: torch.Tensor, v_val: torch.Tensor):
        if self.prefill_slots is None:
            # [B, h, 1, d] at one column per slot
            self.k_cache[self.slot_ids, :, self.write_pos] = k_val[:, :, 0]
            self.v_cache[self.slot_ids, :, self.write_pos] = v_val[:, :, 0]
            return self.k_cache, self.v_cache
        s, n = self.prefill_slots, k_val.shape[2]
        self.k_cache[s, :, :n] = k_val
        self.v_cache[s, :, :n] = v_val
        return self.k_cache[s], self.v_cache[s]  # [n, h, cache_len, d]


@dataclass
class Request:
    """One row's work and result; ``tokens`` grows as it decodes, ``done`` when it stops."""

    prompt: List[int]
    image: Optional[torch.Tensor]
    max_new_tokens: int
    generator: Optional[torch.Generator] = None
    tokens: List[int] = field(default_factory=list)
    done: bool = False


class ContinuousBatcher:
    """``slots`` rows decoded together; waiting requests fill slots as they free up.

    ``compile=True`` compiles the decode step with ``torch.compile`` (fixed shapes;
    ``mode="reduce-overhead"``, i.e. CUDA graphs, on a GPU); a string names another
    backend (tests use ``"aot_eager"``: the same graph capture, no code generation). ``stats`` counts the
    hardware-independent work: decode forward passes, slot-steps (slots x passes)
    and the slot-steps spent on idle slots, prefill passes and prefilled positions.
    """

    def __init__(
        self,
        model: nn.Module,
        stop_tokens: Sequence[int],
        *,
        slots: int,
        cache_len: int,
        temperature: float = 0.0,
        top_k: Optional[int] = None,
        compile: Union[bool, str] = False,
    ):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.model = model
        self.stop = set(int(t) for t in stop_tokens)
        self.slots = self.max_slots = int(slots)
        self.compiled = bool(compile)
        self.cache_len = min(int(cache_len), int(model.decoder.max_seq_len))
        self.temperature, self.top_k = temperature, top_k
        self.device = model.decoder.norm.scale.device
        attns = [m for m in model.decoder.modules() if isinstance(m, MultiHeadAttention)]
        dtype = _model_dtype(model)
        with torch.device(self.device):
            self.caches = [SlotKVCache(self.slots, self.cache_len, a.num_kv_heads, a.head_dim, dtype) for a in attns]
        self._attns = attns
        self._waiting: Deque[Request] = collections.deque()
        self._lock = threading.Lock()
        self._active: List[Optional[Request]] = [None] * self.slots
        self._pos = [0] * self.slots  # position of each slot's next token
        self._last = [0] * self.slots  # each slot's last sampled token (the next decode input)
        self._logits: Optional[torch.Tensor] = None  # [slots, V]: next-token logits per slot
        self._fresh: List[bool] = [False] * self.slots  # slot has logits not yet sampled
        self._decode = decode_step
        if compile:
            backend = compile if isinstance(compile, str) else "inductor"
            mode = "reduce-overhead" if self.device.type == "cuda" and backend == "inductor" else None
            # fullgraph: a graph break would silently fall back to slow eager pieces
            self._decode = torch.compile(decode_step, backend=backend, mode=mode, fullgraph=True, dynamic=False)
        self.stats: Dict[str, int] = dict(
            decode_passes=0, slot_steps=0, idle_slot_steps=0, prefill_passes=0, prefill_positions=0
        )

    # ------------------------------------------------------------------ work in
    def submit(
        self, prompt: Sequence[int], image: Optional[torch.Tensor], max_new_tokens: int,
        generator: Optional[torch.Generator] = None,
    ) -> Request:
        """Queue one prompt (``image [3, H, W]`` or ``None``); returns its :class:`Request`."""
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("empty prompt")
        _check_fits(self.model, len(prompt), int(max_new_tokens))
        if len(prompt) + int(max_new_tokens) > self.cache_len:
            raise ValueError(
                f"a prompt of {len(prompt)} tokens plus {max_new_tokens} new tokens exceeds this batcher's "
                f"cache_len of {self.cache_len}"
            )
        if not is_greedy(self.temperature, self.top_k) and generator is None:
            raise ValueError("sampling (temperature > 0) needs a generator per request")
        req = Request(prompt, image, int(max_new_tokens), generator)
        if req.max_new_tokens <= 0:
            req.done = True
            return req
        with self._lock:
            self._waiting.append(req)
        return req

    def busy(self) -> bool:
        return any(r is not None for r in self._active) or bool(self._waiting)

    # ------------------------------------------------------------------ the loop
    @torch.inference_mode()
    def run_until_done(self) -> None:
        while self.busy():
            self.step()

    @torch.inference_mode()
    def step(self) -> None:
        """Admit waiting requests into free slots, sample every slot with fresh
        logits, then one decode pass over all slots."""
        self._attach()
        try:
            self._admit()
            self._sample()
            if not self.compiled:
                self._shrink_tail()
            if any(r is not None for r in self._active):
                self._decode_all()
        finally:
            self._detach()

    def _attach(self) -> None:
        for a, c in zip(self._attns, self.caches):
            a.kv_cache, a.cache_enabled = c, True

    def _detach(self) -> None:
        # The model stays usable by the static path and option scoring between steps.
        for a in self._attns:
            a.kv_cache, a.cache_enabled = None, False

    def _regroup(self, keep: List[int], slots: int) -> None:
        """Slots ``keep`` become slots ``0..len(keep)-1`` of ``slots`` (cache rows included)."""
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        for c in self.caches:
            c.regroup(idx, slots)
        pad = slots - len(keep)
        self._active = [self._active[s] for s in keep] + [None] * pad
        self._pos = [self._pos[s] for s in keep] + [0] * pad
        self._last = [self._last[s] for s in keep] + [0] * pad
        self._fresh = [self._fresh[s] for s in keep] + [False] * pad
        if self._logits is not None:
            logits = self._logits.new_zeros((slots, self._logits.shape[-1]))
            logits[: len(keep)] = self._logits.index_select(0, idx)
            self._logits = logits
        self.slots = slots

    def _shrink_tail(self) -> None:
        """Nothing waits and a quarter of the slots are idle: drop the idle ones, as
        the static path does with finished rows (a CPU step costs in proportion to its
        rows). Eager only: a compiled step keeps its shapes; new work grows it back."""
        busy = [s for s, r in enumerate(self._active) if r is not None]
        if busy and not self._waiting and self.slots - len(busy) >= max(1, self.slots // 4):
            self._regroup(busy, len(busy))

    def _admit(self) -> None:
        if self.slots < self.max_slots and self._waiting:
            self._regroup(list(range(self.slots)), self.max_slots)
        free = [i for i, r in enumerate(self._active) if r is None]
        new: List[Request] = []
        with self._lock:
            while free[len(new):] and self._waiting:
                new.append(self._waiting.popleft())
        if not new:
            return
        slots = free[: len(new)]
        logits = prefill_slots(self.model, self.caches, [r.prompt for r in new], [r.image for r in new], slots,
                               self.cache_len)  # [n, V]
        self.stats["prefill_passes"] += 1
        self.stats["prefill_positions"] += len(new) * max(len(r.prompt) for r in new)
        if self._logits is None:
            self._logits = torch.zeros(self.slots, logits.shape[-1], dtype=logits.dtype, device=self.device)
        self._logits[torch.tensor(slots, device=self.device)] = logits
        for s, r in zip(slots, new):
            self._active[s], self._pos[s], self._fresh[s] = r, len(r.prompt), True

    def _sample(self) -> None:
        rows = [s for s in range(self.slots) if self._fresh[s]]
        if not rows:
            return
        gens = None
        if not is_greedy(self.temperature, self.top_k):
            gens = [self._active[s].generator for s in rows]
        idx = torch.tensor(rows, device=self.device)
        nxt = sample(self._logits[idx], temperature=self.temperature, top_k=self.top_k, generators=gens).tolist()
        for s, t in zip(rows, nxt):
            r = self._active[s]
            self._fresh[s] = False
            if t in self.stop:
                self._finish(s)
                continue
            r.tokens.append(int(t))
            self._last[s] = int(t)
            if len(r.tokens) >= r.max_new_tokens:
                self._finish(s)

    def _finish(self, s: int) -> None:
        self._active[s].done = True
        self._active[s], self._pos[s], self._last[s] = None, 0, 0

    def _decode_all(self) -> None:
        busy = [r is not None for r in self._active]
        token = torch.tensor(self._last, device=self.device).view(-1, 1)  # [B, 1]
        pos = torch.tensor(self._pos, device=self.device).view(-1, 1)  # [B, 1]
        self._logits = self._decode(self.model, self.caches, token, pos).clone()  # [B, V]
        for s in range(self.slots):
            if busy[s]:
                self._pos[s] += 1
                self._fresh[s] = True
        self.stats["decode_passes"] += 1
        self.stats["slot_steps"] += self.slots
        self.stats["idle_slot_steps"] += self.slots - sum(busy)


def prefill_slots(
    model: nn.Module,
    caches: Sequence[SlotKVCache],
    prompts: Sequence[Sequence[int]],
    images: Sequence[Optional[torch.Tensor]],
    slots: Sequence[int],
    cache_len: int,
) -> torch.Tensor:
    """Run new prompts (right padded, positions from 0) into cache rows ``slots``;
    returns the logits after each prompt's last token ``[n, V]``."""
    device = model.decoder.norm.scale.device
    n, longest = len(prompts), max(len(p) for p in prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)  # [n]
    tokens = torch.zeros(n, longest, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    tokens = tokens.to(device)  # [n, L]
    imgs = [im for im in images if im is not None]
    batch_images = torch.stack(imgs).to(device=device, dtype=_model_dtype(model)) if imgs else None  # [n_img, 3, H, W]
    col = torch.arange(cache_len, device=device)
    q = torch.arange(longest, device=device)
    # query t of row i sees columns <= t that hold its own prompt
    mask = (col[None, None, :] <= q[None, :, None]) & (col[None, None, :] < lengths[:, None, None])  # [n, L, C]
    input_pos = q.expand(n, longest)  # [n, L]
    slot_ids = torch.tensor(list(slots), device=device)
    for c in caches:
        c.prefill_slots = slot_ids
    try:
        h = model.hidden_states(tokens, images=batch_images, mask=mask, input_pos=input_pos)  # [n, L, d]
    finally:
        for c in caches:
            c.prefill_slots = None
    return model.logits(h[torch.arange(n, device=device), lengths - 1])  # [n, V]


def decode_step(model: nn.Module, caches: Sequence[SlotKVCache], token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """One token for every slot: ``token [B, 1]`` at positions ``pos [B, 1]`` -> logits
    ``[B, V]``. Fixed shapes whichever slots are busy (idle ones decode a dummy)."""
    for c in caches:
        c.write_pos.copy_(pos.view(-1))
    cache_len = caches[0].k_cache.shape[2]
    col = torch.arange(cache_len, device=pos.device)
    mask = col[None, None, :] <= pos[:, :, None]  # [B, 1, C]
    return decode_one_token(model, token, pos, mask)


# ---- GenerationEngine ------------------------------------------------------------

class GenerationEngine:
    """Batched text generation over a :class:`~medcap.models.MedcapModel`.

    Each row carries a ``key`` (e.g. its question id); with sampling, row ``key``
    draws from a generator seeded by ``row_seed(seed, key)``, so its text does not
    depend on the batch it happens to share. ``use_cache=False`` takes the
    reference's slow path (batch 1, no KV cache).

    With the cache, rows are continuously batched (``batch_size`` slots kept busy, a
    finished row's slot refilled at once; see ``ContinuousBatcher``); ``continuous=False``
    takes the static path (a batch runs until its longest row is done), kept for
    comparison. ``compile=True`` compiles the continuous decode step. ``open`` gives
    a batcher that accepts requests at any time (for a server).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        batch_size: int = 8,
        temperature: float = 0.0,
        top_k: Optional[int] = None,
        seed: int = 0,
        use_cache: bool = True,
        continuous: bool = True,
        compile: Union[bool, str] = False,
        chunk_size: Optional[int] = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.temperature = float(temperature or 0.0)
        self.top_k = None if top_k is None else int(top_k)
        self.seed = int(seed or 0)
        self.use_cache = bool(use_cache)
        self.continuous = bool(continuous)
        self.compile = compile  # True, or a torch.compile backend name
        # Rows the evaluation loop hands to one call (default: one batch). Continuous
        # batching refills a slot only from the rows of the same call: give it several
        # batches (e.g. 8 x batch_size) to keep the slots busy.
        self.chunk_size = int(chunk_size or batch_size)
        self._batcher: Optional[ContinuousBatcher] = None
        # what the last generate_tokens call cost (decode passes, slot-steps, ...)
        self.last_stats: Dict[str, int] = {}

    @property
    def num_image_tokens(self) -> int:
        return int(self.model.num_image_tokens)

    @property
    def device(self) -> torch.device:
        return self.model.decoder.norm.scale.device

    def prompt(self, question_or_messages, *, has_image: bool = True) -> List[int]:
        return build_prompt(
            self.tokenizer, question_or_messages, num_image_tokens=self.num_image_tokens, has_image=has_image
        )

    def generate_tokens(
        self,
        prompts: Sequence[Sequence[int]],
        images: Sequence[Optional[torch.Tensor]],
        max_new_tokens: Union[int, Sequence[int]],
        keys: Sequence[str],
    ) -> List[List[int]]:
        n = len(prompts)
        if len(images) != n or len(keys) != n:
            raise ValueError("prompts, images and keys must have the same length")
        budgets = [int(max_new_tokens)] * n if isinstance(max_new_tokens, int) else [int(x) for x in max_new_tokens]
        greedy = is_greedy(self.temperature, self.top_k)
        seeds = [row_seed(self.seed, k) for k in keys]
        out: List[List[int]] = []
        if not self.use_cache:
            for p, img, m, s in zip(prompts, images, budgets, seeds):
                gen = None if greedy else make_generators([s], self.device)[0]
                out.append(
                    generate_reference(
                        self.model, self.tokenizer, p, img, max_new_tokens=m,
                        temperature=self.temperature, top_k=self.top_k, generator=gen,
                    )
                )
            return out
        if n == 0:
            return []
        if self.continuous:
            return self._generate_continuous(prompts, images, budgets, seeds, greedy)
        self.last_stats = stats = {}
        for lo in range(0, n, self.batch_size):
            hi = min(n, lo + self.batch_size)
            imgs = [im for im in images[lo:hi] if im is not None]
            batch_images = torch.stack(imgs) if imgs else None  # [n_img, 3, H, W]
            gens = None if greedy else make_generators(seeds[lo:hi], self.device)
            out.extend(
                generate(
                    self.model, self.tokenizer, prompts[lo:hi], batch_images,
                    max_new_tokens=budgets[lo:hi], temperature=self.temperature, top_k=self.top_k,
                    generators=gens, stats=stats,
                )
            )
        return out

    def open(self, cache_len: int, slots: Optional[int] = None) -> ContinuousBatcher:
        """A batcher with ``slots`` (default ``batch_size``) slots of ``cache_len``
        positions (prompt + new tokens): ``submit`` requests at any time, drive it with
        ``step``/``run_until_done``. Reused while it fits (a compiled step is kept)."""
        slots = self.batch_size if slots is None else slots
        b = self._batcher
        keep = b is not None and b.slots == slots and (
            b.cache_len >= cache_len if self.compile else b.cache_len == cache_len)
        if not keep:
            b = self._batcher = ContinuousBatcher(
                self.model, self.tokenizer.stop_tokens, slots=slots, cache_len=cache_len,
                temperature=self.temperature, top_k=self.top_k, compile=self.compile,
            )
        return b

    def submit(self, batcher: ContinuousBatcher, prompt: Sequence[int], image: Optional[torch.Tensor],
               max_new_tokens: int, key: str) -> Request:
        """Queue one row on ``batcher`` with its own random stream (seeded by ``key``)."""
        gen = None
        if not is_greedy(self.temperature, self.top_k):
            gen = make_generators([row_seed(self.seed, key)], self.device)[0]
        return batcher.submit(prompt, image, max_new_tokens, gen)

    def _generate_continuous(self, prompts, images, budgets, seeds, greedy) -> List[List[int]]:
        need = max(len(p) + m for p, m in zip(prompts, budgets)) if prompts else 1
        # A compiled step is specialised to the cache length: round it up so calls share it.
        if self.compile:  # one shape for every call
            batcher = self.open(-(-need // 256) * 256)
        else:  # a small call need not decode idle slots
            batcher = self.open(need, min(self.batch_size, len(prompts)))
        before = dict(batcher.stats)
        gens = [None] * len(prompts) if greedy else make_generators(seeds, self.device)
        reqs = [batcher.submit(p, im, m, g) for p, im, m, g in zip(prompts, images, budgets, gens)]
        batcher.run_until_done()
        self.last_stats = {k: v - before.get(k, 0) for k, v in batcher.stats.items()}
        return [r.tokens for r in reqs]

    def generate_texts(
        self,
        prompts: Sequence[Sequence[int]],
        images: Sequence[Optional[torch.Tensor]],
        max_new_tokens: Union[int, Sequence[int]],
        keys: Sequence[str],
    ) -> List[str]:
        """Texts generated for ``prompts`` (each cut at its first special token, stripped)."""
        return [decode_text(self.tokenizer, t) for t in self.generate_tokens(prompts, images, max_new_tokens, keys)]

    def score_options(
        self,
        prompts: Sequence[Sequence[int]],
        images: Sequence[Optional[torch.Tensor]],
        options: Sequence[Sequence[str]],
        *,
        reduction: str = "sum",
    ) -> List[List[float]]:
        """Log-likelihood of each option after its prompt, ``batch_size`` prompts per forward."""
        out: List[List[float]] = []
        for lo in range(0, len(prompts), self.batch_size):
            hi = min(len(prompts), lo + self.batch_size)
            imgs = [im for im in images[lo:hi] if im is not None]
            out.extend(
                score_options(
                    self.model, self.tokenizer, prompts[lo:hi], torch.stack(imgs) if imgs else None,
                    options[lo:hi], reduction=reduction,
                )
            )
        return out
