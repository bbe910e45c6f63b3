"""The demo's ``summary.json``, ``report.png`` and the table printed at the end of a run.

    collect_summary     the figures (``_scores``) of the trained model, the control and
                        chance, whole and per half (seen / unseen combinations), the
                        targets judged (``_targets``), seconds and every stage's command
    draw_report         ``report.png``: loss curves, seen/unseen accuracy and CIDEr,
                        accuracy per modality, test images with their captions; returns
                        the problems met (a test image not found), which the caller prints
    test_image_paths    a test image's file, found the one way the data loader finds it:
                        ``medcap.data.parse_record`` on its record in ``world/test.json``
                        (``meta`` ``dir=`` relative to that file's folder)
    print_summary       the table, the targets' verdict, and the commands that rerun each stage
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Tuple

from medcap.demo._scores import SPLITS, chance_figures, read_eval, read_train_log
from medcap.demo._targets import judge_targets, verdict
from medcap.demo._world import MODALITIES

COLORS = {"trained": "#4C72B0", "control": "#C44E52", "chance": "#8C8C8C"}


# ---- summary.json


def _clean(v: Any) -> Any:
    """JSON has no NaN: None instead, at any depth."""
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    return v


def _seconds(demo, stages: Sequence[str]) -> Dict[str, float]:
    seconds: Dict[str, float] = {}
    for stage in stages:
        if stage in demo.seconds:
            seconds[stage] = round(demo.seconds[stage], 1)
            continue
        marker = demo.stage_dir / f"{stage}.json"
        if marker.exists():
            seconds[stage] = round(float(json.loads(marker.read_text()).get("seconds", 0.0)), 1)
    seconds["total"] = round(sum(v for k, v in seconds.items() if k != "total"), 1)
    return seconds


def _cpu_seconds(demo, stages: Sequence[str]) -> Dict[str, float]:
    """CPU seconds of each finished stage (its marker), and their total: against the wall
    time and the threads, the share of the run spent running rather than waiting."""
    cpu: Dict[str, float] = {}
    for stage in stages:
        marker = demo.stage_dir / f"{stage}.json"
        if marker.exists() and "cpu_seconds" in (info := json.loads(marker.read_text())):
            cpu[stage] = round(float(info["cpu_seconds"]), 1)
    cpu["total"] = round(sum(cpu.values()), 1)
    return cpu


def collect_summary(demo, stages: Sequence[str], margins: Mapping[str, float]) -> Dict[str, Any]:
    """``summary.json``: the trained model's, the control's and chance's figures (the whole
    test split at the top of each, each half under ``seen`` / ``unseen``), the targets
    judged, seconds, commands. ``stages`` and ``margins`` are the demo's."""
    trained = read_eval(demo.out / "eval" / "trained", demo.world)
    control = read_eval(demo.out / "eval" / "control", demo.world)
    chance = chance_figures(demo.world)
    world = json.loads((demo.world / "world.json").read_text(encoding="utf-8"))
    lm_log = demo.llm / "pretrain.json"
    lm = json.loads(lm_log.read_text()) if lm_log.exists() else {}
    summary: Dict[str, Any] = {
        "trained": _clean(trained),
        "control": _clean(control),
        "chance": _clean(chance),
        "chance_accuracy": chance["all"].get("macro_accuracy"),
        "chance_CIDEr": chance["all"].get("CIDEr"),
        "held_out": {"attributes": world.get("held_out_attributes"), "combinations": world.get("held_out"),
                     "test_images": {s: sum(r.get("combination") == s for r in world["test"]) for s in SPLITS}},
    }
    checks = judge_targets(summary, margins)
    met, line = verdict(checks, demo.quick)
    summary.update({
        "targets": {"margins": dict(margins), "checks": checks},
        "targets_met": met,
        "targets_verdict": line,
        "quick": demo.quick,
        "lm_text_exact_match": lm.get("text_exact_match"),
        "lm_sizes": lm.get("sizes"),
        "seconds": _seconds(demo, stages),
        "cpu_seconds": _cpu_seconds(demo, stages),
        "threads": demo.threads,
        "settings": dict(vars(demo.settings)),
        "commands": demo.commands(),
        "out": str(demo.out),
    })
    return summary


# ---- the test images, found as the data loader finds them


def test_image_paths(world_dir: Path) -> Dict[str, Tuple[Path, Tuple[Path, ...]]]:
    """Each test record's ``image`` (as the results files name it) -> (the file the data
    loader would open, every place it looks), from ``world/test.json``."""
    from medcap.data import parse_record

    test_json = Path(world_dir) / "test.json"
    out: Dict[str, Tuple[Path, Tuple[Path, ...]]] = {}
    for record in json.loads(test_json.read_text(encoding="utf-8")):
        parsed = parse_record(record, json_dir=test_json.parent)
        out[record["image"]] = (parsed.image_path, parsed.image_candidates)
    return out


