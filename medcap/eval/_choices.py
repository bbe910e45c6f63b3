"""Choice questions scored: the letter an answer names among its options.

Two ways, as ``vqa_scoring`` says (OmniMedVQA, and the benchmarks' choice questions):

* ``letter``, the reference's letter mapping: for each row a text-only chat (no
  image, at most 20 new tokens) asks which option our free answer means, with the
  question the row was made from (from the data set by question id; for a file
  with no such id, read back from the ``instruction``). ``predict`` is the reply's
  first character, upper-cased (empty for an empty reply); the row is correct when
  that letter's position among A-D is the position of the first option equal to
  the answer: the reference's rule, so a letter outside A-D, or one naming an
  empty option, is wrong;
* ``loglik``: the answer prompt of each row is rebuilt from its ``instruction``
  (with the image) and each option scored as the assistant's whole answer (its
  tokens, then ``<|eot_id|>``); ``predict`` is the best option's letter and
  ``predict_generated`` holds the scores. No second generation.

Both append to a ``CsvJournal`` as they go, so a stopped scoring continues.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import torch

from medcap._io import progress as progress_bar
from medcap.data import BadSample
from medcap.eval._results import CsvJournal, ResultsRefused
from medcap.eval._run import OPTION_LETTERS
from medcap.generation import prompt_tokens_from_text, question_from_instruction

SCORE_COLUMNS = ("predict_generated", "predict", "correct")
LETTER_MAX_NEW_TOKENS = 20
LETTER_INSTRUCTION = (
    "Based on the question and our answer, respond with only the letter of the correct option from the given choices."
)
SCORING_METHODS = ("letter", "loglik")


def row_options(row: Dict[str, str]) -> Dict[str, str]:
    """The options a row offers (A and B always; C and D when present)."""
    out = OrderedDict()
    for L in OPTION_LETTERS:
        v = row.get(f"option_{L}", "")
        if L in ("A", "B") or v != "":
            out[L] = v
    return out


def letter_prompt(question: str, generated: str, options: Dict[str, str]) -> str:
    """The reference's mapping question, character for character: A and B, and when
    C or D is given, the C and D lines both (an absent one left empty). The question is
    stripped, as the reference's is: it reads the question back from the answer prompt,
    whose turns the chat template trims."""
    text = f"Question: {question.strip()}\nOur answer: {generated}\nA. {options.get('A', '')}\nB. {options.get('B', '')}\n"
    if options.get("C", "") != "" or options.get("D", "") != "":
        text += f"C. {options.get('C', '')}\nD. {options.get('D', '')}\n"
    return text + "\n" + LETTER_INSTRUCTION


def read_letter(reply: str) -> str:
    """``predict``: the reply's first character, upper-cased; empty for an empty reply."""
    reply = (reply or "").strip()
    return reply[0].upper() if reply else ""


def is_correct(letter: str, options: Dict[str, str], answer: str) -> int:
    """The reference's rule: the letter's position among A-D equals the position of the
    first option (A-D, absent ones empty) whose text is the answer."""
    texts = [options.get(L, "") for L in OPTION_LETTERS]
    if letter not in OPTION_LETTERS or answer not in texts:
        return 0
    return int(OPTION_LETTERS.index(letter) == texts.index(answer))


# ---- Scoring a file's rows


def open_scoring(partial: Path, rows: Sequence[Dict[str, str]], raw_path: Path, *, compare: Sequence[str]) -> CsvJournal:
    """The scoring's partial file (the rows scored so far), checked against the rows it scores."""
    journal = CsvJournal(None, list(rows[0]) + list(SCORE_COLUMNS), partial=partial, bom=True)
    if len(journal) > len(rows) or any(a.get(c) != b.get(c) for a, b in zip(journal.rows(), rows) for c in compare):
        raise ResultsRefused(f"{partial} does not match {raw_path}; move it away to score again")
    return journal


def score_choices(engine, rows: Sequence[Dict[str, str]], journal: CsvJournal, method: str, *, progress: bool = True,
                  questions: Optional[Dict[str, str]] = None,
                  image_loader: Optional[Callable[[str], torch.Tensor]] = None) -> None:
    """The rows not yet in ``journal`` scored by ``method`` (``letter`` or ``loglik``), appended as they go."""
    if method == "letter":
        score_letter(engine, rows, journal, progress=progress, questions=questions)
    else:
        score_loglik(engine, rows, journal, image_loader, progress=progress)


def _key(i: int, row: Dict[str, str]) -> str:
    return f"score:{i}:{row.get('question_id', '')}"


def _question(row: Dict[str, str], questions: Optional[Dict[str, str]]) -> str:
    qid = row.get("question_id", "")
    if questions is not None and qid in questions:
        return questions[qid]
    return question_from_instruction(row["instruction"])  # a file made elsewhere: read it back


def score_letter(
    engine, rows: Sequence[Dict[str, str]], journal: CsvJournal, *, progress: bool = True,
    questions: Optional[Dict[str, str]] = None,
) -> None:
    done = len(journal)
    bar = progress_bar(len(rows) - done, "scoring (letter)", "q", enabled=progress)
    chunk = getattr(engine, "chunk_size", engine.batch_size)  # several batches: continuous batching refills slots
    for lo in range(done, len(rows), chunk):
        batch = rows[lo : lo + chunk]
        prompts, opts = [], []
        for r in batch:
            options = row_options(r)
            opts.append(options)
            question = _question(r, questions)
            prompts.append(engine.prompt(letter_prompt(question, r["generated"], options), has_image=False))
        replies = engine.generate_texts(
            prompts, [None] * len(batch), LETTER_MAX_NEW_TOKENS, [_key(lo + k, r) for k, r in enumerate(batch)]
        )
        out = []
        for r, options, reply in zip(batch, opts, replies):
            letter = read_letter(reply)
            out.append({**r, "predict_generated": reply, "predict": letter, "correct": is_correct(letter, options, r["output"])})
        journal.append(out)
        bar.update(len(batch))
    bar.close()


def score_loglik(
    engine,
    rows: Sequence[Dict[str, str]],
    journal: CsvJournal,
    image_loader: Callable[[str], torch.Tensor],
    *,
    progress: bool = True,
    reduction: str = "sum",
) -> None:
    done = len(journal)
    bar = progress_bar(len(rows) - done, "scoring (loglik)", "q", enabled=progress)
    for lo in range(done, len(rows), engine.batch_size):
        batch = rows[lo : lo + engine.batch_size]
        prompts, images, opts = [], [], []
        for r in batch:
            tokens, has_image = prompt_tokens_from_text(engine.tokenizer, r["instruction"], num_image_tokens=engine.num_image_tokens)
            image = None
            if has_image:
                try:
                    image = image_loader(r["image"])
                except BadSample as e:
                    raise BadSample(f"cannot score row {lo}: {e.reason}") from e
            prompts.append(tokens)
            images.append(image)
            opts.append({L: v for L, v in row_options(r).items() if v != ""})
        scores = engine.score_options(prompts, images, [list(o.values()) for o in opts], reduction=reduction)
        out = []
        for r, o, s in zip(batch, opts, scores):
            letters = list(o)
            best = max(range(len(s)), key=lambda k: s[k]) if s else None
            letter = letters[best] if best is not None else ""
            out.append(
                {
                    **r,
                    "predict_generated": json.dumps({L: round(v, 6) for L, v in zip(letters, s)}),
                    "predict": letter,
                    "correct": is_correct(letter, row_options(r), r["output"]),
                }
            )
        journal.append(out)
        bar.update(len(batch))
    bar.close()
