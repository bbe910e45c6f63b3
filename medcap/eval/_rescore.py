"""``medcap rescore FILE...``: every score recomputed from the rows on disk, no model.

Prints, per file, each score the file states (its name, its ``correct`` column, the
file beside it) next to the score recomputed from its rows, and the field's other
conventions from the same rows (the table is in README, "Rescore"):

* OmniMedVQA scored and raw files: ``letter_*`` (the reference's macro accuracy, and
  micro), ``nearest_*`` (the free answer's most similar option), ``loglik_*``;
* judged files (``-70B_``): ``judge_accuracy``;
* ``metrics-raw-CKPT``: the seven caption metrics, against ``metrics-CKPT.csv``;
* the field's benchmarks: ``overall``, closed, open and choice scores (``_benchmark_scores``).

In this file, in order: the nearest-option rule, one ``rescore_*`` per kind of file,
``rescore`` (which tells the kind from the columns and the name), and the command.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import re
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from medcap.eval._results import read_csv_rows

TOLERANCE = 1e-6


def _options(row: Dict[str, str]) -> Dict[str, str]:
    return {L: row.get(f"option_{L}", "") or "" for L in ("A", "B", "C", "D")}


def nearest_option(answer: str, options: Dict[str, str]) -> str:
    """The letter of the option most similar to ``answer`` (difflib's ratio over the
    lower-cased texts); ties go to the later option, as ``>=`` does in HuatuoGPT-Vision's
    matching. Empty options are not candidates; empty when no option is given."""
    best, best_ratio = "", -1.0
    for letter, text in options.items():
        if text == "":
            continue
        ratio = difflib.SequenceMatcher(None, text.lower(), (answer or "").lower()).ratio()
        if ratio >= best_ratio:
            best, best_ratio = letter, ratio
    return best


def _macro_micro(rows: Sequence[Dict[str, str]], correct: Sequence[int]) -> Dict[str, float]:
    groups: Dict[str, List[int]] = OrderedDict()
    for r, c in zip(rows, correct):
        groups.setdefault(r.get("modality_type", "") or "all", []).append(int(c))
    per = [sum(v) / len(v) for _, v in sorted(groups.items())]
    return {
        "macro": sum(per) / len(per) if per else float("nan"),
        "micro": sum(correct) / len(correct) if correct else float("nan"),
    }


def _stated_accuracy(path: Path) -> Optional[float]:
    """The accuracy a scored file's name states (``...-0.1234.csv``), if any."""
    m = re.search(r"-((?:\d+(?:\.\d+)?(?:e-?\d+)?)|nan)\.csv$", path.name)
    return float(m.group(1)) if m else None


def rescore_omnimedvqa(path: Path, rows: List[Dict[str, str]]) -> Dict[str, Any]:
    from medcap.eval._choices import is_correct

    out: Dict[str, Any] = {"file": str(path), "kind": "omnimedvqa", "rows": len(rows), "scores": OrderedDict()}
    scores = out["scores"]
    nearest = [is_correct(nearest_option(r.get("generated", ""), _options(r)), _options(r), r.get("output", "")) for r in rows]
    if "predict" in rows[0]:
        letters = [is_correct(r.get("predict", ""), _options(r), r.get("output", "")) for r in rows]
        column = [int(r.get("correct") or 0) for r in rows]
        stated = _macro_micro(rows, column)
        mine = _macro_micro(rows, letters)
        name_acc = _stated_accuracy(path)
        loglik = _loglik_letters(rows)
        kind = "loglik" if loglik is not None else "letter"
        scores[f"{kind}_macro"] = {"file": name_acc if name_acc is not None else stated["macro"], "recomputed": mine["macro"]}
        scores[f"{kind}_micro"] = {"file": stated["micro"], "recomputed": mine["micro"]}
        scores["correct_column_agrees"] = {"file": sum(column), "recomputed": sum(letters)}
        if loglik is not None:
            by_scores = _macro_micro(rows, [is_correct(L, _options(r), r.get("output", "")) for r, L in zip(rows, loglik)])
            scores["loglik_argmax_macro"] = {"file": None, "recomputed": by_scores["macro"]}
    nm = _macro_micro(rows, nearest)
    scores["nearest_macro"] = {"file": None, "recomputed": nm["macro"]}
    scores["nearest_micro"] = {"file": None, "recomputed": nm["micro"]}
    return out


def _loglik_letters(rows: Sequence[Dict[str, str]]) -> Optional[List[str]]:
    """The argmax letter of each row's stored option scores; None if the file holds none."""
    letters = []
    for r in rows:
        try:
            scores = json.loads(r.get("predict_generated", ""))
        except ValueError:
            return None
        if not isinstance(scores, dict) or not scores:
            return None
        letters.append(max(scores, key=lambda k: scores[k]))
    return letters


def rescore_judged(path: Path, rows: List[Dict[str, str]]) -> Dict[str, Any]:
    from medcap.eval._judge import is_right

    right = [is_right(r.get("generated", "")) for r in rows]
    acc = sum(right) / len(right) if right else float("nan")
    return {"file": str(path), "kind": "judged", "rows": len(rows),
            "scores": {"judge_accuracy": {"file": _stated_accuracy(path), "recomputed": acc}}}


