"""The reference's evaluation suites (captioning, VQA-RAD, OmniMedVQA): their data sets,
the two-step VQA protocol, and the suites themselves.

Readers for the evaluation sets, in the layouts the reference reads.

* captioning: a sharegpt JSON file (``test_metrics``);
* VQA-RAD: ``{source}/VQA_RAD/VQA_RAD Dataset Public.json``, images in
  ``{source}/VQA_RAD/VQA_RAD Image Folder/``; the closed test questions;
* OmniMedVQA: every ``*.json`` in ``{source}/OmniMedVQA/QA_information/Open-access/``,
  image paths relative to ``{source}/OmniMedVQA/``; 8 modalities kept by the
  dataset's own spellings, shuffled with ``random.Random(0)``, then chunked.

Each reader returns the items and a report (what was read, kept, excluded and
why); problems the reference crashed on are counted and reported instead.

The reference's two-step VQA protocol (``vqa_type``), run through the one loop.

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

The evaluation suites of ``recipes/generate.py``, with the reference's file names.

=================  =============================================================
suite              files in ``output_dir`` (CSV files UTF-8 with BOM)
=================  =============================================================
test_metrics       ``metrics-raw-{ckpt}.csv`` (image, instruction, output,
                   generated), ``metrics-{ckpt}.csv`` (``metric,score`` lines)
test_vqarad        ``vqarad-{vqa_type}-raw-{ckpt}.csv`` (judged later by
                   ``tools/judge.py``)
test_omnimedvqa    ``omnimedvqa-{vqa_type}-raw-{ckpt}-{idx}_{chunk}.csv`` (+
                   options, modality_type, question_id; ``{idx}_{chunk}`` are
                   ``test_chunk_idx``/``test_chunk``, 0 and 50 when not given, as
                   in the reference), then the scored ``...-{round(acc, 4)}.csv``
                   and its per-modality CSV/JSON/PNG
=================  =============================================================

``ckpt`` is the vision checkpoint's file name up to its first dot (the
reference's ``basename.split('.')[0]``). Each suite holds a lock on its results
file while it runs, and every file runs through the one loop of ``_loop``: a
file made by the same model and settings is continued or reused, one made by
another is refused (``overwrite=True`` starts afresh), and a file the reference
wrote (no ``.run.json`` beside it) is taken as it is and re-scored.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from medcap._io import atomic_write_text
from medcap.data import IMAGE_MARKER, PLACEHOLDER_CHAR, BadSample, image_transform, load_image, parse_record, read_index
from medcap.eval._loop import (
    ONE_PROCESS,
    OPTION_LETTERS,
    EvalItem,
    JsonlCache,
    Ranks,
    clear_outputs,
    results_lock,
    run_items,
)
from medcap.eval._scoring import caption_metrics, check_java, score_file, write_metrics_csv
from medcap.generation import clean_text, prompt_text

# ---- Evaluation sets -------------------------------------------------------------

# The dataset's own spellings (sic): OmniMedVQA writes them exactly like this.
OMNIMEDVQA_MODALITIES: Tuple[str, ...] = (
    "CT(Computed Tomography)",
    "X-Ray",
    "Dermoscopy",
    "Fundus Photography",
    "OCT (Optical Coherence Tomography",
    "ultrasound",
    "MR (Mag-netic Resonance Imaging)",
    "Microscopy Images",
)
VQARAD_PHRASE_TYPES = ("test_freeform", "test_para")
MIN_CHUNK = 50


# One item type for every suite (see ``_loop.EvalItem``); the old names stay readable.
VQAItem = EvalItem
CaptionItem = EvalItem


def _s(v: Any) -> str:
    return "" if v is None else str(v)


def _unique_keys(items: List[VQAItem]) -> None:
    """Keys name a question in seeds, skip files and resume checks: make repeats unique."""
    seen: Counter = Counter()
    for it in items:
        seen[it.key] += 1
        if seen[it.key] > 1:
            it.key = f"{it.key}#{seen[it.key] - 1}"


def read_caption_set(source: str | Path) -> Tuple[List[CaptionItem], Dict[str, Any]]:
    """Sharegpt records -> prompts (the conversation with its first answer emptied,
    ending at the open assistant turn) and reference captions (that answer)."""
    source = Path(source)
    index = read_index(source)
    items: List[CaptionItem] = []
    bad: List[str] = []
    for i in range(len(index)):
        try:
            raw = index[i]
            rec = parse_record(raw, json_dir=index.file_of(i).parent)
        except BadSample as e:
            bad.append(f"{index.origin(i)}: {e.reason}")
            continue
        first = next(k for k, t in enumerate(rec.turns) if t.role == "assistant" and t.text.strip())
        msgs = [{"role": t.role, "content": t.text} for t in rec.turns[:first]]
        if not any(m["role"] == "user" for m in msgs):
            bad.append(f"{index.origin(i)}: no user turn before the first answer")
            continue
        own = raw.get("image") if isinstance(raw, dict) else None
        items.append(
            EvalItem(
                image="" if rec.image_path is None else str(own if own not in (None, "") else rec.image_path),
                path=None if rec.image_path is None else str(rec.image_path),
                has_image=rec.image_path is not None,
                question="",
                messages=msgs,
                answer=rec.turns[first].text,
                key=str(i),
            )
        )
    report = {"source": str(source), "records": len(index), "kept": len(items), "bad": len(bad), "bad_examples": bad[:20]}
    return items, report


def read_question_list(path: Path, name: str, dataset_source: str | Path) -> List[Any]:
    """A data set's question file: one JSON list (a BOM allowed), or a clear error."""
    if not path.is_file():
        raise FileNotFoundError(f"{name} questions not found: {str(path)!r} (dataset_source={str(dataset_source)!r})")
    records = json.loads(path.read_text(encoding="utf-8-sig"))
    if not isinstance(records, list):
        raise ValueError(f"{path} must hold a JSON list of questions")
    return records


