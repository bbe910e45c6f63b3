"""``medcap rescore FILE...``: every score recomputed from the rows on disk, no model.

Prints, per file, each score the file states (its name, its cells, the summary or
breakdown beside it) next to the score recomputed from its rows, under medcap's rules
and each peer's convention (``_conventions``; the header names them and the judge);
every row's cells are recomputed too (``_rescore_rows``). Kinds of file (README has
the whole table): OmniMedVQA scored and raw files (``letter_*``, ``medevalkit_overall``,
``huatuo_*``, ``nearest_*``, ``loglik_*``), the per-modality breakdown
(``modality-{scored}.csv``), judged files (``-70B_``), caption metrics
(``metrics-raw-CKPT``), and the field's benchmarks (medcap's ``overall``,
``medevalkit[+judge]_*``, ``llava_med_*``, ``huatuo_accuracy``).

A stated number that differs, or any row whose cells differ (the first few are named by
id), makes the command exit 1.

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
from medcap.eval._rescore_rows import Differences, check_benchmark_rows, check_breakdown, check_choice_rows, check_summary
from medcap.eval._rescore_rows import summary_beside

TOLERANCE = 1e-6
CONVENTIONS_NAMED = "medcap (own rules), medevalkit, llava_med, huatuo"
BREAKDOWN_PREFIX = "modality-"


def _options(row: Dict[str, str]) -> Dict[str, str]:
    return {L: row.get(f"option_{L}", "") or "" for L in ("A", "B", "C", "D")}


def nearest_option(answer: str, options: Dict[str, str]) -> str:
    """The letter of the option most similar to ``answer`` (difflib's ratio over the
    lower-cased texts), ties to the later option: the last step of HuatuoGPT-Vision's
    matching alone (its whole rule, letter then text then this, is ``huatuo``). Empty
    options are not candidates; empty when no option is given."""
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
    from medcap.eval._conventions import headlines
    from medcap.eval._omnimedvqa import accuracy_by_modality

    out: Dict[str, Any] = {"file": str(path), "kind": "omnimedvqa", "rows": len(rows), "scores": OrderedDict()}
    scores, diff = out["scores"], Differences()
    nearest = [is_correct(nearest_option(r.get("generated", ""), _options(r)), _options(r), r.get("output", "")) for r in rows]
    loglik = _loglik_letters(rows) if "predict" in rows[0] else None
    mine = check_choice_rows(rows, diff, loglik)
    if "predict" in rows[0]:
        letters = [int(r["correct"]) for r in mine]
        column = [int(r.get("correct") or 0) for r in rows]
        stated = _macro_micro(rows, column)
        recomputed = _macro_micro(rows, letters)
        name_acc = _stated_accuracy(path)
        kind = "loglik" if loglik is not None else "letter"
        scores[f"{kind}_macro"] = {"file": name_acc if name_acc is not None else stated["macro"],
                                   "recomputed": recomputed["macro"]}
        scores[f"{kind}_micro"] = {"file": stated["micro"], "recomputed": recomputed["micro"]}
        scores["correct_column_agrees"] = {"file": sum(column), "recomputed": sum(letters)}
        if loglik is not None:
            by_scores = _macro_micro(rows, [is_correct(L, _options(r), r.get("output", "")) for r, L in zip(rows, loglik)])
            scores["loglik_argmax_macro"] = {"file": None, "recomputed": by_scores["macro"]}
        macro, per = accuracy_by_modality(mine)
        out["breakdown"] = check_breakdown(path, per, macro, diff)
    conventions = headlines(mine, "omnimedvqa")
    scores["medevalkit_overall"] = {"file": None, "recomputed": conventions["medevalkit"]["overall"]}
    huatuo = _macro_micro(mine, [int(r["huatuo_correct"] or 0) for r in mine])
    scores["huatuo_accuracy"] = {"file": None, "recomputed": huatuo["micro"]}
    scores["huatuo_macro"] = {"file": None, "recomputed": huatuo["macro"]}
    nm = _macro_micro(rows, nearest)
    scores["nearest_macro"] = {"file": None, "recomputed": nm["macro"]}
    scores["nearest_micro"] = {"file": None, "recomputed": nm["micro"]}
    out.update(conventions={"medcap": {"macro": scores.get("letter_macro", {}).get("recomputed")}, **conventions},
               judge="off", row_differences=diff.as_dict())
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


def rescore_benchmark(path: Path, rows: List[Dict[str, str]], stated_overall: Optional[float]) -> Dict[str, Any]:
    """A benchmark file (rows with ``answer_type``): every cell and score recomputed from the
    rows, next to what the file's name, its cells and its summary state. A raw file's
    choice rows are read by the nearest option (no model)."""
    from medcap.eval._benchmark_scores import HEADLINE, summarize
    from medcap.eval._conventions import headlines

    suite, scored, diff = path.name.split("-", 1)[0], "correct" in rows[0], Differences()
    if not scored:
        rows = [{**r, "predict": nearest_option(r.get("generated", ""), _options(r)) if r.get("answer_type") == "choice"
                 else ""} for r in rows]
    mine_rows = check_benchmark_rows(rows, suite, diff)
    mine = summarize(mine_rows)
    judged = any(r.get("judge_verdict", "") != "" for r in rows)
    conventions = headlines(mine_rows, suite, judged=judged)
    stated = summary_beside(path)
    scores: Dict[str, Any] = OrderedDict()
    if scored:
        scores[HEADLINE] = {"file": stated_overall if stated_overall is not None else stated.get("scores", {}).get(HEADLINE),
                            "recomputed": mine[HEADLINE]}
        scores["correct_column_agrees"] = {"file": sum(int(r["correct"]) for r in rows if r.get("correct", "") != ""),
                                           "recomputed": sum(int(r["correct"]) for r in mine_rows if r["correct"] != "")}
    else:
        choice = any(r.get("answer_type") == "choice" for r in rows)
        scores[f"{HEADLINE} (nearest option)" if choice else HEADLINE] = {"file": None, "recomputed": mine[HEADLINE]}
    check_summary(scores, mine, conventions, stated, scored)
    judge = stated.get("judge", "off") if scored else "off"
    if judged and judge == "off":
        judge = "on (no summary beside the file names it)"
    return {"file": str(path), "kind": "benchmark" + ("" if scored else " (raw)"), "rows": len(rows), "scores": scores,
            "conventions": {"medcap": {"overall": mine[HEADLINE]}, **conventions}, "judge": judge,
            "row_differences": diff.as_dict()}


def rescore_breakdown(path: Path) -> Dict[str, Any]:
    """A per-modality breakdown: said to be one, and checked against the scored file it sums up."""
    scored = path.with_name(path.name[len(BREAKDOWN_PREFIX):]) if path.name.startswith(BREAKDOWN_PREFIX) else \
        path.with_name(path.name[: -len("-modality.csv")] + ".csv")
    note = f"a per-modality breakdown of {scored.name}"
    if not scored.is_file():
        return {"file": str(path), "kind": "breakdown", "rows": 0, "scores": {}, "note": note + " (not found beside it)"}
    result = rescore_omnimedvqa(scored, read_csv_rows(scored))
    return {**result, "file": str(path), "kind": "breakdown", "note": note + ": checked with it"}


def rescore(path: str | Path) -> Dict[str, Any]:
    """Recompute every score of one results file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such results file: {str(path)!r}")
    rows = read_csv_rows(path)
    if not rows:
        return {"file": str(path), "kind": "empty", "rows": 0, "scores": {}}
    cols = set(rows[0])
    if {"modality_type", "n", "correct", "accuracy"} <= cols and "output" not in cols:
        return rescore_breakdown(path)
    if "-70B_" in path.name and {"instruction", "generated"} <= cols and "output" not in cols:
        return rescore_judged(path, rows)
    if {"answer_type", "output", "generated"} <= cols:  # SLAKE, PathVQA, VQA-RAD (HF), PMC-VQA, questions
        return rescore_benchmark(path, rows, _stated_accuracy(path))
    if {"option_A", "option_B", "output", "generated"} <= cols:
        return rescore_omnimedvqa(path, rows)
    if path.name.startswith("metrics-raw-") and {"output", "generated"} <= cols:
        return rescore_metrics(path, rows)
    what = ("VQA-RAD's closed answers are scored by an LLM judge: judge this file with tools/judge.py --exp eval_vqa"
            if path.name.startswith("vqarad-") and {"instruction", "output", "generated"} <= cols
            else "not a results file medcap scores (columns: " + ", ".join(sorted(cols)[:8]) + ")")
    return {"file": str(path), "kind": "unscored", "rows": len(rows), "scores": {}, "note": what}


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


