"""``medcap report RESULTS_DIR...``: one table of every checkpoint's headline scores, under
medcap's own rules, and a second under each peer's convention, named in its header.

Rows are checkpoints (the ``ckpt`` of the file names, parsed from the end of the name,
so ``model-3`` is one checkpoint), columns the suites; a file counts as scored by its
columns. Each cell is recomputed from the rows on disk:

* the field's benchmarks: medcap's ``overall`` and the peers' headlines;
* OmniMedVQA: the reference's macro accuracy over every chunk file of the checkpoint
  (chunks of different counts are refused, not mixed), and the peers' micro accuracy;
* VQA-RAD: the judge's accuracy from the judged file;
* captioning: BLEU-1, BLEU-4, METEOR, ROUGE-L and CIDEr as ``metrics-{ckpt}.csv`` states.

Written beside the tables: ``--out`` + ``.csv``, ``.md`` and ``.png`` (default
``report`` in the first folder).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from medcap._io import atomic_write_text
from medcap.eval._results import read_csv_rows, write_csv_atomic

HEADER = ("scores in % of questions, under medcap's own rules: SLAKE, PathVQA, VQA-RAD (HF), PMC-VQA, questions: right "
          "answers over all questions (closed: yes/no read from the lower-cased reply, open: exact match, choice: "
          "mapped letter), no judge; OmniMedVQA: the reference's macro accuracy over modalities; VQA-RAD (judge): the "
          "LLM judge's accuracy; captioning: pycocoevalcap's metrics")
PEER_HEADER = ("the peers' conventions, in % (datasets/README.md says which published table each compares with): "
               "[medevalkit] MedEvalKit's total accuracy by its rules (SLAKE's Yes/No as written, the space after "
               "'answer is' kept, \\boxed{} unwrapped; choices by its matcher), [medevalkit+judge] the same with the "
               "LLM judge's verdicts, [llava_med open] LLaVA-Med's open recall, [llava_med closed] its closed "
               "accuracy, [huatuo] HuatuoGPT-Vision's choice matching (micro)")
CAPTION_METRICS = (("Bleu_1", "BLEU-1"), ("Bleu_4", "BLEU-4"), ("METEOR", "METEOR"), ("ROUGE_L", "ROUGE-L"),
                   ("CIDEr", "CIDEr"))
_NAME = re.compile(r"(?P<prefix>[a-z]+)-(?P<vqa>[a-z_]+)-raw-(?P<rest>.+)-(?P<acc>\d+(?:\.\d+)?(?:e-?\d+)?|nan)\.csv")
_CHUNK = re.compile(r"(?P<ckpt>.+)-(?P<idx>\d+)_(?P<n>\d+)")
_JUDGED = re.compile(r"(?P<ckpt>.+)-70B_\d+bit")


@dataclass(frozen=True)
class Found:
    """One scored file: the table row and column it fills."""

    row: str
    suite: str  # the column's title (before any vqa_type)
    vqa: str
    prefix: str
    path: Path
    chunk: Optional[Tuple[int, int]] = None  # OmniMedVQA's (idx, n)

    @property
    def mtime(self) -> float:
        return self.path.stat().st_mtime


def _title(prefix: str) -> Optional[str]:
    from medcap.eval._benchmark_readers import PREFIX_TITLES

    return {"omnimedvqa": "OmniMedVQA", "vqarad": "VQA-RAD (judge)"}.get(prefix) or PREFIX_TITLES.get(prefix)


def _header(path: Path) -> List[str]:
    with open(path, encoding="utf-8-sig", newline="") as fh:
        return [c.strip() for c in fh.readline().split(",")]


def parse_scored(path: Path, row_prefix: str = "") -> Optional[Found]:
    """A scored results file's place in the table, or None for any other file (a raw file,
    a breakdown, a file of another program). The name is split from the end: the
    accuracy, then the suffixes the suite adds; what remains after ``-raw-`` is the
    checkpoint, whatever dashes it holds."""
    m = _NAME.fullmatch(path.name)
    title = _title(m["prefix"]) if m else None
    if title is None:
        return None
    rest, columns = m["rest"], _header(path)
    if m["prefix"] == "vqarad":
        judged = _JUDGED.fullmatch(rest)
        if judged is None or "generated" not in columns or "output" in columns:
            return None
        return Found(row_prefix + judged["ckpt"], title, m["vqa"], m["prefix"], path)
    if "correct" not in columns:
        return None  # a raw file whose checkpoint name ends in -NUMBER
    if m["prefix"] == "omnimedvqa":
        loglik = rest.endswith("-loglik")
        chunk = _CHUNK.fullmatch(rest[: -len("-loglik")] if loglik else rest)
        if chunk is None:
            return None
        return Found(row_prefix + chunk["ckpt"], title + (" loglik" if loglik else ""), m["vqa"], m["prefix"], path,
                     (int(chunk["idx"]), int(chunk["n"])))
    return Found(row_prefix + rest, title, m["vqa"], m["prefix"], path)


def _captions(d: Path, row_prefix: str) -> Dict[Tuple[str, str], float]:
    cells: Dict[Tuple[str, str], float] = {}
    for p in sorted(d.rglob("metrics-*.csv")):
        if p.name.startswith("metrics-raw-") or "debug" in p.relative_to(d).parts:
            continue
        stated: Dict[str, float] = {}
        for line in p.read_text(encoding="utf-8-sig").splitlines():
            key, _, value = line.partition(",")
            try:
                stated[key.strip()] = float(value)
            except ValueError:
                continue
        for key, column in CAPTION_METRICS:
            if key in stated:
                cells[(row_prefix + p.name[len("metrics-"):-len(".csv")], column)] = stated[key]
    return cells


# ---- Cells


def _benchmark_cells(f: Found) -> Dict[str, Optional[float]]:
    from medcap.eval._benchmark_scores import HEADLINE, summarize
    from medcap.eval._conventions import headlines, row_cells
    from medcap.eval._llm_judge import verdict

    rows = read_csv_rows(f.path)
    for r in rows:
        r.update(row_cells(r, f.prefix))
        if r.get("judge_reply", ""):
            r["judge_verdict"] = verdict(r["judge_reply"])
    judged = any(str(r.get("judge_verdict", "")) != "" for r in rows)
    peers = headlines(rows, f.prefix, judged=judged)
    mek, lm = peers["medevalkit"], peers.get("llava_med", {})
    return {"": summarize(rows)[HEADLINE], "medevalkit": mek.get("overall"), "medevalkit+judge": mek.get("judged_overall"),
            "llava_med open": lm.get("open_recall"), "llava_med closed": lm.get("closed_accuracy"),
            "huatuo": peers.get("huatuo", {}).get("accuracy")}


def _omnimedvqa_cells(files: Sequence[Found], notes: List[str]) -> Dict[str, Optional[float]]:
    """Every chunk of one checkpoint together: the newest scoring of each chunk, rows by question id."""
    from medcap.eval._conventions import headlines, row_cells
    from medcap.eval._omnimedvqa import accuracy_by_modality

    counts = sorted({f.chunk[1] for f in files})
    if len(counts) > 1:
        raise ValueError(f"{files[0].suite} results of {files[0].row} come in different chunkings "
                         f"({', '.join(sorted(f.path.name for f in files))}): move away those not to report")
    newest: Dict[int, Found] = {}
    for f in sorted(files, key=lambda f: f.mtime):
        newest[f.chunk[0]] = f
    rows: Dict[str, Dict[str, Any]] = OrderedDict()
    for idx in sorted(newest):
        for i, r in enumerate(read_csv_rows(newest[idx].path)):
            rows[r.get("question_id", "") or f"{idx}:{i}"] = {**r, **row_cells(r, "omnimedvqa")}
    if len(newest) > 1:
        notes.append(f"{files[0].suite} {files[0].row}: chunks {', '.join(f'{i}_{counts[0]}' for i in sorted(newest))} "
                     f"combined ({len(rows)} questions)")
    values = list(rows.values())
    peers = headlines(values, "omnimedvqa")
    return {"": accuracy_by_modality(values)[0] if values else float("nan"),
            "medevalkit": peers["medevalkit"]["overall"], "huatuo": peers.get("huatuo", {}).get("accuracy")}


def _judged_cells(f: Found) -> Dict[str, Optional[float]]:
    from medcap.eval._judge import is_right

    rows = read_csv_rows(f.path)
    return {"": sum(is_right(r.get("generated", "")) for r in rows) / len(rows) if rows else float("nan")}


# ---- The table


def _found(dirs: Sequence[str | Path]) -> Tuple[List[Found], Dict[Tuple[str, str], float]]:
    found, captions = [], {}
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            raise FileNotFoundError(f"no such results folder: {str(d)!r}")
        row_prefix = "" if len(dirs) == 1 else f"{d.name}/"
        for p in sorted(d.rglob("*-raw-*.csv")):
            if "debug" not in p.relative_to(d).parts:
                f = parse_scored(p, row_prefix)
                found += [f] if f is not None else []
        captions.update(_captions(d, row_prefix))
    return found, captions


def collect_all(dirs: Sequence[str | Path]) -> Tuple[List[str], List[str], Dict[Tuple[str, str], float], List[str]]:
    """``(checkpoints, columns, {(checkpoint, column): score}, notes)``: medcap's columns,
    then the captions', then the peers' (``suite [convention]``)."""
    found, captions = _found(dirs)
    several_types = len({f.vqa for f in found}) > 1
    groups: Dict[Tuple[str, str], List[Found]] = OrderedDict()
    for f in found:
        groups.setdefault((f.row, f"{f.suite} ({f.vqa})" if several_types else f.suite), []).append(f)
    cells: Dict[Tuple[str, str], float] = {}
    notes: List[str] = []
    for (row, column), files in groups.items():
        if files[0].prefix == "omnimedvqa":
            values = _omnimedvqa_cells(files, notes)
        elif files[0].prefix == "vqarad":
            values = _judged_cells(max(files, key=lambda f: f.mtime))
        else:
            values = _benchmark_cells(max(files, key=lambda f: f.mtime))  # the newest scoring of a file
        for convention, v in values.items():
            if v is not None:
                cells[(row, column if not convention else f"{column} [{convention}]")] = v
    cells.update(captions)
    mine = sorted({c for _, c in cells if "[" not in c and c not in dict(CAPTION_METRICS).values()})
    caption_columns = [c for _, c in CAPTION_METRICS if any(k[1] == c for k in cells)]
    peers = sorted({c for _, c in cells if "[" in c})
    return sorted({r for r, _ in cells}), mine + caption_columns + peers, cells, notes


def collect(dirs: Sequence[str | Path]) -> Tuple[List[str], List[str], Dict[Tuple[str, str], float]]:
    """``(checkpoints, columns, {(checkpoint, column): score})``: the table under medcap's rules."""
    rows, columns, cells, _ = collect_all(dirs)
    columns = [c for c in columns if "[" not in c]
    cells = {k: v for k, v in cells.items() if k[1] in columns}
    return sorted({r for r, _ in cells}), columns, cells


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


