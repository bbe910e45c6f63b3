"""The offline demo's figures over seeds 0, 1 and 2, and the README table made from them.

    python bench/demo_seeds.py               # run `medcap demo --seed N` for N = 0, 1, 2 (a finished
                                             # stage is kept), then write the JSON and the README table
    python bench/demo_seeds.py --no-run      # the same from finished demo folders only
    python bench/demo_seeds.py --table-only  # the README table from the committed JSON (what `make bench` runs)

Demo folders: ``ROOT/seedN`` (``--root``, default /tmp/medcap_demo_seeds). The JSON,
``bench/results/demo_seeds.json``, holds every run's figures (trained vision side,
untrained control and chance; seen and unseen combinations and the whole test split),
its wall and CPU seconds and threads, the settings, and mean/min/max over the runs. The
README's table sits between ``<!-- demo-seeds:begin -->`` and ``<!-- demo-seeds:end -->``.
The last stdout line is the JSON (the benchmarks' convention).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Sequence

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "demo_seeds.json"
README = REPO / "README.md"
BEGIN, END = "<!-- demo-seeds:begin -->", "<!-- demo-seeds:end -->"
SEEDS = (0, 1, 2)
WHO = ("trained", "control", "chance")
SPLITS = ("seen", "unseen", "all")
METRICS = ("CIDEr", "macro_accuracy", "caption_exact_match")
ROWS = (  # (metric, split, label, decimals)
    ("CIDEr", "seen", "CIDEr, seen combinations", 2),
    ("CIDEr", "unseen", "CIDEr, **unseen** combinations", 2),
    ("macro_accuracy", "seen", "OmniMedVQA-layout macro accuracy, seen", 3),
    ("macro_accuracy", "unseen", "OmniMedVQA-layout macro accuracy, **unseen**", 3),
    ("caption_exact_match", "seen", "captions exactly right, seen", 3),
    ("caption_exact_match", "unseen", "captions exactly right, **unseen**", 3),
)


# ---- one run's figures


def figures(summary: Dict[str, Any]) -> Dict[str, float]:
    """``WHO.SPLIT.METRIC`` -> value from one demo's summary.json (``all``: the whole test split)."""
    out: Dict[str, float] = {}
    for who in WHO:
        block = summary.get(who, {})
        for split in SPLITS:
            part = block.get(split, {}) if who == "chance" or split != "all" else block
            for metric in METRICS:
                if part.get(metric) is not None:
                    out[f"{who}.{split}.{metric}"] = float(part[metric])
    return out


def run_record(seed: int, summary: Dict[str, Any]) -> Dict[str, Any]:
    seconds, cpu = summary.get("seconds", {}), summary.get("cpu_seconds", {})
    threads = summary.get("threads") or 1
    wall = seconds.get("total")
    running = cpu.get("total") / (wall * threads) if wall and cpu.get("total") else None
    return {"seed": seed, "figures": figures(summary), "targets_met": summary.get("targets_met"),
            "targets_verdict": summary.get("targets_verdict"), "seconds": seconds, "cpu_seconds": cpu,
            "threads": threads, "running_share": running,
            "test_images": summary.get("held_out", {}).get("test_images"),
            "held_out": summary.get("held_out", {}).get("combinations")}


