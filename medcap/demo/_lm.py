"""Text-only pretraining of the demo's tiny Llama-3.1-architecture LM.

The demo's LM must learn from text alone what an instruction-tuned LLM already knows
(it never sees an image), in the Llama 3 chat template the recipes use:

1. **describe** - a user turn holds a terse note of a finding ("CT small bright
   nodule upper left"); the assistant answers with the full caption. Later the
   trained vision side puts soft image tokens where the note stood.
2. **answer** - after a description, a question about one attribute is
   answered with that attribute's words, read from the description (the
   reference's ``no_cond_desc`` second step: [image, description, question] ->
   answer). The first turn holds an unrelated note here, so the LM learns to
   trust the description, which at test time is its own caption of the image.
3. **choose** - the reference's scoring chat: "Question / Our answer / A. B. C. D.
   / respond with only the letter" -> the letter of the option our answer names.

The findings are drawn from every combination, those the world holds out from vision
training included: the LM knows every caption as text, so what the demo's unseen test
half measures is the vision side's part. Saved in Hugging Face format, so the demo's
configs load it as they load Llama-3.1-8B.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from medcap._io import progress as progress_bar

from medcap.demo._world import (
    MODALITY_KEYS,
    QUESTION_TYPES,
    Finding,
    caption,
    options_for,
    sample_finding,
)

TASKS = ("describe", "answer", "choose")


@dataclass
class LMSizes:
    """Decoder sizes; the same numbers go into the demo configs' ``model`` section."""

    vocab_size: int
    num_layers: int = 3
    num_heads: int = 4
    num_kv_heads: int = 2
    embed_dim: int = 128
    intermediate_dim: int = 256
    max_seq_len: int = 256

    def model_kwargs(self) -> Dict[str, int]:
        return asdict(self)


# ---- corpus


def note(f: Finding) -> str:
    """What the image tokens stand in for during pretraining: the finding's words."""
    return f"{f.modality_info.name} {f.size} {f.intensity} {f.kind} {f.location}"


def conversation(task: str, f: Finding, rng: np.random.Generator, shuffle_options: bool = False) -> List[Dict[str, str]]:
    """One pretraining conversation (role/content dicts) of ``task`` about finding ``f``
    (``shuffle_options``: as the world's questions, see ``options_for``)."""
    from medcap.eval import letter_prompt

    if task == "describe":
        return [{"role": "user", "content": note(f)}, {"role": "assistant", "content": caption(f)}]
    _, attribute, question = QUESTION_TYPES[rng.integers(len(QUESTION_TYPES))]
    if task == "answer":
        # The note is of another, random finding and the description is not learnt
        # here: the answer must come from the description. At test time the
        # description is the model's own caption of the image, and the image tokens
        # were trained for captioning only, so reading the answer from the caption
        # is what carries over.
        other = sample_finding(rng, MODALITY_KEYS)
        return [
            {"role": "user", "content": note(other)},
            {"role": "assistant", "content": caption(f), "learn": False},
            {"role": "user", "content": question},
            {"role": "assistant", "content": f.answer(attribute)},
        ]
    if task == "choose":
        opts = options_for(attribute, f, rng, shuffle=shuffle_options)
        # "our answer" is any one of the options, so the LM learns to name the option
        # the answer says, not to guess the right one
        pick = int(rng.integers(len(opts)))
        letters = "ABCD"[: len(opts)]
        prompt = letter_prompt(question, opts[pick], dict(zip(letters, opts)))
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": letters[pick]}]
    raise ValueError(f"unknown task {task!r}; tasks are {TASKS}")


def corpus_texts(modalities: Sequence[str], n: int = 600, seed: int = 0) -> List[str]:
    """Plain text of every kind of turn the demo will tokenize (for BPE training)."""
    from medcap.eval import LETTER_INSTRUCTION

    rng = np.random.default_rng([seed, 11])
    out: List[str] = [LETTER_INSTRUCTION, "Describe the image.", "Describe the image to answer the question:"]
    for i in range(n):
        f = sample_finding(rng, modalities)
        for m in conversation(TASKS[i % len(TASKS)], f, rng):
            out.append(m["content"])
    return out