def judge_line(dirs: Sequence[str | Path]) -> str:
    """"judge: off", or the judge(s) named in the summaries of judged files."""
    import json

    judges = set()
    for d in dirs:
        for p in Path(d).rglob("*-summary.json"):
            try:
                judge = json.loads(p.read_text(encoding="utf-8")).get("judge", "off")
            except ValueError:
                continue
            if isinstance(judge, dict):
                judges.add(f"{judge.get('model')} at {judge.get('endpoint')}")
    return "judge: off" if not judges else "judge: " + "; ".join(sorted(judges))


def write_report(out: Path, rows, columns, scores, *, header: str = HEADER, peer_header: str = PEER_HEADER) -> List[Path]:
    """``out.csv`` (every column), ``out.md`` (medcap's table, then the peers') and ``out.png``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    csv_path = write_csv_atomic(out.with_name(out.name + ".csv"), ["checkpoint"] + columns, [
        {"checkpoint": r, **{c: ("" if scores.get((r, c)) is None or math.isnan(scores[(r, c)]) else f"{scores[(r, c)]:.6f}")
                             for c in columns}} for r in rows])
    mine, peers = [c for c in columns if "[" not in c], [c for c in columns if "[" in c]
    text = f"{header}\n\n" + "\n".join(table_lines(rows, mine, scores, markdown=True)) + "\n"
    if peers:
        text += f"\n{peer_header}\n\n" + "\n".join(table_lines(rows, peers, scores, markdown=True)) + "\n"
    md = out.with_name(out.name + ".md")
    atomic_write_text(md, text)
    return [csv_path, md, _chart(out.with_name(out.name + ".png"), rows, mine, scores)]


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
    ax.set_ylim(0, max([105.0] + [100 * v + 5 for v in scores.values() if not math.isnan(v)]))
    ax.set_title("medcap report: medcap's rules (OmniMedVQA: macro accuracy); captions: pycocoevalcap", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def report_main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="medcap report", description="One table of the headline scores of every "
                                "checkpoint in the results folders (recomputed from the rows) under medcap's rules, one "
                                "under each peer's convention, as CSV, Markdown and PNG.")
    p.add_argument("dirs", nargs="+", metavar="RESULTS_DIR", help="output_dir folders of medcap run generate")
    p.add_argument("--out", default=None, help="path prefix of the written files (default: RESULTS_DIR/report)")
    args = p.parse_args(argv)
    try:
        rows, columns, scores, notes = collect_all(args.dirs)
        judge = judge_line(args.dirs)
    except (OSError, ValueError) as e:
        print(f"medcap report: error: {e}", file=sys.stderr)
        return 2
    if not rows:
        print(f"medcap report: no scored results files in {', '.join(args.dirs)}", file=sys.stderr)
        return 1
    mine, peers = [c for c in columns if "[" not in c], [c for c in columns if "[" in c]
    print(HEADER)
    print("\n".join(table_lines(rows, mine, scores, markdown=False)))
    if peers:
        print(f"\n{PEER_HEADER}; {judge}")
        print("\n".join(table_lines(rows, peers, scores, markdown=False)))
    for note in notes:
        print(f"note: {note}")
    out = Path(args.out) if args.out else Path(args.dirs[0]) / "report"
    for f in write_report(out, rows, columns, scores, peer_header=f"{PEER_HEADER}; {judge}"):
        print(f"wrote {f}")
    return 0
