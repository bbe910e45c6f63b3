"""The reference's two-step VQA protocol (``vqa_type``), run through the one loop.

Step 1 (description) and step 2 (answer), per ``vqa_type``:

=======================  ====================================================  =================
vqa_type                 step 1: description (always from the image)           step 2's 1st turn
=======================  ====================================================  =================
no_cond_desc             [user: image] -> generated once per image, cached     the image
no_cond_desc_no_image    the same description                                  "Describe the
                                                                                image." (no image)
cond_desc                [user: image, assistant: "...", user: "Describe the   the image
                         image to answer the question: {q}"] -> per question
cond_desc_no_image       the same description                                  "Describe the
                                                                                image." (no image)
omit                     "..." (nothing generated)                             the image
=======================  ====================================================  =================

Step 2: [first turn, assistant: description, user: question, assistant: open],
at most ``min(50, max_new_tokens)`` new tokens. The ``*_no_image`` types hide
the image from step 2 only, which must then answer from the description alone.

The description's budget is the reference's rule, counted as the reference
counted it: ``min(max_seq_len - (n_skeleton + n_question + 5), max_new_tokens)``
where ``n_skeleton`` counts the description prompt with one more empty exchange
appended, in the reference's text form (the chat template with special tokens
spelled out, image as 50 ``①``, no ``<|begin_of_text|>``, the last ``<|eot_id|>``
dropped) encoded as plain text with BOS and EOS, and ``n_question`` the
question encoded with BOS and EOS. For ``cond_desc`` the skeleton holds the
conditional prompt. The same rule serves every type (its ``_no_image`` twin
included: step 1 is the same).

Descriptions go to a cache file beside the results, fingerprinted with what
produced them; a restarted run with the same settings regenerates nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from medcap.data import IMAGE_MARKER, PLACEHOLDER_CHAR
from medcap.eval._journal import JsonlCache
from medcap.eval._loop import ONE_PROCESS, EvalItem, Ranks, clear_outputs, run_items
from medcap.generation import clean_text, prompt_text

log = logging.getLogger(__name__)

VQA_TYPES = ("no_cond_desc", "no_cond_desc_no_image", "cond_desc", "cond_desc_no_image", "omit")
DESCRIBE_TURN = "Describe the image."
COND_DESCRIBE = "Describe the image to answer the question: {question}"
OMIT_DESCRIPTION = "..."
ANSWER_MAX_NEW_TOKENS = 50
RAW_COLUMNS = ("image", "instruction", "output", "generated")
BUDGET_SPARE = 5
_BOT = "<|begin_of_text|>"

ImageLoader = Callable[[str], torch.Tensor]


def check_vqa_type(vqa_type: str) -> str:
    if vqa_type not in VQA_TYPES:
        raise ValueError(f"vqa_type={vqa_type!r} is not one of {list(VQA_TYPES)}")
    return vqa_type


def uses_image(vqa_type: str) -> bool:
    """Whether step 2 (the answer) sees the image; step 1 always does."""
    return not check_vqa_type(vqa_type).endswith("_no_image")


def first_turn(vqa_type: str) -> Dict[str, str]:
    """Step 2's first user turn."""
    return {"role": "user", "content": IMAGE_MARKER if uses_image(vqa_type) else DESCRIBE_TURN}


def description_messages(vqa_type: str, question: str) -> Optional[List[Dict[str, str]]]:
    """Step 1's conversation (ending before the open assistant turn); None for ``omit``.
    It always starts with the image, whatever step 2 sees."""
    check_vqa_type(vqa_type)
    if vqa_type == "omit":
        return None
    image_turn = {"role": "user", "content": IMAGE_MARKER}
    if vqa_type.startswith("no_cond_desc"):
        return [image_turn]
    return [
        image_turn,
        {"role": "assistant", "content": OMIT_DESCRIPTION},
        {"role": "user", "content": COND_DESCRIBE.format(question=clean_text(question))},
    ]


def answer_messages(vqa_type: str, description: str, question: str) -> List[Dict[str, str]]:
    """Step 2's conversation: first turn, the description, the question."""
    return [
        first_turn(vqa_type),
        {"role": "assistant", "content": clean_text(description)},
        {"role": "user", "content": clean_text(question)},
    ]


