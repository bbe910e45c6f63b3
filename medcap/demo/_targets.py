"""The demo's targets, judged against one run's figures, and what a ``--quick`` run can show.

    judge_targets   one check per metric and half of the test split (seen, unseen
                    combinations): the trained vision side's figure against the higher
                    of the untrained control's and chance's, plus the margin
                    (``_settings.TARGET_MARGINS``)
    verdict         the line that ends the printed table, and ``summary.json``'s
                    ``targets_met`` (``None`` where a run cannot be judged)
    QUICK_NOTE      why a one-minute run meets none of them, and what it does show

Chance is an image-blind model (``_scores.chance_figures``); the control is the same
model with an untrained vision side. Both ignore the image, so a margin over the
higher of the two is what the image adds.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from medcap.demo._scores import SPLITS

METRIC_NAMES = {"CIDEr": "CIDEr", "macro_accuracy": "macro accuracy"}

# What each target needs, and so why a --quick run (64 training images, 2 vision
# training steps, a 12-step LM) cannot meet it.
QUICK_NOTE = (
    "a --quick run is a smoke run: it trains the LM for 12 steps and the vision side for 2 steps "
    "on 64 images, so it checks that every stage runs and writes the full run's files (seen and "
    "unseen rows, report.png with its images), and it can meet none of the targets: each needs a "
    "vision side trained for minutes (the full run, `medcap demo`, < 10 min on 2 cores)"
)
QUICK_REASON = {
    "CIDEr": "needs captions read from the image: an LM and a vision side trained for minutes",
    "macro_accuracy": "needs the answers read from a right caption: the same training as CIDEr",
}


def _floor(values: Sequence[Optional[float]]) -> Optional[float]:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def judge_targets(summary: Mapping[str, Any], margins: Mapping[str, float]) -> List[Dict[str, Any]]:
    """One check per (metric, half): ``needed`` = max(control, chance) + margin;
    ``met`` is None where the trained figure or both baselines are missing."""
    checks: List[Dict[str, Any]] = []
    for metric, margin in margins.items():
        for split in SPLITS:
            trained = summary.get("trained", {}).get(split, {}).get(metric)
            control = summary.get("control", {}).get(split, {}).get(metric)
            chance = summary.get("chance", {}).get(split, {}).get(metric)
            floor = _floor([control, chance])
            needed = None if floor is None else floor + margin
            met = None if trained is None or needed is None else bool(trained >= needed)
            checks.append({"metric": metric, "combinations": split, "margin": margin, "trained": trained,
                           "control": control, "chance": chance, "needed": needed, "met": met})
    return checks


def verdict(checks: Sequence[Mapping[str, Any]], quick: bool) -> Tuple[Optional[bool], str]:
    """``(targets_met, the line that says it)``: True or False for a full run (with the
    checks missed named), None for a ``--quick`` run or one with figures missing."""
    if quick:
        names = ", ".join(sorted({f"{METRIC_NAMES[c['metric']]} ({QUICK_REASON[c['metric']]})" for c in checks}))
        return None, f"targets not judged: {QUICK_NOTE}. Cannot be met in a quick run: {names}."
    missing = [c for c in checks if c["met"] is None]
    missed = [c for c in checks if c["met"] is False]
    if missing:
        return None, "targets not judged: figures missing for " + "; ".join(_name(c) for c in missing)
    if missed:
        return False, f"targets: {len(checks) - len(missed)} of {len(checks)} met; missed: " + "; ".join(
            f"{_name(c)} {c['trained']:.3f} < {c['needed']:.3f}" for c in missed)
    return True, f"targets: all {len(checks)} met (trained >= max(control, chance) + margin, seen and unseen)"


def _name(check: Mapping[str, Any]) -> str:
    return f"{METRIC_NAMES[check['metric']]} on {check['combinations']} combinations"
