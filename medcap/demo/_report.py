"""The demo's results, read back from the files the recipes wrote.

    read_metrics_csv, read_eval, caption_exact_match, chance_cider, chance_accuracy,
    read_train_log      the figures: scores, chance levels, the training loss
    collect_summary     ``summary.json``: the figures, the targets, seconds and every
                        stage's command
    draw_report         ``report.png``: loss curves, accuracy per modality, captioned examples
    print_summary       the table at the end of a run, and the commands that rerun each stage
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from medcap.demo._settings import TARGETS
from medcap.demo._world import MODALITIES


# ---- the figures


def read_metrics_csv(path: Path) -> Dict[str, float]:
    """``metric,score`` lines (the reference's metrics-{ckpt}.csv) -> dict."""
    out: Dict[str, float] = {}
    with open(path, encoding="utf-8-sig") as f:
        for row in csv.reader(f):
            if len(row) >= 2:
                try:
                    out[row[0]] = float(row[1])
                except ValueError:
                    continue  # a header line
    return out


def _one(folder: Path, pattern: str) -> Optional[Path]:
    found = sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def read_eval(folder: Path) -> Dict[str, Any]:
    """Captioning metrics and OmniMedVQA macro accuracy found in one evaluation folder."""
    out: Dict[str, Any] = {}
    m = _one(folder, "metrics-[!r]*.csv")  # metrics-{ckpt}.csv, not metrics-raw-*
    if m is not None:
        out["captioning"] = read_metrics_csv(m)
        out["CIDEr"] = out["captioning"].get("CIDEr", float("nan"))
        out["metrics_file"] = str(m)
        out["caption_exact_match"] = caption_exact_match(folder)
    j = _one(folder, "omnimedvqa-*-modality.json")
    if j is not None:
        data = json.loads(j.read_text(encoding="utf-8"))
        out["macro_accuracy"] = float(data["macro_accuracy"])
        out["per_modality"] = {k: float(v["accuracy"]) for k, v in data["per_modality"].items()}
        out["vqa_file"] = str(j)
        out["scoring"] = data.get("scoring")
        scored = j.with_name(j.name[: -len("-modality.json")] + ".csv")
        if scored.exists():
            out["per_question_type"] = _accuracy_by_question_type(scored)
    return out


def caption_exact_match(folder: Path) -> Optional[float]:
    """Share of test images whose generated caption equals the reference exactly."""
    raw = _one(folder, "metrics-raw-*.csv")
    if raw is None:
        return None
    with open(raw, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f))
    return sum(r["output"].strip() == r["generated"].strip() for r in rows) / len(rows) if rows else None


def chance_cider(test_json: Path, seed: int = 0) -> Optional[float]:
    """CIDEr of every test caption scored against the caption of another test image
    (a fixed derangement): what a model that ignores the image scores on this world's
    templated captions. pycocoevalcap's PTB tokenizer and CIDEr, as test_metrics."""
    import random

    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    recs = json.loads(test_json.read_text(encoding="utf-8"))
    refs = [r["conversations"][1]["value"] for r in recs]
    if len(refs) < 2:
        return None
    order = list(range(len(refs)))
    random.Random(seed).shuffle(order)
    cands = [refs[order[(order.index(i) + 1) % len(order)]] for i in range(len(refs))]  # never itself
    tok = PTBTokenizer()
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        gts = tok.tokenize({i: [{"caption": r}] for i, r in enumerate(refs)})
        res = tok.tokenize({i: [{"caption": c}] for i, c in enumerate(cands)})
        score, _ = Cider().compute_score(gts, res)
    return float(score)


def _accuracy_by_question_type(scored_csv: Path) -> Dict[str, float]:
    """The demo's question ids end with the attribute asked about."""
    hits: Dict[str, List[int]] = {}
    with open(scored_csv, encoding="utf-8-sig", newline="") as f:
        for row in csv.DictReader(f):
            attr = row.get("question_id", "").rsplit("_", 1)[-1]
            hits.setdefault(attr, []).append(int(row.get("correct", 0) or 0))
    return {k: sum(v) / len(v) for k, v in sorted(hits.items())}


def chance_accuracy(questions_path: Path) -> float:
    """Macro accuracy of guessing uniformly among each question's options."""
    qs = json.loads(questions_path.read_text(encoding="utf-8"))
    per: Dict[str, List[float]] = {}
    for q in qs:
        n = sum(1 for L in "ABCD" if q.get(f"option_{L}"))
        per.setdefault(q["modality_type"], []).append(1.0 / n)
    return sum(sum(v) / len(v) for v in per.values()) / len(per) if per else float("nan")