def reference_text(messages: Sequence[Dict[str, str]], num_image_tokens: int) -> str:
    """``messages`` (plus the open assistant turn) as the reference wrote prompts in
    text: header tokens spelled out, each turn's stripped text, ``<|eot_id|>`` after
    each, the image as ``①`` x ``num_image_tokens``; no ``<|begin_of_text|>``."""
    parts = []
    for m in list(messages) + [{"role": "assistant", "content": ""}]:
        content = str(m["content"]).replace(IMAGE_MARKER, PLACEHOLDER_CHAR * num_image_tokens).strip()
        parts.append(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{content}<|eot_id|>")
    return "".join(parts)[: -len("<|eot_id|>")]


def description_budget(engine, vqa_type: str, question: str, *, max_seq_len: int, max_new_tokens: int) -> int:
    """New tokens allowed for the description (the reference's rule; module docstring)."""
    msgs = description_messages(vqa_type, question)
    if msgs is None:
        return 0
    skeleton = msgs + [{"role": "assistant", "content": ""}, {"role": "user", "content": ""}]
    tok = engine.tokenizer
    n_skeleton = len(tok.encode(reference_text(skeleton, engine.num_image_tokens), add_bos=True, add_eos=True))
    n_question = len(tok.encode(str(question), add_bos=True, add_eos=True))
    return max(0, min(int(max_seq_len) - (n_skeleton + n_question + BUDGET_SPARE), int(max_new_tokens)))


def instruction_text(tokenizer, tokens: Sequence[int]) -> str:
    """The ``instruction`` column: the prompt with special tokens written out, as the
    reference's (which has no leading ``<|begin_of_text|>``)."""
    text = prompt_text(tokenizer, tokens)
    return text[len(_BOT) :] if text.startswith(_BOT) else text


def description_cache(raw_path: Path, fingerprint: Dict[str, Any], ranks: Ranks = ONE_PROCESS) -> JsonlCache:
    """One cache file per rank (ranks describe disjoint images): no two writers share a file."""
    suffix = ".descriptions.jsonl" if ranks.rank == 0 else f".descriptions.rank{ranks.rank}.jsonl"
    return JsonlCache(raw_path.with_name(raw_path.stem + suffix), fingerprint=fingerprint)


def vqa_rows(
    vqa_type: str,
    descriptions: Callable[[], JsonlCache],
    *,
    max_seq_len: int,
    max_new_tokens: int,
    extra_columns: Sequence[str] = (),
):
    """The VQA suites' step for the loop: describe, then answer, one row per item.
    ``descriptions()`` opens the description cache, at the first batch: a run the loop
    refuses (another model's file) never touches the cache."""
    check_vqa_type(vqa_type)
    cache: List[JsonlCache] = []
    answer_sees_image = uses_image(vqa_type)
    answer_budget = min(ANSWER_MAX_NEW_TOKENS, int(max_new_tokens))

    def make_rows(engine, items: Sequence[EvalItem], images: Sequence[Optional[torch.Tensor]]) -> List[Dict[str, Any]]:
        if not cache:
            cache.append(descriptions())
        descs = _describe(engine, items, images, vqa_type, cache[0], max_seq_len=max_seq_len, max_new_tokens=max_new_tokens)
        prompts = [engine.prompt(answer_messages(vqa_type, d, it.question), has_image=answer_sees_image)
                   for it, d in zip(items, descs)]
        answer_images = list(images) if answer_sees_image else [None] * len(items)
        answers = engine.generate_texts(prompts, answer_images, answer_budget, [f"answer:{it.key}" for it in items])
        rows = []
        for it, p, a in zip(items, prompts, answers):
            row = {"image": it.image, "instruction": instruction_text(engine.tokenizer, p), "output": it.answer, "generated": a}
            row.update({c: it.extra.get(c, "") for c in extra_columns})
            rows.append(row)
        return rows

    return make_rows


def run_vqa(
    engine,
    items: Sequence[EvalItem],
    *,
    vqa_type: str,
    raw_path: str | Path,
    image_loader: ImageLoader,
    max_seq_len: int,
    max_new_tokens: int,
    extra_columns: Sequence[str] = (),
    identity: Optional[Dict[str, Any]] = None,
    overwrite: bool = False,
    progress: bool = True,
    on_batch: Optional[Callable[[int], None]] = None,
    ranks: Ranks = ONE_PROCESS,
) -> List[Dict[str, str]]:
    """Answer every item with the two-step protocol, writing ``raw_path`` (columns
    image, instruction, output, generated, then ``extra_columns``; UTF-8 with BOM).
    Returns the rows. ``identity`` (what made the rows: model, settings) is recorded
    beside the file and fingerprints the description cache."""
    check_vqa_type(vqa_type)
    raw_path = Path(raw_path)
    identity = dict(identity or {})
    identity.setdefault("vqa_type", vqa_type)
    identity.setdefault("max_seq_len", int(max_seq_len))
    identity.setdefault("max_new_tokens", int(max_new_tokens))
    if overwrite and ranks.rank == 0:
        clear_outputs(raw_path)
    make_rows = vqa_rows(vqa_type, lambda: description_cache(raw_path, identity, ranks), max_seq_len=max_seq_len, max_new_tokens=max_new_tokens,
                         extra_columns=extra_columns)
    rows, _ = run_items(
        engine, items, make_rows, raw_path=raw_path, columns=list(RAW_COLUMNS) + list(extra_columns),
        identity=identity, image_loader=image_loader, progress=progress and ranks.rank == 0, on_batch=on_batch,
        unit="q", ranks=ranks,
    )
    return rows


def _describe(
    engine,
    items: Sequence[EvalItem],
    images: Sequence[Optional[torch.Tensor]],
    vqa_type: str,
    cache: JsonlCache,
    *,
    max_seq_len: int,
    max_new_tokens: int,
) -> List[str]:
    if vqa_type == "omit":
        return [OMIT_DESCRIPTION] * len(items)
    budgets = [
        description_budget(engine, vqa_type, it.question, max_seq_len=max_seq_len, max_new_tokens=max_new_tokens)
        for it in items
    ]
    if vqa_type.startswith("cond_desc"):
        prompts = [engine.prompt(description_messages(vqa_type, it.question), has_image=True) for it in items]
        return engine.generate_texts(prompts, images, budgets, [f"desc:{it.key}" for it in items])
    # no_cond_desc*: one description per image, generated at its first question
    # (whose budget it takes) and reused for every later question on that image.
    need: Dict[str, int] = {}
    for k, it in enumerate(items):
        if it.image not in cache and it.image not in need:
            need[it.image] = k
    if need:
        idx = list(need.values())
        prompt = engine.prompt(description_messages(vqa_type, ""), has_image=True)
        texts = engine.generate_texts(
            [prompt] * len(idx), [images[k] for k in idx], [budgets[k] for k in idx], [f"desc:{items[k].image}" for k in idx]
        )
        cache.put_many({items[k].image: t for k, t in zip(idx, texts)})
    return [cache[it.image] for it in items]