def _judge_text(judge: Any) -> str:
    if not judge or judge == "off":
        return "judge: off"
    return f"judge: {judge.get('model')} at {judge.get('endpoint')}" if isinstance(judge, dict) else f"judge: {judge}"


def agrees(result: Dict[str, Any]) -> bool:
    """Every stated score agrees and no row's cells differ."""
    rows_ok = result.get("row_differences", {}).get("count", 0) == 0
    return rows_ok and all(_agrees(e) is not False for e in result["scores"].values())


def print_report(result: Dict[str, Any]) -> bool:
    """Prints one file's table; returns False when a stated score or a row's cell disagrees."""
    print(f"{result['file']}  ({result['kind']}, {result['rows']} rows)")
    if "conventions" in result:
        print(f"  conventions: {CONVENTIONS_NAMED}; {_judge_text(result.get('judge'))}")
    if result.get("note"):
        print(f"  {result['note']}")
    if result["scores"]:
        print(f"  {'score':<28s} {'file':>12s} {'recomputed':>12s}")
    for name, entry in result["scores"].items():
        agree = _agrees(entry)
        mark = "" if agree is None else ("  ok" if agree else "  DIFFERS")
        print(f"  {name:<28s} {_fmt(entry.get('file')):>12s} {_fmt(entry.get('recomputed')):>12s}{mark}")
    diff = result.get("row_differences")
    if diff is not None:
        if diff["count"] == 0:
            print("  every row's cells: ok")
        else:
            print(f"  cells that differ: {diff['count']} (DIFFERS); the first:")
            for d in diff["first"]:
                where = f"row {d['row']} (id {d['id']})" if d["row"] is not None else str(d["id"])
                print(f"    {where}: {d['column']} is {d['file']!r} in the file, {d['recomputed']!r} recomputed")
    return agrees(result)


def rescore_main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="medcap rescore",
        description="Recompute every score of results files from their rows (no model needed), "
        "next to the numbers the files state, with the field's other scoring conventions.",
    )
    p.add_argument("files", nargs="+", help="results CSV files: scored or raw benchmark and OmniMedVQA files, "
                   "per-modality breakdowns, judged VQA, metrics-raw")
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
            ok &= agrees(result)
        else:
            ok &= print_report(result)
    return 0 if ok else 1
