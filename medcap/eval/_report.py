"""``medcap report RESULTS_DIR...``: one table of every checkpoint's headline scores.

Rows are checkpoints (the ``ckpt`` of the file names, prefixed with the results
folder when several folders are given), columns the suites. Each cell is
recomputed from the rows on disk, never copied from a summary:

* SLAKE, PathVQA, VQA-RAD (HF), PMC-VQA, questions: ``overall``, MedEvalKit's
  total accuracy (``medcap.eval._benchmark_scores``), from the newest scored file
  ``{prefix}-{vqa_type}-raw-{ckpt}-{acc}.csv``;
* OmniMedVQA: the reference's macro accuracy over modalities (letter mapping,
  or log-likelihood), from ``omnimedvqa-...-raw-{ckpt}-{idx}_{chunk}-{acc}.csv``.

A column is named ``suite`` alone, or ``suite (vqa_type)`` when the folders hold
more than one vqa_type. Written beside the table: ``--out`` + ``.csv``, ``.md``
and ``.png`` (default ``report`` in the first folder).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from medcap._io import atomic_write_text
from medcap.eval._results import read_csv_rows, write_csv_atomic

HEADER = ("scores in % of questions; SLAKE, PathVQA, VQA-RAD (HF), PMC-VQA, questions: MedEvalKit's total accuracy "
          "(closed: yes/no read from the reply, open: exact match, choice: mapped letter), micro over questions; "
          "OmniMedVQA: the reference's macro accuracy over modalities")
_SCORED = re.compile(r"^(?P<prefix>[a-z]+)-(?P<vqa>[a-z_]+)-raw-(?P<ckpt>.+?)(?P<chunk>-\d+_\d+)?(?P<loglik>-loglik)?-"
                     r"(?P<acc>\d+(?:\.\d+)?(?:e-?\d+)?|nan)\.csv$")


def _title(prefix: str) -> Optional[str]:
    from medcap.eval._benchmark_readers import PREFIX_TITLES

    if prefix == "omnimedvqa":
        return "OmniMedVQA"
    return PREFIX_TITLES.get(prefix)


def _score(prefix: str, path: Path) -> float:
    rows = read_csv_rows(path)
    if prefix == "omnimedvqa":
        from medcap.eval._omnimedvqa import accuracy_by_modality

        return accuracy_by_modality(rows)[0] if rows else float("nan")
    from medcap.eval._benchmark_scores import HEADLINE, summarize

    value = summarize(rows)[HEADLINE]
    return float("nan") if value is None else value


def collect(dirs: Sequence[str | Path]) -> Tuple[List[str], List[str], Dict[Tuple[str, str], float]]:
    """``(checkpoints, columns, {(checkpoint, column): score})`` over the folders."""
    found = []  # (row, suite, vqa_type, mtime, path, prefix)
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            raise FileNotFoundError(f"no such results folder: {str(d)!r}")
        for p in sorted(d.rglob("*-raw-*.csv")):
            m = _SCORED.match(p.name)
            if not m or "debug" in p.relative_to(d).parts or _title(m["prefix"]) is None:
                continue
            row = m["ckpt"] if len(dirs) == 1 else f"{d.name}/{m['ckpt']}"
            found.append((row, _title(m["prefix"]) + (" loglik" if m["loglik"] else ""), m["vqa"], p.stat().st_mtime, p,
                          m["prefix"]))
    several_types = len({f[2] for f in found}) > 1
    cells: Dict[Tuple[str, str], Tuple[float, Path, str]] = {}
    for row, suite, vqa, mtime, p, prefix in found:
        column = f"{suite} ({vqa})" if several_types else suite
        if (row, column) not in cells or mtime >= cells[(row, column)][0]:
            cells[(row, column)] = (mtime, p, prefix)  # the newest scoring of a file wins
    rows = sorted({r for r, _ in cells})
    columns = sorted({c for _, c in cells})
    return rows, columns, {k: _score(prefix, p) for k, (_, p, prefix) in cells.items()}


def _cell(v: Optional[float]) -> str:
    return "-" if v is None or math.isnan(v) else f"{100 * v:.1f}"


def table_lines(rows: List[str], columns: List[str], scores: Dict[Tuple[str, str], float], markdown: bool) -> List[str]:
    head = ["checkpoint"] + columns
    body = [[r] + [_cell(scores.get((r, c))) for c in columns] for r in rows]
    if markdown:
        return ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"] + [
            "| " + " | ".join(b) + " |" for b in body]
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    return ["  ".join(x[i].ljust(widths[i]) for i in range(len(head))) for x in [head] + body]


def write_report(out: Path, rows, columns, scores) -> List[Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    csv_path = write_csv_atomic(out.with_name(out.name + ".csv"), ["checkpoint"] + columns, [
        {"checkpoint": r, **{c: ("" if scores.get((r, c)) is None or math.isnan(scores[(r, c)]) else f"{scores[(r, c)]:.6f}")
                             for c in columns}} for r in rows])
    md = out.with_name(out.name + ".md")
    atomic_write_text(md, f"{HEADER}\n\n" + "\n".join(table_lines(rows, columns, scores, markdown=True)) + "\n")
    return [csv_path, md, _chart(out.with_name(out.name + ".png"), rows, columns, scores)]


def _chart(path: Path, rows, columns, scores) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    width = 0.8 / max(1, len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(columns) + 2), 4.5))
    for k, r in enumerate(rows):
        vals = [scores.get((r, c), float("nan")) for c in columns]
        ax.bar([i + k * width for i in range(len(columns))], [0 if math.isnan(v) else 100 * v for v in vals], width, label=r)
    ax.set_xticks([i + width * (len(rows) - 1) / 2 for i in range(len(columns))])
    ax.set_xticklabels(columns, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 105)
    ax.set_title("medcap report: MedEvalKit total accuracy; OmniMedVQA macro accuracy", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def report_main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="medcap report", description="One table of the headline scores of every "
                                "checkpoint in the results folders (recomputed from the rows), as CSV, Markdown and PNG.")
    p.add_argument("dirs", nargs="+", metavar="RESULTS_DIR", help="output_dir folders of medcap run generate")
    p.add_argument("--out", default=None, help="path prefix of the written files (default: RESULTS_DIR/report)")
    args = p.parse_args(argv)
    try:
        rows, columns, scores = collect(args.dirs)
    except (OSError, ValueError) as e:
        print(f"medcap report: error: {e}", file=sys.stderr)
        return 2
    if not rows:
        print(f"medcap report: no scored results files in {', '.join(args.dirs)}", file=sys.stderr)
        return 1
    print(HEADER)
    print("\n".join(table_lines(rows, columns, scores, markdown=False)))
    out = Path(args.out) if args.out else Path(args.dirs[0]) / "report"
    for f in write_report(out, rows, columns, scores):
        print(f"wrote {f}")
    return 0
