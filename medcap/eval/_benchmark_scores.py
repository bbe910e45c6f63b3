"""medcap's own VQA scores (SLAKE, PathVQA, VQA-RAD (HF), PMC-VQA, your questions), per
row and per file, computed from the rows on disk. The peers' own conventions beside
them are ``_conventions``'s; ``datasets/README.md`` says which number compares with
which published table.

medcap's own rules: they start from MedEvalKit's and differ where its rule misreads a
reply (why, rule by rule: docs/internals.md and datasets/README.md; checked by hand in
``tests/eval/test_benchmark_scores.py``; the peers' own rules are in ``_conventions``):

* **closed**: lower-cased, cut after the last answer marker; yes/no by "exactly one of
  yes/no occurs", other closed answers by equality (``closed_correct``);
* **open**: ``exact_match``, ``token_recall``, ``token_f1`` (repeats clipped);
* **choice**: the letter in ``predict`` against the answer's option.

``correct`` is 1/0 per row; **overall** is right answers over all scored questions,
without an LLM judge (``summarize``). Rows without a reference answer are not scored.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Dict, List, Mapping, Optional, Sequence

from medcap.eval._choices import is_correct, row_options

ANSWER_TYPES = ("closed", "open", "choice")
YES_NO = ("yes", "no")
# MedEvalKit's answer markers, in its order: the reply is cut after the last occurrence of each.
ANSWER_MARKERS = ("**answer**:", "**answer**", "*answer*:", "**answer:**", "answer is", "answer:",
                  "答案:", "final answer", "final answer is")
ROW_SCORE_COLUMNS = ("correct", "exact_match", "token_recall", "token_f1")
HEADLINE = "overall"
CONVENTION = ("overall = medcap's rules (closed: yes/no read from the lower-cased reply; open: exact match; "
              "choice: the mapped letter), micro over questions, no judge")


def answer_kind(answer: str) -> str:
    """``closed`` when the answer is yes or no (how PathVQA and VQA-RAD are split), else ``open``."""
    return "closed" if str(answer).strip().lower() in YES_NO else "open"


def parsed_reply(reply: str) -> str:
    text = str(reply or "").lower()
    for marker in ANSWER_MARKERS:
        if marker in text:
            text = text.split(marker)[-1]
    return text


def _flat(text: str) -> str:
    return text.replace("\n", "").replace(".", "").strip()


def closed_correct(answer: str, reply: str) -> int:
    a, r = _flat(str(answer).lower()), _flat(parsed_reply(reply))
    if a in YES_NO:
        return int((("yes" in r) != ("no" in r)) and a in r)
    return int(r == a)


def exact_match(answer: str, reply: str) -> int:
    return int(parsed_reply(reply).strip() == str(answer).lower().strip())


def words(text: str) -> Counter:
    return Counter(re.findall(r"[^\W_]+", str(text or "").lower()))


def token_scores(answer: str, reply: str) -> Dict[str, float]:
    """``recall`` (answer words found in the reply), ``precision`` and ``f1``; 0 when either is empty."""
    ref, hyp = words(answer), words(reply)
    common = sum((ref & hyp).values())
    recall = common / sum(ref.values()) if ref else 0.0
    precision = common / sum(hyp.values()) if hyp else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"recall": recall, "precision": precision, "f1": f1}


def row_scores(row: Mapping[str, str]) -> Optional[Dict[str, Any]]:
    """The per-row scores (``ROW_SCORE_COLUMNS``) of a raw or scored row; None when the
    row has no reference answer. A choice row needs its ``predict`` letter."""
    kind, answer, reply = row.get("answer_type", ""), row.get("output", ""), row.get("generated", "")
    if answer == "" or kind not in ANSWER_TYPES:
        return None
    tokens = token_scores(answer, reply)
    out: Dict[str, Any] = {"exact_match": exact_match(answer, reply), "token_recall": round(tokens["recall"], 6),
                           "token_f1": round(tokens["f1"], 6)}
    if kind == "closed":
        out["correct"] = closed_correct(answer, reply)
    elif kind == "open":
        out["correct"] = out["exact_match"]
    else:
        out["correct"] = is_correct(row.get("predict", ""), row_options(row), answer)
    return out


def _mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def summarize(rows: Sequence[Mapping[str, str]], correct: Optional[Sequence[Optional[int]]] = None) -> Dict[str, Any]:
    """Per question type and overall, from rows (scored or raw). ``correct`` overrides the
    rows' own rule per row (None: unscored)."""
    by_kind: Dict[str, List[Dict[str, Any]]] = {k: [] for k in ANSWER_TYPES}
    unscored = 0
    for i, r in enumerate(rows):
        s = row_scores(r)
        if s is None:
            unscored += 1
            continue
        if correct is not None and correct[i] is not None:
            s["correct"] = int(correct[i])
        by_kind[r["answer_type"]].append(s)
    out: Dict[str, Any] = {"rows": len(rows), "scored": sum(len(v) for v in by_kind.values()), "unscored": unscored}
    if by_kind["closed"]:
        out["closed"] = {"n": len(by_kind["closed"]), "accuracy": _mean([s["correct"] for s in by_kind["closed"]])}
    if by_kind["open"]:
        o = by_kind["open"]
        out["open"] = {"n": len(o), "exact_match": _mean([s["exact_match"] for s in o]),
                       "token_recall": _mean([s["token_recall"] for s in o]), "token_f1": _mean([s["token_f1"] for s in o])}
    if by_kind["choice"]:
        out["choice"] = {"n": len(by_kind["choice"]), "accuracy": _mean([s["correct"] for s in by_kind["choice"]])}
    every = [s["correct"] for v in by_kind.values() for s in v]
    out[HEADLINE] = _mean(every)
    return out
