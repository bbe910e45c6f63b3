"""Prompts with the real Llama 3 special tokens, and their text form.

In order:

* ``clean_text``, ``question_messages``, ``build_prompt``: a question or messages -> the
  token list the training data tokenizer makes (``medcap.data.tokenize_conversation``),
  ending with an open assistant header: training and inference see the same tokens;
* ``decode_text``: generated tokens -> text, cut at the first special token;
* ``prompt_text`` and ``parse_prompt_text``: a prompt as text (special tokens spelled
  out, the image as a run of ``①``: the reference's ``instruction`` column) and back into
  messages that rebuild the same tokens; ``question_from_instruction`` and
  ``prompt_tokens_from_text`` recover the question and the prompt from a results file.

A message is ``{"role": ..., "content": str}``; in a user turn ``<image>``, ``<|image|>``
or a run of ``①`` marks the image. Why not the reference's decode-then-encode prompts:
``docs/internals.md``.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Sequence, Tuple, Union

from medcap.data import IMAGE_MARKER, PLACEHOLDER_CHAR, Turn, tokenize_conversation

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
