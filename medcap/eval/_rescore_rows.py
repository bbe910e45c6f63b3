"""``medcap rescore``'s checks of every row and every stated number of a scored file.

A scored file's cells are recomputed from the row's own inputs (reply, answer, options,
the letter in ``predict``) and compared one by one; so are the numbers stated beside the
file (the ``-summary.json`` of a benchmark, the per-modality breakdown of OmniMedVQA).
Nothing here needs a model: the letter mapping and the judge's replies are inputs, read
from the row (``predict``, ``judge_reply``), and what follows from them is checked.

* ``Differences``: the cells that differ, counted, the first few kept with the row's id;
* ``check_benchmark_rows`` / ``check_choice_rows``: a benchmark's / OmniMedVQA's rows;
* ``check_summary``: the summary's overall, counts and each convention's headline;
* ``check_breakdown``: the per-modality breakdown (CSV and JSON) against the rows.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from medcap.eval._conventions import CHOICE_COLUMNS, row_cells

FIRST = 5  # differing cells listed by id
FLOAT_COLUMNS = ("token_recall", "token_f1", "llava_med_recall")


class Differences:
    """Cells whose stated value is not the recomputed one."""

    def __init__(self):
        self.count, self.first = 0, []

    def cell(self, i: int, row: Mapping[str, str], column: str, stated: Any, recomputed: Any) -> None:
        if _same(column, stated, recomputed):
            return
        self.count += 1
        if len(self.first) < FIRST:
            self.first.append({"row": i + 1 if i >= 0 else None, "id": row.get("question_id", "") or f"row {i + 1}",
                               "column": column,
                               "file": stated, "recomputed": "" if recomputed is None else recomputed})

    def as_dict(self) -> Dict[str, Any]:
        return {"count": self.count, "first": self.first}


def _same(column: str, stated: Any, recomputed: Any) -> bool:
    a, b = str(stated if stated is not None else ""), str(recomputed if recomputed is not None else "")
    if a == b:
        return True
    if column in FLOAT_COLUMNS or column.endswith("accuracy"):
        try:
            return abs(float(a) - float(b)) <= 1e-6 + 1e-12
        except ValueError:
            return False
    return False


# ---- Rows


def check_benchmark_rows(rows: Sequence[Mapping[str, str]], suite: str, diff: Differences) -> List[Dict[str, Any]]:
    """Every cell medcap and the peers' conventions state, recomputed; returns the rows with
    the recomputed cells (for the headlines). Cells of columns the file lacks (a file made
    before they existed) are recomputed, not compared."""
    from medcap.eval._benchmark_scores import ROW_SCORE_COLUMNS, row_scores
    from medcap.eval._llm_judge import verdict

    out = []
    for i, r in enumerate(rows):
        mine = row_scores(r)
        cells = {c: ("" if mine is None else mine[c]) for c in ROW_SCORE_COLUMNS}
        cells.update(row_cells(r, suite))
        if r.get("judge_reply", ""):
            cells["judge_verdict"] = verdict(r["judge_reply"])
        elif "judge_verdict" in r:
            cells["judge_verdict"] = ""
        for column, value in cells.items():
            if column in r:
                diff.cell(i, r, column, r[column], value)
        out.append({**r, **cells})
    return out


def check_choice_rows(rows: Sequence[Mapping[str, str]], diff: Differences,
                      loglik: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    """OmniMedVQA: each ``correct`` from its ``predict`` letter (the reference's rule), the
    letter from the stored option scores (``loglik``), and the peers' cells."""
    from medcap.eval._choices import is_correct, row_options

    out = []
    for i, r in enumerate(rows):
        cells = {k: v for k, v in row_cells(r, "omnimedvqa").items() if k in CHOICE_COLUMNS}
        if loglik is not None:
            diff.cell(i, r, "predict", r.get("predict", ""), loglik[i])
        if "predict" in r:
            cells["correct"] = is_correct(r.get("predict", ""), row_options(r), r.get("output", ""))
        for column, value in cells.items():
            if column in r:
                diff.cell(i, r, column, r[column], value)
        out.append({**r, **cells})
    return out


# ---- What is stated beside the rows


def summary_beside(path: Path) -> Dict[str, Any]:
    """The ``-summary.json`` of a raw file or of its scored file (``{raw}-{acc}.csv``); {} if none."""
    import re

    stem = re.sub(r"-(\d+(\.\d+)?(e-?\d+)?|nan)$", "", path.stem)
    p = path.with_name(stem + "-summary.json")
    try:
        return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}
    except ValueError:
        return {}