def rescore_metrics(path: Path, rows: List[Dict[str, str]]) -> Dict[str, Any]:
    from medcap.eval._captions import caption_metrics

    stated: Dict[str, float] = {}
    metrics_file = path.with_name(path.name.replace("metrics-raw-", "metrics-", 1))
    if metrics_file.is_file():
        for line in metrics_file.read_text(encoding="utf-8-sig").splitlines():
            if "," in line:
                k, v = line.split(",", 1)
                stated[k.strip()] = float(v)
    mine = caption_metrics([r["output"] for r in rows], [r["generated"] for r in rows])
    return {"file": str(path), "kind": "captioning", "rows": len(rows), "metrics_file": str(metrics_file),
            "scores": {k: {"file": stated.get(k), "recomputed": v} for k, v in mine.items()}}

_SUMMARY_KEYS = (("closed", "accuracy"), ("open", "exact_match"), ("open", "token_recall"), ("open", "token_f1"),
                 ("choice", "accuracy"))


def rescore_benchmark(path: Path, rows: List[Dict[str, str]], stated_overall: Optional[float]) -> Dict[str, Any]:
    """A benchmark file (rows with ``answer_type``): every score recomputed from the rows,
    next to what the file's name, its ``correct`` column and its summary state. A raw
    file's choice rows are read by the nearest option (no model)."""
    from medcap.eval._benchmark_scores import HEADLINE, row_scores, summarize

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


def _summary_beside(path: Path) -> Dict[str, Any]:
    """The ``-summary.json`` of a raw file or of its scored file (``{raw}-{acc}.csv``)."""
    stem = re.sub(r"-(\d+(\.\d+)?(e-?\d+)?|nan)$", "", path.stem)
    p = path.with_name(stem + "-summary.json")
    try:
        return json.loads(p.read_text(encoding="utf-8")).get("scores", {}) if p.is_file() else {}
    except ValueError:
        return {}


def rescore(path: str | Path) -> Dict[str, Any]:
    """Recompute every score of one results file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such results file: {str(path)!r}")
    rows = read_csv_rows(path)
    if not rows:
        return {"file": str(path), "kind": "empty", "rows": 0, "scores": {}}
    cols = set(rows[0])
    if "-70B_" in path.name and {"instruction", "generated"} <= cols and "output" not in cols:
        return rescore_judged(path, rows)
    if {"answer_type", "output", "generated"} <= cols:  # SLAKE, PathVQA, VQA-RAD (HF), PMC-VQA, questions
        return rescore_benchmark(path, rows, _stated_accuracy(path))
    if {"option_A", "option_B", "output", "generated"} <= cols:
        return rescore_omnimedvqa(path, rows)
    if path.name.startswith("metrics-raw-") and {"output", "generated"} <= cols:
        return rescore_metrics(path, rows)
    return {"file": str(path), "kind": "unscored", "rows": len(rows), "scores": {},
            "note": "no score can be computed from these rows without a model (judge VQA-RAD files with tools/judge.py)"}


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6f}"
    return str(v)


def _agrees(entry: Dict[str, Any]) -> Optional[bool]:
    a, b = entry.get("file"), entry.get("recomputed")
    if a is None or b is None:
        return None
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    # File names round to 4 or 5 places: agree within that rounding.
    return abs(float(a) - float(b)) <= max(TOLERANCE, 0.5e-4 + 1e-12)


def print_report(result: Dict[str, Any]) -> bool:
    """Prints one file's table; returns False when a stated score disagrees."""
    print(f"{result['file']}  ({result['kind']}, {result['rows']} rows)")
    if result.get("note"):
        print(f"  {result['note']}")
    ok = True
    if result["scores"]:
        print(f"  {'score':<24s} {'file':>12s} {'recomputed':>12s}")
    for name, entry in result["scores"].items():
        agree = _agrees(entry)
        ok &= agree is not False
        mark = "" if agree is None else ("  ok" if agree else "  DIFFERS")
        print(f"  {name:<24s} {_fmt(entry.get('file')):>12s} {_fmt(entry.get('recomputed')):>12s}{mark}")
    return ok


def rescore_main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="medcap rescore",
        description="Recompute every score of results files from their rows (no model needed), "
        "next to the numbers the files state, with the field's other scoring conventions.",
    )
    p.add_argument("files", nargs="+", help="results CSV files (scored or raw OmniMedVQA, judged VQA, metrics-raw)")
    p.add_argument("--json", action="store_true", help="print one JSON object per file instead of tables")
    args = p.parse_args(argv)
    ok = True
    for f in args.files:
        try:
            result = rescore(f)
        except (OSError, ValueError) as e:
            print(f"medcap rescore: error: {e}", file=sys.stderr)
            return 2
        if args.json:
            print(json.dumps(result, default=lambda v: None))
            ok &= all(_agrees(e) is not False for e in result["scores"].values())
        else:
            ok &= print_report(result)
    return 0 if ok else 1