def read_train_log(log_dir: Path) -> List[Tuple[int, float]]:
    """(step, loss) pairs from torchtune's DiskLogger files (``Step N | loss:X ...``)."""
    points: List[Tuple[int, float]] = []
    for f in sorted(log_dir.glob("log_*.txt")):
        for line in f.read_text(errors="replace").splitlines():
            m = re.match(r"Step (\d+) \|.*?\bloss:([-+0-9.eE]+|nan)", line)
            if m:
                points.append((int(m.group(1)), float(m.group(2))))
    return points


# ---- summary.json


def collect_summary(demo, stages: Sequence[str], targets: Dict[str, float]) -> Dict[str, Any]:
    """``summary.json``: metrics of the trained model and the control, targets, seconds, commands.
    ``stages`` and ``targets`` are the demo's (passed in: the runner imports this module)."""
    trained = read_eval(demo.out / "eval" / "trained")
    control = read_eval(demo.out / "eval" / "control")
    seconds: Dict[str, float] = {}
    for stage in stages:
        if stage in demo.seconds:
            seconds[stage] = round(demo.seconds[stage], 1)
            continue
        marker = demo.stage_dir / f"{stage}.json"
        if marker.exists():
            seconds[stage] = round(float(json.loads(marker.read_text()).get("seconds", 0.0)), 1)
    seconds["total"] = round(sum(v for k, v in seconds.items() if k != "total"), 1)
    questions = demo.world / "OmniMedVQA" / "QA_information" / "Open-access" / "MedcapDemo.json"
    chance = chance_accuracy(questions) if questions.exists() else float("nan")
    lm_log = demo.llm / "pretrain.json"
    lm = json.loads(lm_log.read_text()) if lm_log.exists() else {}
    try:
        cider_chance = chance_cider(demo.world / "test.json") if (demo.world / "test.json").exists() else None
    except Exception as e:  # Java missing, ...: the baseline is extra, the run's metrics are not
        print(f"chance CIDEr not computed: {type(e).__name__}: {e}", flush=True)
        cider_chance = None
    met = bool(
        trained.get("CIDEr", 0) >= targets["CIDEr"] and trained.get("macro_accuracy", 0) >= targets["macro_accuracy"]
    )

    def _clean(v):  # JSON has no NaN
        return None if isinstance(v, float) and math.isnan(v) else v

    return {
        "trained": {k: _clean(v) for k, v in trained.items()},
        "control": {k: _clean(v) for k, v in control.items()},
        "targets": dict(targets),
        "targets_met": met,
        "chance_accuracy": _clean(chance),
        "chance_CIDEr": cider_chance,
        "lm_text_exact_match": lm.get("text_exact_match"),
        "lm_sizes": lm.get("sizes"),
        "seconds": seconds,
        "threads": demo.threads,
        "settings": {k: v for k, v in vars(demo.settings).items()},
        "commands": demo.commands(),
        "out": str(demo.out),
    }


# ---- report.png


def _caption_rows(folder: Path, n: int) -> List[Dict[str, str]]:
    raw = _one(folder, "metrics-raw-*.csv")
    if raw is None:
        return []
    with open(raw, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f))
    # spread the examples over the images (and so, as images cycle through them, the modalities)
    if n >= len(rows):
        return rows
    step = len(rows) // n
    return [rows[(k * step + k) % len(rows)] for k in range(n)]


