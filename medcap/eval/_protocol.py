"""The reference's two-step VQA protocol (``vqa_type``): describe the image, then answer.
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

Step 2: [first turn, assistant: description, user: question], at most
``min(50, max_new_tokens)`` new tokens; ``*_no_image`` hides the image from step 2 only.
In this file, in order: each step's conversation, the description's budget (the
reference's rule, ``description_budget``), ``TwoStepVQA`` (the rows of one VQA
results file: descriptions cached beside it, then answers), and ``run_vqa`` (the
protocol over given questions into one file).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from medcap.data import IMAGE_MARKER, PLACEHOLDER_CHAR
from medcap.eval._results import JsonlCache
from medcap.eval._run import ONE_PROCESS, RAW_COLUMNS, EvalItem, Ranks, SuiteRun, instruction_text, make_file
from medcap.generation import clean_text

log = logging.getLogger(__name__)

VQA_TYPES = ("no_cond_desc", "no_cond_desc_no_image", "cond_desc", "cond_desc_no_image", "omit")
DESCRIBE_TURN = "Describe the image."
COND_DESCRIBE = "Describe the image to answer the question: {question}"
OMIT_DESCRIPTION = "..."
ANSWER_MAX_NEW_TOKENS = 50
BUDGET_SPARE = 5

# ---- Each step's conversation


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


# ---- The description's budget


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
    """New tokens allowed for the description: the reference's rule, counted as it counted,
    ``min(max_seq_len - (n_skeleton + n_question + 5), max_new_tokens)``.

    ``n_skeleton`` counts step 1's conversation with one more empty exchange appended,
    in the reference's text form (``reference_text``) encoded as plain text with BOS
    and EOS; ``n_question`` the question encoded with BOS and EOS. For ``cond_desc``
    the skeleton holds the conditional prompt; a ``_no_image`` twin budgets as its
    image counterpart (step 1 is the same). A budget of zero or less is 1: the
    reference's generation makes its first token from the prompt before it counts
    the budget, so it always describes with at least one token."""
    msgs = description_messages(vqa_type, question)
    if msgs is None:
        return 0
    skeleton = msgs + [{"role": "assistant", "content": ""}, {"role": "user", "content": ""}]
    tok = engine.tokenizer
    n_skeleton = len(tok.encode(reference_text(skeleton, engine.num_image_tokens), add_bos=True, add_eos=True))
    n_question = len(tok.encode(str(question), add_bos=True, add_eos=True))
    return max(1, min(int(max_seq_len) - (n_skeleton + n_question + BUDGET_SPARE), int(max_new_tokens)))


# ---- One VQA results file's rows


class TwoStepVQA:
    """The rows of one VQA results file, each question asked in the protocol's two steps.

    ``identity`` (what made the rows) gains the protocol's settings; it is recorded
    beside the file and fingerprints the description cache ``{raw}.descriptions.jsonl``
    (one per rank: ranks describe disjoint images), so a restarted run with the same
    settings regenerates no description. The cache is opened at the first batch: a run
    refused for another model's file never touches it."""

    unit = "q"

    def __init__(self, vqa_type: str, *, raw_path: str | Path, identity: Dict[str, Any], max_seq_len: int,
                 max_new_tokens: int, extra_columns: Sequence[str] = (), ranks: Ranks = ONE_PROCESS):
        self.vqa_type = check_vqa_type(vqa_type)
        self.raw_path = Path(raw_path)
        self.extra_columns = list(extra_columns)
        self.columns = list(RAW_COLUMNS) + self.extra_columns
        self.identity = dict(identity)
        self.identity.setdefault("vqa_type", vqa_type)
        self.identity.setdefault("max_seq_len", int(max_seq_len))
        self.identity.setdefault("max_new_tokens", int(max_new_tokens))
        self.max_seq_len, self.max_new_tokens = int(max_seq_len), int(max_new_tokens)
        self.ranks = ranks
        self._cache: Optional[JsonlCache] = None

    def make_rows(self, engine, items: Sequence[EvalItem], images: Sequence[Optional[torch.Tensor]]) -> List[Dict[str, Any]]:
        """Step 1 (descriptions), then step 2 (answers): one row per item."""
        descriptions = self.describe(engine, items, images, self._descriptions())
        sees_image = uses_image(self.vqa_type)
        prompts = [engine.prompt(answer_messages(self.vqa_type, d, it.question), has_image=sees_image)
                   for it, d in zip(items, descriptions)]
        answers = engine.generate_texts(prompts, list(images) if sees_image else [None] * len(items),
                                        min(ANSWER_MAX_NEW_TOKENS, self.max_new_tokens),
                                        [f"answer:{it.key}" for it in items])
        rows = []
        for it, p, a in zip(items, prompts, answers):
            row = {"image": it.image, "instruction": instruction_text(engine.tokenizer, p), "output": it.answer, "generated": a}
            row.update({c: it.extra.get(c, "") for c in self.extra_columns})
            rows.append(row)
        return rows

    def describe(self, engine, items: Sequence[EvalItem], images: Sequence[Optional[torch.Tensor]],
                 cache: JsonlCache) -> List[str]:
        """Step 1: a description per item, from its image (``omit``: ``"..."``)."""
        if self.vqa_type == "omit":
            return [OMIT_DESCRIPTION] * len(items)
        budgets = [description_budget(engine, self.vqa_type, it.question, max_seq_len=self.max_seq_len,
                                      max_new_tokens=self.max_new_tokens) for it in items]
        if self.vqa_type.startswith("cond_desc"):
            prompts = [engine.prompt(description_messages(self.vqa_type, it.question), has_image=True) for it in items]
            return engine.generate_texts(prompts, images, budgets, [f"desc:{it.key}" for it in items])
        # no_cond_desc*: one description per image, generated at its first question
        # (whose budget it takes) and reused for every later question on that image.
        need: Dict[str, int] = {}
        for k, it in enumerate(items):
            if it.image not in cache and it.image not in need:
                need[it.image] = k
        if need:
            idx = list(need.values())
            prompt = engine.prompt(description_messages(self.vqa_type, ""), has_image=True)
            texts = engine.generate_texts([prompt] * len(idx), [images[k] for k in idx], [budgets[k] for k in idx],
                                          [f"desc:{items[k].image}" for k in idx])
            cache.put_many({items[k].image: t for k, t in zip(idx, texts)})
        return [cache[it.image] for it in items]

    def _descriptions(self) -> JsonlCache:
        if self._cache is None:
            suffix = ".descriptions.jsonl" if self.ranks.rank == 0 else f".descriptions.rank{self.ranks.rank}.jsonl"
            self._cache = JsonlCache(self.raw_path.with_name(self.raw_path.stem + suffix), fingerprint=self.identity)
        return self._cache


def run_vqa(engine, items: Sequence[EvalItem], *, vqa_type: str, raw_path: str | Path, image_loader, max_seq_len: int,
            max_new_tokens: int, extra_columns: Sequence[str] = (), identity: Optional[Dict[str, Any]] = None,
            overwrite: bool = False, progress: bool = True, on_batch=None, ranks: Ranks = ONE_PROCESS) -> List[Dict[str, str]]:
    """Answer every item with the two-step protocol, writing ``raw_path`` (columns
    image, instruction, output, generated, then ``extra_columns``; UTF-8 with BOM).
    Returns the rows. ``identity`` (what made the rows: model, settings) is recorded
    beside the file and fingerprints the description cache."""
    protocol = TwoStepVQA(vqa_type, raw_path=raw_path, identity=dict(identity or {}), max_seq_len=max_seq_len,
                          max_new_tokens=max_new_tokens, extra_columns=extra_columns, ranks=ranks)
    run = SuiteRun(protocol.raw_path.parent, "", image_loader, overwrite=overwrite, progress=progress, ranks=ranks,
                   on_batch=on_batch)
    rows, _ = make_file(engine, protocol, items, run)
    return rows