def sample_tasks(
    n: int,
    modalities: Sequence[str],
    rng: np.random.Generator,
    weights: Sequence[float] = (0.3, 0.3, 0.4),
    shuffle_options: bool = False,
) -> List[List[Dict[str, str]]]:
    p = np.asarray(weights, float) / np.sum(weights)
    tasks = rng.choice(len(TASKS), size=n, p=p)
    return [conversation(TASKS[t], sample_finding(rng, modalities), rng, shuffle_options) for t in tasks]


def tokenize_for_lm(tokenizer, conversations: Sequence[List[Dict[str, str]]]):
    """Tokens and unshifted labels (assistant tokens only), with medcap's own chat
    tokenization, so pretraining sees exactly the template the recipes build."""
    from medcap.data import Turn, make_labels, tokenize_conversation

    out = []
    for conv in conversations:
        t = tokenize_conversation(tokenizer, [Turn(m["role"], m["content"]) for m in conv], num_image_tokens=1)
        labels = make_labels(t, num_image_tokens=1)
        # assistant turns marked learn=False are context only: mask their run of
        # unmasked positions (header, body, end), the k-th run being the k-th turn
        skip = [not m.get("learn", True) for m in conv if m["role"] == "assistant"]
        run, i = -1, 0
        while i < len(labels):
            if not t.mask[i]:
                run += 1
                j = i
                while j < len(labels) and not t.mask[j]:
                    j += 1
                if run < len(skip) and skip[run]:
                    labels[i:j] = [-100] * (j - i)
                i = j
            else:
                i += 1
        out.append((t.tokens, labels))
    return out


def _batch(pairs, pad_id: int):
    n = max(len(t) for t, _ in pairs)
    tokens = torch.full((len(pairs), n), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), n), -100, dtype=torch.long)
    for i, (t, l) in enumerate(pairs):
        tokens[i, : len(t)] = torch.tensor(t)
        labels[i, : len(l)] = torch.tensor(l)
    return tokens, labels


# ---- model, training


def build_decoder(sizes: LMSizes):
    """torchtune's ``llama3_1`` decoder at the demo's sizes (the one ``medcap_tiny`` builds)."""
    from torchtune.models.llama3_1 import llama3_1

    return llama3_1(
        vocab_size=sizes.vocab_size,
        num_layers=sizes.num_layers,
        num_heads=sizes.num_heads,
        num_kv_heads=sizes.num_kv_heads,
        embed_dim=sizes.embed_dim,
        max_seq_len=sizes.max_seq_len,
        intermediate_dim=sizes.intermediate_dim,
    )