def draw_report(demo, summary: Dict[str, Any], path: Path) -> Path:
    """Loss curves, per-modality accuracy (trained vs control), test images with captions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    examples = _caption_rows(demo.out / "eval" / "trained", 4)
    control_rows = {r["image"]: r["generated"] for r in _caption_rows(demo.out / "eval" / "control", 10**9)}
    fig = plt.figure(figsize=(15, 9.5))
    grid = fig.add_gridspec(2, 4, height_ratios=[1, 1.05], hspace=0.45, wspace=0.3)
    _lm_loss(fig.add_subplot(grid[0, 0]), demo.llm / "pretrain.json")
    _vision_loss(fig.add_subplot(grid[0, 1]), demo.train_dir / "logs")
    _accuracy_bars(fig.add_subplot(grid[0, 2:]), summary)
    _examples(fig, grid, examples, control_rows)
    tc, cc = summary["trained"].get("CIDEr"), summary["control"].get("CIDEr")
    fig.suptitle(
        f"medcap demo: held-out images. CIDEr trained {tc if tc is None else round(tc, 3)} vs control "
        f"{cc if cc is None else round(cc, 3)}; total {summary['seconds'].get('total', 0):.0f} s", fontsize=12,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _lm_loss(ax, lm_log: Path) -> None:
    if lm_log.exists():
        losses = json.loads(lm_log.read_text())["losses"]
        ax.plot(range(1, len(losses) + 1), losses, color="#55A868")
        ax.set_yscale("log")
    ax.set_title("1. LM pretraining (text only)", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")


def _vision_loss(ax, log_dir: Path) -> None:
    pts = read_train_log(log_dir)
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color="#4C72B0")
        ax.set_yscale("log")
    ax.set_title("2. vision training (LM frozen)", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("caption loss")


def _accuracy_bars(ax, summary: Dict[str, Any]) -> None:
    t, c = summary["trained"].get("per_modality", {}), summary["control"].get("per_modality", {})
    names = [m.key for m in MODALITIES if m.key in t or m.key in c]
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [t.get(n, 0) for n in names], 0.4, label="trained vision side", color="#4C72B0")
    ax.bar([i + 0.2 for i in x], [c.get(n, 0) for n in names], 0.4, label="untrained control", color="#C44E52")
    chance = summary.get("chance_accuracy")
    if chance:
        ax.axhline(chance, color="grey", linestyle=":", label=f"chance {chance:.2f}")
    ax.set_xticks(list(x))
    ax.set_xticklabels([n.split("(")[0].strip() or n for n in names], rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ta, ca = summary["trained"].get("macro_accuracy"), summary["control"].get("macro_accuracy")
    ax.set_title(
        f"3. OmniMedVQA-layout accuracy per modality (macro: trained {ta if ta is None else round(ta, 3)}, "
        f"control {ca if ca is None else round(ca, 3)})", fontsize=10,
    )
    ax.legend(fontsize=8, loc="lower right")


def _examples(fig, grid, examples: List[Dict[str, str]], control_rows: Dict[str, str]) -> None:
    """The held-out images in the bottom row, each with its reference and both captions."""
    from PIL import Image

    for k, row in enumerate(examples):
        ax = fig.add_subplot(grid[1, k])
        try:
            ax.imshow(Image.open(row["image"]).convert("RGB"), interpolation="nearest")
        except OSError:
            pass
        ax.axis("off")
        ctrl = control_rows.get(row["image"], "")
        ax.set_title(
            _wrap(f"reference: {row['output']}") + "\n" + _wrap(f"trained: {row['generated']}") + "\n"
            + _wrap(f"control: {ctrl}"), fontsize=7.5, loc="left",
        )


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


def print_summary(summary: Dict[str, Any]) -> None:
    t, c = summary.get("trained", {}), summary.get("control", {})
    lines = [
        "",
        "medcap demo results (held-out images)",
        f"  {'':28s}{'trained':>10s}{'control':>10s}{'target':>10s}",
        f"  {'CIDEr':28s}{_f(t.get('CIDEr')):>10s}{_f(c.get('CIDEr')):>10s}{'>= ' + str(TARGETS['CIDEr']):>10s}",
        f"  {'OmniMedVQA macro accuracy':28s}{_f(t.get('macro_accuracy')):>10s}"
        f"{_f(c.get('macro_accuracy')):>10s}{'>= ' + str(TARGETS['macro_accuracy']):>10s}",
        f"  {'caption exact match':28s}{_f(t.get('caption_exact_match')):>10s}{_f(c.get('caption_exact_match')):>10s}",
        f"  chance: accuracy {_f(summary.get('chance_accuracy'))}, CIDEr {_f(summary.get('chance_CIDEr'))} "
        f"(captions of other test images); targets met: {summary.get('targets_met')}",
        f"  seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in summary.get("seconds", {}).items()),
        "",
        "rerun any stage with its command (append key=value to change it):",
    ]
    for stage, cmd in summary.get("commands", {}).items():
        lines.append(f"  {stage}:\n    {cmd}")
    print("\n".join(lines), flush=True)


__all__ = [
    "chance_accuracy", "collect_summary", "draw_report", "print_summary", "read_eval", "read_metrics_csv",
    "read_train_log",
]