def read_vqarad(dataset_source: str | Path) -> Tuple[List[VQAItem], Dict[str, Any]]:
    """The closed test questions of VQA-RAD (``phrase_type`` test_freeform or test_para,
    ``answer_type`` CLOSED), in file order."""
    root = Path(dataset_source) / "VQA_RAD"
    path = root / "VQA_RAD Dataset Public.json"
    records = read_question_list(path, "VQA-RAD", dataset_source)
    img_dir = root / "VQA_RAD Image Folder"
    items: List[VQAItem] = []
    answer_types: Counter = Counter()
    malformed = 0
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not all(k in r for k in ("question", "image_name", "answer")):
            malformed += 1
            continue
        answer_types[_s(r.get("answer_type"))] += 1
        if r.get("phrase_type") not in VQARAD_PHRASE_TYPES or r.get("answer_type") != "CLOSED":
            continue
        qid = _s(r.get("qid")) or str(i)
        items.append(EvalItem(image=_s(r["image_name"]), path=str(img_dir / _s(r["image_name"])),
                              question=_s(r["question"]), answer=_s(r["answer"]), key=f"vqarad:{qid}"))
    _unique_keys(items)
    report = {
        "source": str(path),
        "records": len(records),
        "kept": len(items),
        "malformed": malformed,
        "answer_types": dict(answer_types),
    }
    return items, report


FILE_ORDERS = ("sorted", "listdir")