def _common_settings(summaries: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """The settings every run shares (all but the seed and the thread count), or an error."""
    strip = [{k: v for k, v in s.get("settings", {}).items() if k not in ("seed", "threads")} for s in summaries]
    if any(x != strip[0] for x in strip[1:]):
        raise SystemExit("demo_seeds.py: error: the demo folders were made with different settings: " + "; ".join(
            json.dumps(x, sort_keys=True) for x in strip))
    return strip[0]


def aggregate(runs: Sequence[Dict[str, Any]]) -> Dict[str, Dict[str, float]]:
    """mean, min and max over the runs of every figure, the wall time and the running share."""
    keys = sorted({k for r in runs for k in r["figures"]})
    series = {k: [r["figures"][k] for r in runs if k in r["figures"]] for k in keys}
    series["seconds.total"] = [r["seconds"]["total"] for r in runs if r["seconds"].get("total")]
    series["seconds.train"] = [r["seconds"]["train"] for r in runs if r["seconds"].get("train")]
    series["cpu_seconds.total"] = [r["cpu_seconds"]["total"] for r in runs if r["cpu_seconds"].get("total")]
    series["running_share"] = [r["running_share"] for r in runs if r["running_share"] is not None]
    return {k: {"mean": sum(v) / len(v), "min": min(v), "max": max(v)} for k, v in series.items() if v}


# ---- running the demo


def run_demo(folder: Path, seed: int) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    cmd = [sys.executable, "-m", "medcap.cli", "demo", "--out", str(folder), "--seed", str(seed)]
    print(f"demo_seeds.py: {' '.join(cmd)}", file=sys.stderr, flush=True)
    with open(folder.parent / f"seed{seed}.log", "wb") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        raise SystemExit(f"demo_seeds.py: error: the demo for seed {seed} failed (exit {rc}); see {log.name}")


def collect(root: Path, seeds: Sequence[int], run: bool) -> Dict[str, Any]:
    summaries = []
    for seed in seeds:
        folder = root / f"seed{seed}"
        if run:
            folder.parent.mkdir(parents=True, exist_ok=True)
            run_demo(folder, seed)
        path = folder / "summary.json"
        if not path.is_file():
            raise SystemExit(f"demo_seeds.py: error: {path} not found: run without --no-run to make it")
        summaries.append(json.loads(path.read_text(encoding="utf-8")))
    for seed, s in zip(seeds, summaries):
        if s.get("settings", {}).get("seed") != seed or s.get("quick"):
            raise SystemExit(f"demo_seeds.py: error: {root / f'seed{seed}'} is not a full demo run with seed {seed}")
    runs = [run_record(seed, s) for seed, s in zip(seeds, summaries)]
    return {"command": "python bench/demo_seeds.py", "seeds": list(seeds), "settings": _common_settings(summaries),
            "runs": runs, "aggregate": aggregate(runs)}


# ---- the README table


def _cell(agg: Dict[str, Dict[str, float]], key: str, decimals: int, bold: bool = False) -> str:
    if key not in agg:
        return ""
    a = agg[key]
    text = f"{a['mean']:.{decimals}f} ({a['min']:.{decimals}f}-{a['max']:.{decimals}f})"
    return f"**{text}**" if bold else text


def render_table(data: Dict[str, Any]) -> str:
    """The README's lines between the markers, from the JSON alone."""
    agg, runs = data["aggregate"], data["runs"]
    imgs = runs[0].get("test_images") or {}
    seeds = ", ".join(str(s) for s in data["seeds"])
    met = sum(1 for r in runs if r.get("targets_met"))
    lines = [
        f"Mean (min-max) over seeds {seeds}: {imgs.get('seen', '?')} test images of seen and "
        f"{imgs.get('unseen', '?')} of unseen combinations per seed, "
        f"{data['settings'].get('questions_per_image', '?')} questions per image "
        "(made by `python bench/demo_seeds.py` from `bench/results/demo_seeds.json`):",
        "",
        "| held-out test images | trained vision side | untrained control | chance |",
        "|---|---|---|---|",
    ]
    for metric, split, label, d in ROWS:
        lines.append(f"| {label} | {_cell(agg, f'trained.{split}.{metric}', d, bold=True)} | "
                     f"{_cell(agg, f'control.{split}.{metric}', d)} | {_cell(agg, f'chance.{split}.{metric}', d)} |")
    wall, train = agg.get("seconds.total"), agg.get("seconds.train")
    share, cpu = agg.get("running_share"), agg.get("cpu_seconds.total")
    lines.append(f"| targets met (all four: CIDEr and accuracy, seen and unseen) | {met} of {len(runs)} runs | | |")
    if wall:
        note = f"{wall['min']:.0f}-{wall['max']:.0f} s per run, of which vision training " \
               f"{train['min']:.0f}-{train['max']:.0f} s" if train else f"{wall['min']:.0f}-{wall['max']:.0f} s per run"
        if share and cpu:
            note += f"; the demo's processes ran {100 * share['min']:.0f}-{100 * share['max']:.0f}% of it " \
                    f"(CPU s / (wall s x threads): {cpu['min']:.0f}-{cpu['max']:.0f} CPU s), the rest is " \
                    "waiting for a CPU on a machine shared with other jobs"
        lines.append(f"| wall time on 2 CPU cores | {note} | | |")
    return "\n".join(lines)


def write_readme(table: str, readme: Path = README) -> None:
    text = readme.read_text(encoding="utf-8")
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise SystemExit(f"demo_seeds.py: error: {readme} needs one {BEGIN} ... {END} pair")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    readme.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}", encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=Path("/tmp/medcap_demo_seeds"), help="demo folders ROOT/seedN")
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument("--no-run", action="store_true", help="read finished demo folders; run nothing")
    p.add_argument("--table-only", action="store_true", help=f"the README table from {RESULTS.name} alone")
    p.add_argument("--json", type=Path, default=RESULTS)
    p.add_argument("--readme", type=Path, default=README)
    args = p.parse_args(argv)
    if args.table_only:
        data = json.loads(args.json.read_text(encoding="utf-8"))
    else:
        data = collect(args.root, args.seeds, run=not args.no_run)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    write_readme(render_table(data), args.readme)
    print(json.dumps(data["aggregate"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
