"""The reference's two-step VQA protocol (``vqa_type``), run resumably.

Step 1 (description) and step 2 (answer), per ``vqa_type``:

=======================  ==================================================  ===========
vqa_type                 step 1: description                                 image
=======================  ==================================================  ===========
no_cond_desc             [user: image] -> generated once per image, cached   yes
no_cond_desc_no_image    [user: "Describe the image."] -> cached per image   no
cond_desc                [user: image, assistant: "...", user: "Describe     yes
                         the image to answer the question: {q}"] -> per row
cond_desc_no_image       same, first turn "Describe the image."              no
omit                     "..." (nothing generated)                           yes
=======================  ==================================================  ===========

Step 2: [first turn, assistant: description, user: question, assistant: open],
at most ``min(50, max_new_tokens)`` new tokens. The description's budget is
``min(max_seq_len - (tokens of [first turn, empty exchange, open turn] +
tokens of the question + 5), max_new_tokens)``, so that step 2 fits in
``max_seq_len``; the same rule serves ``cond_desc`` (its purpose is step 2).

Rows are written as each batch completes (see ``_journal``); descriptions go
to a cache file beside the results, so a restarted run regenerates nothing;
items whose image cannot be read are recorded in a skip file and left out
consistently on every restart.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from medcap.data import IMAGE_MARKER, BadSample
from medcap.eval._datasets import VQAItem
from medcap.eval._journal import CsvJournal, JsonlCache
from medcap.generation import clean_text, prompt_text

log = logging.getLogger(__name__)

VQA_TYPES = ("no_cond_desc", "no_cond_desc_no_image", "cond_desc", "cond_desc_no_image", "omit")
DESCRIBE_TURN = "Describe the image."
COND_DESCRIBE = "Describe the image to answer the question: {question}"
OMIT_DESCRIPTION = "..."
ANSWER_MAX_NEW_TOKENS = 50
RAW_COLUMNS = ("image", "instruction", "output", "generated")

ImageLoader = Callable[[str], torch.Tensor]


def check_vqa_type(vqa_type: str) -> str:
    if vqa_type not in VQA_TYPES:
        raise ValueError(f"vqa_type={vqa_type!r} is not one of {list(VQA_TYPES)}")
    return vqa_type


def uses_image(vqa_type: str) -> bool:
    return not check_vqa_type(vqa_type).endswith("_no_image")


def first_turn(vqa_type: str) -> Dict[str, str]:
    return {"role": "user", "content": IMAGE_MARKER if uses_image(vqa_type) else DESCRIBE_TURN}


def description_messages(vqa_type: str, question: str) -> Optional[List[Dict[str, str]]]:
    """Step 1's conversation (ending before the open assistant turn); None for ``omit``."""
    check_vqa_type(vqa_type)
    if vqa_type == "omit":
        return None
    if vqa_type.startswith("no_cond_desc"):
        return [first_turn(vqa_type)]
    return [
        first_turn(vqa_type),
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


def description_budget(engine, vqa_type: str, question: str, *, max_seq_len: int, max_new_tokens: int) -> int:
    """New tokens allowed for the description so that step 2 fits ``max_seq_len``."""
    skeleton = [first_turn(vqa_type), {"role": "assistant", "content": ""}, {"role": "user", "content": ""}]
    n_skeleton = len(engine.prompt(skeleton, has_image=uses_image(vqa_type)))
    n_question = len(engine.tokenizer.encode(clean_text(question), add_bos=False, add_eos=False))
    return max(0, min(int(max_seq_len) - (n_skeleton + n_question + 5), int(max_new_tokens)))


def _batches(seq: Sequence, size: int):
    for lo in range(0, len(seq), size):
        yield seq[lo : lo + size]


def load_batch_images(
    batch: Sequence[Any],
    image_of: Callable[[Any], Optional[str]],
    image_loader: Callable[[str], torch.Tensor],
    skipped: JsonlCache,
    noun: str,
    logger: logging.Logger,
) -> Tuple[List[Any], List[Optional[torch.Tensor]]]:
    """Load the image of each item of ``batch`` (``image_of(it)``: its path, or None for
    none). Items whose image cannot be read are recorded in ``skipped`` (key -> reason,
    so a resumed run does not try them again), reported once on ``logger`` and left out.

    Returns ``(kept, images)``, aligned.
    """
    kept: List[Any] = []
    images: List[Optional[torch.Tensor]] = []
    bad: Dict[str, str] = {}
    for it in batch:
        path = image_of(it)
        try:
            images.append(None if path is None else image_loader(path))
            kept.append(it)
        except BadSample as e:
            bad[it.key] = e.reason
    if bad:
        logger.warning("skipping %d %s whose image cannot be read, e.g. %s", len(bad), noun, next(iter(bad.values())))
        skipped.put_many(bad)
    return kept, images


def check_resume(done: Sequence[Dict[str, str]], todo: Sequence[VQAItem], path: Path) -> None:
    """The rows already written must be the first items of this run, in order."""
    for i, (row, it) in enumerate(zip(done, todo)):
        if row.get("image") != it.image or row.get("output") != it.answer or (
            "question_id" in row and row["question_id"] != it.extra.get("question_id", row["question_id"])
        ):
            raise ValueError(
                f"{path} does not belong to this run: its row {i} is for {row.get('image')!r} / "
                f"{row.get('output')!r}, but this run's item {i} is {it.image!r} / {it.answer!r}. "
                "Was the dataset, the chunk or the vqa_type changed? Move the file away to start over."
            )
    if len(done) > len(todo):
        raise ValueError(f"{path} holds {len(done)} rows but this run has only {len(todo)} items")


def run_vqa(
    engine,
    items: Sequence[VQAItem],
    *,
    vqa_type: str,
    raw_path: str | Path,
    image_loader: ImageLoader,
    max_seq_len: int,
    max_new_tokens: int,
    extra_columns: Sequence[str] = (),
    progress: bool = True,
    on_batch: Optional[Callable[[int], None]] = None,
) -> List[Dict[str, str]]:
    """Answer every item with the two-step protocol, writing ``raw_path`` (columns
    image, instruction, output, generated, then ``extra_columns``). Returns the rows.

    ``on_batch(rows_written)`` is called after each batch is on disk (tests use it
    to interrupt a run).
    """
    check_vqa_type(vqa_type)
    raw_path = Path(raw_path)
    columns = list(RAW_COLUMNS) + list(extra_columns)
    journal = CsvJournal(raw_path, columns)
    if journal.dropped_bytes:
        log.warning("%s: dropped a half-written last row (%d bytes); it is generated again", journal.path, journal.dropped_bytes)
    skipped = JsonlCache(raw_path.with_name(raw_path.stem + ".skipped.jsonl"))
    descriptions = JsonlCache(raw_path.with_name(raw_path.stem + ".descriptions.jsonl"))
    todo = [it for it in items if it.key not in skipped]
    done = journal.rows()
    check_resume(done, todo, journal.path)
    if done:
        log.info("%s: resuming after %d of %d rows", journal.path, len(done), len(todo))
    with_image = uses_image(vqa_type)
    answer_budget = min(ANSWER_MAX_NEW_TOKENS, int(max_new_tokens))
    bar = tqdm(total=len(todo), initial=len(done), desc=f"{raw_path.stem}", disable=not progress, unit="q")
    pending = list(todo[len(done) :])
    for batch in _batches(pending, engine.batch_size):
        kept, images = load_batch_images(
            batch, (lambda it: it.image) if with_image else (lambda it: None), image_loader, skipped, "question(s)", log
        )
        descs = _describe(engine, kept, images, vqa_type, descriptions, max_seq_len=max_seq_len, max_new_tokens=max_new_tokens)
        prompts = [engine.prompt(answer_messages(vqa_type, d, it.question), has_image=with_image) for it, d in zip(kept, descs)]
        answers = engine.generate_texts(prompts, images, answer_budget, [f"answer:{it.key}" for it in kept])
        rows = []
        for it, p, a in zip(kept, prompts, answers):
            row = {"image": it.image, "instruction": prompt_text(engine.tokenizer, p), "output": it.answer, "generated": a}
            row.update({c: it.extra.get(c, "") for c in extra_columns})
            rows.append(row)
        journal.append(rows)
        bar.update(len(batch))
        if on_batch is not None:
            on_batch(len(journal))
    bar.close()
    rows = journal.rows()
    journal.finish()
    return rows


def _describe(
    engine,
    items: Sequence[VQAItem],
    images: Sequence[Optional[torch.Tensor]],
    vqa_type: str,
    cache: JsonlCache,
    *,
    max_seq_len: int,
    max_new_tokens: int,
) -> List[str]:
    if vqa_type == "omit":
        return [OMIT_DESCRIPTION] * len(items)
    with_image = uses_image(vqa_type)
    budgets = [
        description_budget(engine, vqa_type, it.question, max_seq_len=max_seq_len, max_new_tokens=max_new_tokens)
        for it in items
    ]
    if vqa_type.startswith("cond_desc"):
        prompts = [engine.prompt(description_messages(vqa_type, it.question), has_image=with_image) for it in items]
        return engine.generate_texts(prompts, images, budgets, [f"desc:{it.key}" for it in items])
    # no_cond_desc*: one description per image, generated at its first question
    # (whose budget it takes) and reused for every later question on that image.
    need: Dict[str, int] = {}
    for k, it in enumerate(items):
        if it.image not in cache and it.image not in need:
            need[it.image] = k
    if need:
        idx = list(need.values())
        prompt = engine.prompt(description_messages(vqa_type, ""), has_image=with_image)
        texts = engine.generate_texts(
            [prompt] * len(idx), [images[k] for k in idx], [budgets[k] for k in idx], [f"desc:{items[k].image}" for k in idx]
        )
        cache.put_many({items[k].image: t for k, t in zip(idx, texts)})
    return [cache[it.image] for it in items]