def read_omnimedvqa(
    dataset_source: str | Path, *, include_modality_key: bool = False, file_order: str = "sorted"
) -> Tuple[List[EvalItem], Dict[str, Any]]:
    """OmniMedVQA's open-access questions of the 8 modalities, shuffled with
    ``random.Random(0)`` (the reference's order); options C/D may be absent.

    Records that name their modality in ``modality`` instead of ``modality_type``
    are left out as the reference leaves them out (it reads ``modality_type`` only),
    and counted; ``include_modality_key=True`` brings them in.

    ``file_order``: the question files are read in sorted name order (the same on
    every machine). The reference read them in ``os.listdir`` order, which depends
    on the file system; ``"listdir"`` reproduces that on the machine at hand. The
    order matters because the shuffle runs over the concatenated files.
    """
    if file_order not in FILE_ORDERS:
        raise ValueError(f"omnimedvqa_file_order must be one of {list(FILE_ORDERS)}, got {file_order!r}")
    root = Path(dataset_source) / "OmniMedVQA"
    qa_dir = root / "QA_information" / "Open-access"
    if not qa_dir.is_dir():
        raise FileNotFoundError(f"OmniMedVQA questions not found: {str(qa_dir)!r} (dataset_source={str(dataset_source)!r})")
    if file_order == "sorted":
        files = sorted(qa_dir.glob("*.json"))
    else:
        files = [qa_dir / n for n in os.listdir(qa_dir) if n.endswith(".json")]
    if not files:
        raise FileNotFoundError(f"no *.json files in {str(qa_dir)!r}")
    items: List[VQAItem] = []
    excluded: Counter = Counter()
    stats: Counter = Counter()
    bad_files: List[str] = []
    for f in files:
        try:
            records = json.loads(f.read_text(encoding="utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            bad_files.append(f"{f.name}: {e}")
            continue
        if not isinstance(records, list):
            bad_files.append(f"{f.name}: not a JSON list")
            continue
        for r in records:
            stats["records"] += 1
            if not isinstance(r, dict) or not all(k in r for k in ("question", "gt_answer", "image_path")):
                stats["malformed"] += 1
                continue
            if "modality_type" in r:
                modality = _s(r["modality_type"])
            else:
                stats["modality_key_instead_of_modality_type"] += 1
                if not include_modality_key:
                    stats["left_out_modality_key"] += 1
                    continue
                modality = _s(r.get("modality"))
            if modality not in OMNIMEDVQA_MODALITIES:
                excluded[modality] += 1
                continue
            extra = {f"option_{L}": _s(r.get(f"option_{L}")) for L in OPTION_LETTERS}
            for L in ("C", "D"):
                if extra[f"option_{L}"] == "":
                    stats[f"no_option_{L}"] += 1
            extra["modality_type"] = modality
            extra["question_id"] = _s(r.get("question_id"))
            items.append(
                EvalItem(
                    image=_s(r["image_path"]),
                    path=str(root / _s(r["image_path"])),
                    question=_s(r["question"]),
                    answer=_s(r["gt_answer"]),
                    key=f"omnimedvqa:{extra['question_id'] or len(items)}",
                    extra=extra,
                )
            )
    _unique_keys(items)
    random.Random(0).shuffle(items)
    report = {
        "source": str(qa_dir),
        "files": len(files),
        "file_order": file_order,
        "include_modality_key": include_modality_key,
        "bad_files": bad_files,
        **dict(stats),
        "kept": len(items),
        "per_modality": dict(Counter(it.extra["modality_type"] for it in items)),
        "excluded_modalities": dict(excluded),
    }
    return items, report


def chunk_bounds(n: int, chunk_idx: int, num_chunks: int) -> Tuple[int, int]:
    """``[start, end)`` of chunk ``chunk_idx`` of ``num_chunks``: size ``max(n // num_chunks, 50)``,
    the last chunk running to the end (what the reference meant to do)."""
    if num_chunks < 1:
        raise ValueError(f"test_chunk must be >= 1, got {num_chunks}")
    if not 0 <= chunk_idx < num_chunks:
        raise ValueError(f"test_chunk_idx must be in [0, {num_chunks - 1}], got {chunk_idx}")
    size = max(n // num_chunks, MIN_CHUNK)
    start = min(n, chunk_idx * size)
    end = n if chunk_idx == num_chunks - 1 else min(n, start + size)
    return start, end


def select_chunk(items: Sequence[Any], chunk_idx: Optional[int], num_chunks: int) -> Tuple[List[Any], Tuple[int, int]]:
    """The items of one chunk, and the ``(idx, chunk)`` pair for file names.

    Chunking is asked for by giving ``test_chunk_idx``; without it every item is
    run. The names follow the reference's launch lines either way:
    ``test_chunk_idx`` (0 when not given) and ``test_chunk`` (50 by default), so a
    raw file the reference wrote for the same command is found. A full run and
    chunk 0 of 50 share that name; the record beside the file tells them apart.
    """
    if chunk_idx is None:
        return list(items), (0, int(num_chunks))
    start, end = chunk_bounds(len(items), int(chunk_idx), int(num_chunks))
    return list(items[start:end]), (int(chunk_idx), int(num_chunks))


def drop_missing_images(items: Sequence[VQAItem]) -> Tuple[List[VQAItem], List[str]]:
    """Items whose image file exists, and the paths of those that do not.

    Done after shuffling and chunking, so the split matches the reference's
    whatever is missing."""
    kept, missing = [], []
    for it in items:
        (kept if it.file is None or Path(it.file).is_file() else missing).append(it)
    return kept, [m.image for m in missing]


# ---- The two-step VQA protocol ---------------------------------------------------

log = logging.getLogger(__name__)

VQA_TYPES = ("no_cond_desc", "no_cond_desc_no_image", "cond_desc", "cond_desc_no_image", "omit")
DESCRIBE_TURN = "Describe the image."
COND_DESCRIBE = "Describe the image to answer the question: {question}"
OMIT_DESCRIPTION = "..."
ANSWER_MAX_NEW_TOKENS = 50
RAW_COLUMNS = ("image", "instruction", "output", "generated")
BUDGET_SPARE = 5
_BOT = "<|begin_of_text|>"

LoadImage = Callable[[str], torch.Tensor]


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
    image_loader: LoadImage,
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


# ---- The suites ------------------------------------------------------------------

OMNIMEDVQA_EXTRA_COLUMNS = ("option_A", "option_B", "option_C", "option_D", "modality_type", "question_id")


class ImageLoader:
    """Image file -> the model's input tensor ``[3, S, S]`` (raises ``BadSample``)."""

    def __init__(self, image_size: int):
        self.transform = image_transform(image_size)

    def __call__(self, path: str) -> torch.Tensor:
        return self.transform(load_image(path))


def checkpoint_name(vision_checkpoint: Optional[str]) -> str:
    """``ckpt`` of the file names: the file name up to its first dot, as the reference
    (``meta_model_4.pt`` -> ``meta_model_4``); ``untrained`` without a checkpoint."""
    if not vision_checkpoint:
        return "untrained"
    return Path(str(vision_checkpoint)).name.split(".")[0]


def _write_report(path: Path, report: Dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(report, indent=1, ensure_ascii=False, default=str))


def caption_rows(max_new_tokens: int):
    """The captioning suite's step for the loop: the conversation before the first
    answer, generated; one row per item."""

    def make_rows(engine, items: Sequence[EvalItem], images: Sequence[Optional[torch.Tensor]]) -> List[Dict[str, Any]]:
        prompts = [engine.prompt(it.messages, has_image=it.has_image) for it in items]
        texts = engine.generate_texts(prompts, images, max_new_tokens, [f"caption:{it.key}" for it in items])
        return [
            {"image": it.image, "instruction": instruction_text(engine.tokenizer, p), "output": it.answer, "generated": t}
            for it, p, t in zip(items, prompts, texts)
        ]

    return make_rows


def run_test_metrics(
    engine,
    *,
    dataset_source: str,
    output_dir: str | Path,
    ckpt: str,
    max_new_tokens: int,
    image_loader: Callable[[str], torch.Tensor],
    identity: Optional[Dict[str, Any]] = None,
    overwrite: bool = False,
    limit: Optional[int] = None,
    progress: bool = True,
    on_batch: Optional[Callable[[int], None]] = None,
    ranks: Ranks = ONE_PROCESS,
) -> Dict[str, Any]:
    """Caption every sample of a sharegpt file and score the captions (on rank 0)."""
    check_java()  # before hours of generation, not after
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw_path = out / f"metrics-raw-{ckpt}.csv"
    metrics_path = out / f"metrics-{ckpt}.csv"
    items, report = read_caption_set(dataset_source)
    if limit is not None:
        items = items[:limit]
    if report["bad"]:
        log.warning("%d of %d records of %s cannot be used, e.g. %s", report["bad"], report["records"],
                    dataset_source, report["bad_examples"][:3])
    identity = {**(identity or {}), "suite": "test_metrics", "max_new_tokens": int(max_new_tokens)}
    with results_lock(raw_path, ranks):
        rows, left_out = run_items(
            engine, items, caption_rows(int(max_new_tokens)), raw_path=raw_path, columns=RAW_COLUMNS,
            identity=identity, image_loader=image_loader, overwrite=overwrite, progress=progress and ranks.rank == 0,
            on_batch=on_batch, unit="img", ranks=ranks,
        )
        if ranks.rank != 0:
            return {"raw_path": str(raw_path), "rows": len(rows), "left_out": left_out}
        if not rows:
            raise ValueError(f"no captions were generated from {dataset_source}: nothing to score")
        scores = caption_metrics([r["output"] for r in rows], [r["generated"] for r in rows])
        write_metrics_csv(metrics_path, scores)
    print("\n".join(f"{k}: {v:.6f}" for k, v in scores.items()), flush=True)
    return {"raw_path": str(raw_path), "metrics_path": str(metrics_path), "scores": scores, "rows": len(rows),
            "left_out": left_out}


def run_test_vqarad(
    engine,
    *,
    dataset_source: str,
    output_dir: str | Path,
    ckpt: str,
    vqa_type: str,
    max_seq_len: int,
    max_new_tokens: int,
    image_loader: Callable[[str], torch.Tensor],
    identity: Optional[Dict[str, Any]] = None,
    overwrite: bool = False,
    limit: Optional[int] = None,
    progress: bool = True,
    on_batch: Optional[Callable[[int], None]] = None,
    ranks: Ranks = ONE_PROCESS,
) -> Dict[str, Any]:
    """Answer VQA-RAD's closed test questions; the judge scores the file."""
    check_vqa_type(vqa_type)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw_path = out / f"vqarad-{vqa_type}-raw-{ckpt}.csv"
    items, report = read_vqarad(dataset_source)
    items = _prepare("VQA-RAD", items, report, raw_path, limit=limit, write=ranks.rank == 0)
    with results_lock(raw_path, ranks):
        rows = run_vqa(
            engine, items, vqa_type=vqa_type, raw_path=raw_path, image_loader=image_loader, max_seq_len=max_seq_len,
            max_new_tokens=max_new_tokens, identity={**(identity or {}), "suite": "test_vqarad"}, overwrite=overwrite,
            progress=progress, on_batch=on_batch, ranks=ranks,
        )
    if ranks.rank == 0:
        print(f"wrote {raw_path} ({len(rows)} rows); judge it with: python tools/judge.py --exp eval_vqa --csv-path {raw_path}")
    return {"raw_path": str(raw_path), "rows": len(rows), "report": report}


def run_test_omnimedvqa(
    engine,
    *,
    dataset_source: str,
    output_dir: str | Path,
    ckpt: str,
    vqa_type: str,
    max_seq_len: int,
    max_new_tokens: int,
    image_loader: Callable[[str], torch.Tensor],
    test_chunk_idx: Optional[int] = None,
    test_chunk: int = 50,
    scoring: str = "letter",
    include_modality_key: bool = False,
    file_order: str = "sorted",
    identity: Optional[Dict[str, Any]] = None,
    overwrite: bool = False,
    limit: Optional[int] = None,
    progress: bool = True,
    on_batch: Optional[Callable[[int], None]] = None,
    ranks: Ranks = ONE_PROCESS,
) -> Dict[str, Any]:
    """Answer OmniMedVQA's questions (one chunk when ``test_chunk_idx`` is given) and score
    them (scoring on rank 0, once every rank's answers are in the raw file)."""
    check_vqa_type(vqa_type)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    items, report = read_omnimedvqa(dataset_source, include_modality_key=include_modality_key, file_order=file_order)
    items, (idx, chunk) = select_chunk(items, test_chunk_idx, test_chunk)
    raw_path = out / f"omnimedvqa-{vqa_type}-raw-{ckpt}-{idx}_{chunk}.csv"
    items = _prepare("OmniMedVQA", items, report, raw_path, limit=limit, chunk=(test_chunk_idx, test_chunk),
                     write=ranks.rank == 0)
    with results_lock(raw_path, ranks):
        rows = run_vqa(
            engine, items, vqa_type=vqa_type, raw_path=raw_path, image_loader=image_loader, max_seq_len=max_seq_len,
            max_new_tokens=max_new_tokens, extra_columns=OMNIMEDVQA_EXTRA_COLUMNS,
            identity={**(identity or {}), "suite": "test_omnimedvqa"}, overwrite=overwrite, progress=progress,
            on_batch=on_batch, ranks=ranks,
        )
        if ranks.rank != 0:
            return {"raw_path": str(raw_path), "report": report, "rows": len(rows)}
        _warn_if_other_selection(raw_path, rows, items)
        questions = {it.extra.get("question_id", ""): it.question for it in items}
        summary = score_file(engine, raw_path, method=scoring, image_loader=_by_image(items, image_loader),
                             progress=progress, questions=questions)
    return {"raw_path": str(raw_path), "report": report, **summary}


def _by_image(items: Sequence[EvalItem], image_loader: Callable[[str], torch.Tensor]) -> Callable[[str], torch.Tensor]:
    """Rows name images by the data set's own value; load the file it resolves to."""
    files = {it.image: it.file for it in items}
    return lambda image: image_loader(files.get(image) or image)


def _warn_if_other_selection(raw_path: Path, rows: Sequence[Dict[str, str]], items: Sequence[EvalItem]) -> None:
    """A raw file taken as it is (e.g. the reference's, which ran every question whatever
    the chunk) may hold other questions than this run selects: say so before scoring it."""
    ids = [r.get("question_id", "") for r in rows]
    want = [it.extra.get("question_id", "") for it in items]
    if ids != want:
        log.warning("%s holds %d rows, this run selects %d questions (%d in common): it is scored as it is. "
                    "(The reference ran every question whatever test_chunk_idx said.)",
                    raw_path, len(ids), len(want), len(set(ids) & set(want)))


def _prepare(name: str, items: List[EvalItem], report: Dict[str, Any], raw_path: Path, *, limit: Optional[int],
             chunk: Optional[tuple] = None, write: bool = True) -> List[EvalItem]:
    """What both VQA suites do once their questions are read: leave out questions whose
    image is missing (reported), cut to ``limit``, log and save the report beside the raw file."""
    items, missing = drop_missing_images(items)
    if limit is not None:
        items = items[:limit]
    if chunk is not None and chunk[0] is not None:
        report.update(chunk=list(chunk), in_chunk=len(items) + len(missing))
    report.update(missing_images=len(missing), missing_image_examples=missing[:20])
    if write:  # one process reports (rank 0)
        _log_report(name, report)
        _write_report(raw_path.with_name(raw_path.stem + ".report.json"), report)
    return items


def _log_report(name: str, report: Dict[str, Any]) -> None:
    parts = [f"{k}={v}" for k, v in report.items() if not k.endswith("examples") and k != "source"]
    log.info("%s: %s", name, ", ".join(parts))
    odd = {k: report[k] for k in ("left_out_modality_key", "no_option_C", "no_option_D", "missing_images", "malformed")
           if report.get(k)}
    if odd:
        print(f"{name}: handled records: {odd}" + (
            f" (missing images, e.g. {report['missing_image_examples'][:3]})" if report.get("missing_images") else ""), flush=True)
    if report.get("left_out_modality_key"):
        print(f"{name}: {report['left_out_modality_key']} question(s) name their modality under 'modality' instead of "
              "'modality_type' and are left out, as the reference leaves them out "
              "(omnimedvqa_include_modality_key=True brings them in)", flush=True)
    if report.get("excluded_modalities"):
        print(f"{name}: questions of other modalities left out: {report['excluded_modalities']}", flush=True)