def _open_image(image: str, paths: Mapping[str, Tuple[Path, Tuple[Path, ...]]], test_json: Path):
    """The test image as an RGB PIL image; a clear FileNotFoundError when it is not there."""
    from PIL import Image

    if image not in paths:
        raise FileNotFoundError(f"test image {image!r} (from the results file) has no record in {test_json}")
    path, tried = paths[image]
    if not path.is_file():
        raise FileNotFoundError(
            f"test image {image!r} not found: looked where the data loader looks, from {test_json}'s meta dir=: "
            + ", ".join(str(p) for p in tried))
    with Image.open(path) as im:
        return im.convert("RGB")


# ---- report.png


def _example_rows(demo, per_split: int = 2) -> List[Dict[str, str]]:
    """``per_split`` trained caption rows of each half, spread over the test images."""
    from medcap.demo._scores import combination_of

    raw = sorted((demo.out / "eval" / "trained").glob("metrics-raw-*.csv"))
    if not raw:
        return []
    with open(raw[-1], encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f))
    combination = combination_of(demo.world)
    out: List[Dict[str, str]] = []
    for split in SPLITS:
        part = [r for r in rows if combination.get(r["image"]) == split]
        step = max(1, len(part) // per_split)
        out += [{**part[(k * step + 3 * k) % len(part)], "combination": split} for k in range(min(per_split, len(part)))]
    return out


def _control_captions(demo) -> Dict[str, str]:
    raw = sorted((demo.out / "eval" / "control").glob("metrics-raw-*.csv"))
    if not raw:
        return {}
    with open(raw[-1], encoding="utf-8-sig", newline="") as f:
        return {r["image"]: r["generated"] for r in csv.DictReader(f)}


def draw_report(demo, summary: Dict[str, Any], path: Path) -> List[str]:
    """Draw ``report.png``; returns the problems met (each a sentence), e.g. a test image
    not found, whose panel then says so instead of showing it."""
    import matplotlib.pyplot as plt

    fig, problems = report_figure(demo, summary)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return problems


def report_figure(demo, summary: Dict[str, Any]):
    """The report's matplotlib figure and the problems met drawing it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(16, 13))
    grid = fig.add_gridspec(3, 4, height_ratios=[1, 0.85, 1.25], hspace=0.55, wspace=0.32)
    _lm_loss(fig.add_subplot(grid[0, 0]), demo.llm / "pretrain.json")
    _vision_loss(fig.add_subplot(grid[0, 1]), demo.train_dir / "logs")
    _split_bars(fig.add_subplot(grid[0, 2]), summary, "macro_accuracy", "3. OmniMedVQA-layout macro accuracy")
    _split_bars(fig.add_subplot(grid[0, 3]), summary, "CIDEr", "4. captioning CIDEr")
    _modality_bars(fig.add_subplot(grid[1, :]), summary)
    problems = _examples(fig, grid, demo)
    fig.suptitle(
        "medcap demo, held-out test images: \"unseen\" = (modality, kind, location) combinations the vision side "
        f"never trained on; total {summary['seconds'].get('total', 0):.0f} s", fontsize=12, y=0.985)
    fig.subplots_adjust(top=0.9, bottom=0.02, left=0.05, right=0.98)
    return fig, problems


def _log_scale(ax) -> None:
    from matplotlib.ticker import NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_minor_formatter(NullFormatter())  # the decades only: minor labels overlap


def _lm_loss(ax, lm_log: Path) -> None:
    if lm_log.exists():
        losses = json.loads(lm_log.read_text())["losses"]
        ax.plot(range(1, len(losses) + 1), losses, color="#55A868")
        _log_scale(ax)
    ax.set_title("1. LM pretraining (text only)", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")


def _vision_loss(ax, log_dir: Path) -> None:
    pts = read_train_log(log_dir)
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=COLORS["trained"])
        _log_scale(ax)
    ax.set_title("2. vision training (LM frozen)", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("caption loss")


def _legend_above(ax, top: float, ncol: int) -> None:
    """The legend in a band above the tallest bar (``top``): it never covers one."""
    ax.set_ylim(0, top * 1.32)
    ax.legend(fontsize=8, loc="upper center", ncol=ncol, frameon=False)


def _split_bars(ax, summary: Dict[str, Any], metric: str, title: str) -> None:
    """Trained, control and chance, on seen and on unseen combinations."""
    whos = ("trained", "control", "chance")
    labels = {"trained": "trained vision side", "control": "untrained control", "chance": "chance"}
    top = 1.0 if metric == "macro_accuracy" else 10.0  # CIDEr's maximum with one reference
    for j, who in enumerate(whos):
        values = [summary.get(who, {}).get(s, {}).get(metric) or 0.0 for s in SPLITS]
        bars = ax.bar([i + (j - 1) * 0.27 for i in range(len(SPLITS))], values, 0.27, label=labels[who],
                      color=COLORS[who])
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.set_xticks(range(len(SPLITS)))
    ax.set_xticklabels([f"{s}\ncombinations" for s in SPLITS], fontsize=9)
    ax.set_title(title, fontsize=10)
    _legend_above(ax, top, 1)


def _modality_bars(ax, summary: Dict[str, Any]) -> None:
    series = [("trained", "seen", "trained, seen combinations", "#4C72B0"),
              ("trained", "unseen", "trained, unseen combinations", "#8FB3E0"),
              ("control", None, "untrained control (all test images)", COLORS["control"])]
    names = [m.key for m in MODALITIES]
    for j, (who, split, label, color) in enumerate(series):
        block = summary.get(who, {})
        per = (block.get(split, {}) if split else block).get("per_modality", {})
        ax.bar([i + (j - 1) * 0.27 for i in range(len(names))], [per.get(n, 0.0) for n in names], 0.27,
               label=label, color=color)
    chance = summary.get("chance_accuracy")
    if chance:
        ax.axhline(chance, color="grey", linestyle=":", label=f"chance {chance:.2f}")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n.split("(")[0].strip() or n for n in names], fontsize=9)
    ax.set_title("5. OmniMedVQA-layout accuracy per modality", fontsize=10)
    _legend_above(ax, 1.0, 4)


def _examples(fig, grid, demo) -> List[str]:
    """Held-out images in the bottom row (two of seen, two of unseen combinations), each
    with its reference and both captions; a missing image is said in its panel and returned."""
    problems: List[str] = []
    paths = test_image_paths(demo.world)
    control = _control_captions(demo)
    for k, row in enumerate(_example_rows(demo)):
        ax = fig.add_subplot(grid[2, k])
        ax.axis("off")
        try:
            ax.imshow(_open_image(row["image"], paths, demo.world / "test.json"), interpolation="nearest")
        except (FileNotFoundError, OSError) as e:
            problems.append(f"report.png: {e}")
            ax.text(0.5, 0.5, _wrap(f"image not found: {row['image']}", 30), ha="center", va="center",
                    fontsize=9, color=COLORS["control"], transform=ax.transAxes)
        ax.set_title(
            f"[{row['combination']} combination]\n" + _wrap(f"reference: {row['output']}") + "\n"
            + _wrap(f"trained: {row['generated']}") + "\n" + _wrap(f"control: {control.get(row['image'], '')}"),
            fontsize=7.5, loc="left")
    return problems


def _wrap(text: str, width: int = 46) -> str:
    words, lines, cur = text.split(), [], ""
    for w in words:
        if len(cur) + len(w) + 1 > width and cur:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    lines.append(cur)
    return "\n".join(lines)


# ---- the table printed at the end


def _f(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


def _table_rows(summary: Dict[str, Any]) -> List[str]:
    t, c, ch = summary.get("trained", {}), summary.get("control", {}), summary.get("chance", {})
    needed = {(x["metric"], x["combinations"]): x for x in summary.get("targets", {}).get("checks", [])}
    lines = []
    for metric, name in (("CIDEr", "CIDEr"), ("macro_accuracy", "macro accuracy"),
                         ("caption_exact_match", "caption exact match")):
        for split in SPLITS + ("all",):
            tb, cb = (b if split == "all" else b.get(split, {}) for b in (t, c))
            hb = ch.get(split, {})
            count = tb.get("n_questions" if metric == "macro_accuracy" else "n_images")
            check = needed.get((metric, split))
            target = "" if check is None or check["needed"] is None else f">= {check['needed']:.3f}" + (
                " (not judged in --quick)" if summary.get("quick") else
                "" if check["met"] is None else " met" if check["met"] else " MISSED")
            label = f"{name}, {split}" + (f" ({count})" if count else "")
            lines.append(f"  {label:36s}{_f(tb.get(metric)):>9s}{_f(cb.get(metric)):>9s}{_f(hb.get(metric)):>9s}"
                         f"  {target}")
    return lines


def print_summary(summary: Dict[str, Any], problems: Sequence[str] = ()) -> None:
    held = summary.get("held_out", {})
    lines = [
        "",
        "medcap demo results on held-out test images; \"unseen\": images of (modality, kind, location) "
        f"combinations vision training never saw ({len(held.get('combinations') or [])} held out)",
        f"  {'':36s}{'trained':>9s}{'control':>9s}{'chance':>9s}  target (max(control, chance) + margin)",
        *_table_rows(summary),
        f"  {summary.get('targets_verdict', '')}",
        *[f"  {p}" for p in problems],
        "  seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in summary.get("seconds", {}).items()),
        "",
        "rerun any stage with its command (append key=value to change it):",
    ]
    for stage, cmd in summary.get("commands", {}).items():
        lines.append(f"  {stage}:\n    {cmd}")
    print("\n".join(lines), flush=True)


__all__ = ["collect_summary", "draw_report", "print_summary", "test_image_paths"]
