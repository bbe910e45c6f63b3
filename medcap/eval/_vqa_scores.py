"""The field's VQA scores, per row and per file, computed from the rows on disk.

Every rule here follows a published evaluation so that our numbers sit in the
same tables (each one re-implemented from its description, checked by hand in
``tests/eval/test_benchmarks_scores.py``):

* **closed** questions (``answer_type=closed``): MedEvalKit's rule
  (``judge_judgement`` in its ``utils/utils.py``). The reply is lower-cased,
  cut after the last answer marker (``answer:``, ``answer is``, ...), its
  newlines and full stops removed; a yes/no answer is right when exactly one of
  "yes" and "no" occurs in the reply (as substrings, as there) and the answer
  does. Other closed answers (SLAKE's "Which is bigger, ...?") must equal the
  reply (``judge_close_end_vqa``).
* **open** questions: ``exact_match`` (the parsed reply equals the answer,
  lower-cased: MedEvalKit's ``em``), ``token_recall`` (the share of the answer's
  words found in the reply: LLaVA-Med's open-question metric) and
  ``token_f1``. Words are runs of letters and digits, lower-cased; repeated
  words count as often as they occur in both (clipped counts).
* **choice** questions (PMC-VQA, your own with options): the letter in
  ``predict`` (letter mapping or log-likelihood, as OmniMedVQA) against the
  option equal to the answer (``_scoring.is_correct``).

``correct`` is 1/0 per row: the closed rule, the open exact match, or the
choice letter. The suite's **overall** score is MedEvalKit's "total metrics"
accuracy: right answers over all scored questions, closed and open together
(open counted right by exact match), which is the number its results table
reports per benchmark. Rows without a reference answer are not scored.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Dict, List, Mapping, Optional, Sequence

ANSWER_TYPES = ("closed", "open", "choice")
YES_NO = ("yes", "no")
# MedEvalKit's answer markers, in its order: the reply is cut after the last occurrence of each.
ANSWER_MARKERS = ("**answer**:", "**answer**", "*answer*:", "**answer:**", "answer is", "answer:",
                  "答案:", "final answer", "final answer is")
ROW_SCORE_COLUMNS = ("correct", "exact_match", "token_recall", "token_f1")
HEADLINE = "overall"
CONVENTION = ("overall = MedEvalKit's total accuracy (closed: yes/no read from the reply; open: exact match; "
              "choice: the mapped letter), micro over questions")


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
    from medcap.eval._scoring import is_correct, row_options

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


# ------------------------------------------------------------------ medcap rescore

_SUMMARY_KEYS = (("closed", "accuracy"), ("open", "exact_match"), ("open", "token_recall"), ("open", "token_f1"),
                 ("choice", "accuracy"))


def _summary_beside(path) -> Dict[str, Any]:
    """The ``-summary.json`` of a raw file or of its scored file (``{raw}-{acc}.csv``)."""
    import json
    from pathlib import Path

    path = Path(path)
    stem = re.sub(r"-(\d+(\.\d+)?(e-?\d+)?|nan)$", "", path.stem)
    p = path.with_name(stem + "-summary.json")
    try:
        return json.loads(p.read_text(encoding="utf-8")).get("scores", {}) if p.is_file() else {}
    except ValueError:
        return {}


def rescore_benchmark(path, rows: List[Dict[str, str]], stated_overall: Optional[float]) -> Dict[str, Any]:
    """``medcap rescore`` of a benchmark file (rows with ``answer_type``): every score
    recomputed from the rows, next to what the file's name, its ``correct`` column and
    its summary state. A raw file's choice rows are read by the nearest option (no model)."""
    from medcap.eval._rescore import _options, nearest_option

    scored = "correct" in rows[0]
    if scored:
        mine = summarize(rows)
        column = [int(r["correct"]) for r in rows if r.get("correct", "") != ""]
    else:
        letters = [nearest_option(r.get("generated", ""), _options(r)) if r.get("answer_type") == "choice" else ""
                   for r in rows]
        mine = summarize([{**r, "predict": L} for r, L in zip(rows, letters)])
    stated = _summary_beside(path)
    scores: Dict[str, Any] = {}
    if scored:
        scores[HEADLINE] = {"file": stated_overall if stated_overall is not None else stated.get(HEADLINE),
                            "recomputed": mine[HEADLINE]}
        scores["correct_column_agrees"] = {"file": sum(column), "recomputed": sum(
            s["correct"] for s in (row_scores(r) for r in rows) if s is not None)}
    else:
        scores[f"{HEADLINE} (nearest option)" if any(r.get("answer_type") == "choice" for r in rows) else HEADLINE] = {
            "file": None, "recomputed": mine[HEADLINE]}
    for kind, name in _SUMMARY_KEYS:
        if kind in mine:
            scores[f"{kind}_{name}"] = {"file": stated.get(kind, {}).get(name) if scored else None,
                                        "recomputed": mine[kind][name]}
    return {"file": str(path), "kind": "benchmark" + ("" if scored else " (raw)"), "rows": len(rows), "scores": scores}
