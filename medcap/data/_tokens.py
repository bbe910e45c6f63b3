"""Turns -> tokens, labels and image placeholders under the Llama 3 chat template, with a
truncation that never cuts into the image.

In order: ``CROSS_ENTROPY_IGNORE_IDX``, ``Tokenized``; ``tokenize_conversation`` (each
turn through the tokenizer's public ``tokenize_message`` / ``encode``, the image marker
expanded into ``num_image_tokens`` copies of ``tokenizer.image_id``);
``truncate_tokenized``; ``make_labels``. The layout::

    <|begin_of_text|>
    <|start_header_id|>user<|end_header_id|>\\n\\n  [text before] [image_id x N] [text after]  <|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n  answer  <|eot_id|>
    ...
    <|end_of_text|>
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from medcap.data._bad_samples import BadSample
from medcap.data._records import IMAGE_MARKER, Turn

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
    """Tokens of one turn and, when it holds the image, the offset of its placeholders.

    The text is stripped as torchtune does; the text around the image marker is encoded
    as it stands, so the reference's "placeholders, blank line, instruction" keeps its
    blank line. A turn without image is tokenized by torchtune unchanged.
    """
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

    Masks follow torchtune: ``<|begin_of_text|>`` and ``<|end_of_text|>`` masked; a
    turn's header, body and end share the turn's mask (user/system masked unless
    ``train_on_input``; assistant unmasked). ``add_end_tokens=False`` leaves the last turn open (no ``<|eot_id|>``, no
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
    """Unshifted labels (the recipe shifts): token where unmasked, ``ignore_idx`` where
    masked, at every image placeholder, and at the position right after each placeholder
    (the reference's rule: nothing is learnt from predicting out of image positions)."""
    labels = [ignore_idx if m else tok for tok, m in zip(t.tokens, t.mask)]
    n = len(labels)
    for s in t.image_starts:
        # placeholders s .. s+N-1 and each one's next position: s .. s+N
        for p in range(s, min(s + num_image_tokens + 1, n)):
            labels[p] = ignore_idx
    return labels