def lm_loss(decoder, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = decoder(tokens)  # [b, s, V]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def pretrain(
    tokenizer,
    sizes: LMSizes,
    modalities: Sequence[str],
    *,
    steps: int = 400,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    shuffle_options: bool = False,
    weights: Sequence[float] = (0.3, 0.3, 0.4),
    progress: bool = True,
    log: Optional[Callable[[int, float], None]] = None,
):
    """Train a fresh decoder on freshly drawn text conversations; returns ``(decoder, losses)``."""
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 13])
    decoder = build_decoder(sizes)
    opt = torch.optim.AdamW(decoder.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:  # linear warm-up, cosine decay to 5%
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    losses: List[float] = []
    bar = progress_bar(steps, "LM pretraining (text only)", "step", enabled=progress)
    for step in range(steps):
        pairs = tokenize_for_lm(tokenizer, sample_tasks(batch_size, modalities, rng, weights, shuffle_options))
        tokens, labels = _batch(pairs, tokenizer.pad_id)
        loss = lm_loss(decoder, tokens, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        bar.update(1, loss=f"{losses[-1]:.3f}")
        if log is not None:
            log(step, losses[-1])
    bar.close()
    decoder.eval()
    return decoder, losses


# ---- HF format


def hf_config(sizes: LMSizes):
    """The ``LlamaConfig`` that equals torchtune's ``llama3_1`` at these sizes."""
    from medcap.models import hf_llama3_1_config

    return hf_llama3_1_config(sizes.vocab_size, **{k: v for k, v in asdict(sizes).items() if k != "vocab_size"})


def save_hf(decoder, sizes: LMSizes, out_dir: str | Path) -> Path:
    """Write ``config.json`` + ``model.safetensors`` in Hugging Face Llama layout."""
    from safetensors.torch import save_file
    from torchtune.models.convert_weights import tune_to_hf

    from medcap._io import atomic_write

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = tune_to_hf(
        {k: v.detach().contiguous() for k, v in decoder.state_dict().items()},
        num_heads=sizes.num_heads,
        num_kv_heads=sizes.num_kv_heads,
        dim=sizes.embed_dim,
    )
    state = {k: v.contiguous() for k, v in state.items()}
    atomic_write(out / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    hf_config(sizes).to_json_file(str(out / "config.json"))
    return out


@torch.no_grad()
def greedy_reply(decoder, tokenizer, messages: Sequence[Dict[str, str]], max_new_tokens: int = 24) -> str:
    """Greedy text-only reply (no cache: for quick checks of the pretrained LM)."""
    from medcap.data import Turn, tokenize_conversation

    turns = [Turn(m["role"], m["content"]) for m in messages] + [Turn("assistant", "")]
    toks = tokenize_conversation(tokenizer, turns, num_image_tokens=1, add_end_tokens=False).tokens
    out: List[int] = []
    stop = set(tokenizer.stop_tokens)
    for _ in range(max_new_tokens):
        nxt = int(decoder(torch.tensor([toks + out]))[0, -1].argmax())
        if nxt in stop:
            break
        out.append(nxt)
    return tokenizer.decode(out).strip()


def evaluate_text(
    decoder, tokenizer, modalities: Sequence[str], n: int = 60, seed: int = 99, shuffle_options: bool = False
) -> Dict[str, float]:
    """Exact-match rate of each task on fresh text conversations (the LM alone)."""
    rng = np.random.default_rng([seed, 17])
    out = {}
    for task in TASKS:
        hits = 0
        for _ in range(n):
            conv = conversation(task, sample_finding(rng, modalities), rng, shuffle_options)
            hits += int(greedy_reply(decoder, tokenizer, conv[:-1]) == conv[-1]["content"])
        out[task] = hits / n
    return out


def sizes_for(settings, vocab_size: int) -> LMSizes:
    """The LM sizes a ``DemoSettings`` asks for (intermediate = 2 x width)."""
    return LMSizes(
        vocab_size=vocab_size,
        num_layers=settings.lm_layers,
        embed_dim=settings.lm_dim,
        intermediate_dim=2 * settings.lm_dim,
    )


def pretrain_and_save(llm_dir: str | Path, settings, *, progress: bool = True) -> Dict[str, object]:
    """Pretrain the demo LM on text (tokenizer from ``llm_dir/original``), check it on
    fresh text conversations, and save it in HF format into ``llm_dir``; the log
    (losses, checks, sizes) goes to ``llm_dir/pretrain.json``."""
    from medcap.demo._world import MODALITY_KEYS
    from medcap.models import llama3_tokenizer

    llm = Path(llm_dir)
    tok = llama3_tokenizer(str(llm / "original" / "tokenizer.model"), str(llm / "original" / "special_tokens.json"))
    sizes = sizes_for(settings, vocab_size=tok.image_id)  # the image id sits one past the vocabulary
    t0 = time.perf_counter()
    decoder, losses = pretrain(
        tok, sizes, MODALITY_KEYS, steps=settings.lm_steps, batch_size=settings.lm_batch_size,
        lr=settings.lm_lr, seed=settings.seed, shuffle_options=bool(settings.shuffle_options), progress=progress,
    )
    train_seconds = time.perf_counter() - t0
    save_hf(decoder, sizes, llm)
    checks = evaluate_text(decoder, tok, MODALITY_KEYS, n=20 if settings.lm_steps >= 100 else 2,
                           shuffle_options=bool(settings.shuffle_options))
    log = {"sizes": asdict(sizes), "steps": settings.lm_steps, "batch_size": settings.lm_batch_size,
           "train_seconds": train_seconds, "losses": losses, "text_exact_match": checks}
    (llm / "pretrain.json").write_text(json.dumps(log, indent=1))
    print(f"LM text checks (exact match on fresh text conversations): {checks}", flush=True)
    return log