COUNTS = (("rows", ("rows",)), ("scored", ("scored",)), ("unscored", ("unscored",)), ("closed_n", ("closed", "n")),
          ("open_n", ("open", "n")), ("choice_n", ("choice", "n")))
SUMMARY_SCORES = (("closed_accuracy", ("closed", "accuracy")), ("open_exact_match", ("open", "exact_match")),
                  ("open_token_recall", ("open", "token_recall")), ("open_token_f1", ("open", "token_f1")),
                  ("choice_accuracy", ("choice", "accuracy")))
CONVENTION_SCORES = (("medevalkit_overall", ("medevalkit", "overall")), ("medevalkit_closed", ("medevalkit", "closed")),
                     ("medevalkit_open", ("medevalkit", "open")), ("medevalkit_choice", ("medevalkit", "choice")),
                     ("medevalkit+judge_overall", ("medevalkit", "judged_overall")),
                     ("llava_med_open_recall", ("llava_med", "open_recall")),
                     ("llava_med_closed_accuracy", ("llava_med", "closed_accuracy")),
                     ("huatuo_accuracy", ("huatuo", "accuracy")))


def _at(tree: Mapping[str, Any], keys: Sequence[str]) -> Any:
    for k in keys:
        if not isinstance(tree, Mapping) or k not in tree:
            return None
        tree = tree[k]
    return tree


def check_summary(scores: Dict[str, Any], mine: Mapping[str, Any], conventions: Mapping[str, Any],
                  stated: Mapping[str, Any], scored: bool) -> None:
    """Adds to ``scores`` each count, score and convention headline: the summary's value
    (``stated``; none for a raw file) beside the recomputed one."""
    for name, keys in COUNTS + SUMMARY_SCORES:
        if _at(mine, keys) is not None:
            scores[name] = {"file": _at(stated.get("scores", {}), keys) if scored else None, "recomputed": _at(mine, keys)}
    for name, keys in CONVENTION_SCORES:
        if _at(conventions, keys) is not None or (scored and _at(stated.get("conventions", {}), keys) is not None):
            scores[name] = {"file": _at(stated.get("conventions", {}), keys) if scored else None,
                            "recomputed": _at(conventions, keys)}


def check_breakdown(scored_path: Path, per: Mapping[str, Mapping[str, Any]], macro: float,
                    diff: Differences) -> List[str]:
    """The per-modality breakdown files of a scored OmniMedVQA file against ``per`` (recomputed
    from its rows): each modality's n, correct and accuracy, and the JSON's macro accuracy.
    Returns the breakdown files found."""
    from medcap.eval._omnimedvqa import modality_csv_path
    from medcap.eval._results import read_csv_rows

    found = []
    legacy = scored_path.with_name(scored_path.stem + "-modality.csv")
    for path in (modality_csv_path(scored_path), legacy):
        if path.is_file():
            found.append(str(path))
            stated = {r.get("modality_type", ""): r for r in read_csv_rows(path)}
            _compare_modalities(stated, per, path.name, diff)
    js = scored_path.with_name(scored_path.stem + "-modality.json")
    if js.is_file():
        found.append(str(js))
        try:
            data = json.loads(js.read_text(encoding="utf-8"))
        except ValueError:
            data = {}
        _compare_modalities(data.get("per_modality", {}), per, js.name, diff)
        stated_macro = data.get("macro_accuracy")
        if not (isinstance(stated_macro, float) and math.isnan(stated_macro) and math.isnan(macro)):
            diff.cell(-1, {"question_id": js.name}, "macro_accuracy", stated_macro, macro)
    return found


def _compare_modalities(stated: Mapping[str, Any], per: Mapping[str, Mapping[str, Any]], where: str,
                        diff: Differences) -> None:
    for modality in sorted(set(stated) | set(per)):
        s, m = stated.get(modality, {}), per.get(modality, {})
        for column in ("n", "correct", "accuracy"):
            diff.cell(-1, {"question_id": f"{where}: {modality}"}, column, s.get(column, ""), m.get(column, ""))

