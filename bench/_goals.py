"""The goals the benchmarks print (issue 24), each with the figure it was read from; a miss
is reported as a miss, never left out.

``eval_goals`` reads ``eval_omnimedvqa.py``'s cells: at batch 16, our engine against HF
static batching (>= 1.3x) and transformers' continuous batching (ahead, >= 1x) on the
measured workload; continuous against static batching (>= 1.5x fewer decode passes on
the measured workload, never slower in wall time on either workload); against vLLM's
CPU build (within 1.5x: >= 0.667x); against the reference's algorithm (>= 10x, the
historical goal). ``goal_table`` is the rows the docs print.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

GOAL_BATCH = 16


def _cell(result: Dict, model: str, workload: str, batch: int) -> Optional[Dict]:
    return next((c for c in result["cells"] if (c["model"], c["workload"], c["batch"]) == (model, workload, batch)),
                None)


def _ratio(cell: Optional[Dict], a: str, b: str, key: str = "questions_per_s", invert: bool = False):
    if cell is None or a not in cell["figures"] or b not in cell["figures"]:
        return None
    x, y = cell["figures"][a].get(key), cell["figures"][b].get(key)
    if not x or not y:
        return None
    return round(y / x if invert else x / y, 3)


def eval_goals(result: Dict) -> Dict[str, Any]:
    """``goals``: one record per (goal, model); ``goals_met``; ``ratios`` and ``figures`` of
    the first model's measured batch-16 cell (what ``gpu.py`` summarises)."""
    goals: List[Dict] = []
    models = list(result["settings"]["models"])
    batch = GOAL_BATCH if GOAL_BATCH in result["settings"]["batches"] else result["settings"]["batches"][-1]

    def add(name, model, workload, value, target, what):
        goals.append({"goal": name, "model": model, "workload": workload, "batch": batch, "value": value,
                      "target": target, "met": None if value is None else value >= target, "what": what})

    for m in models:
        meas, bud = _cell(result, m, "measured", batch), _cell(result, m, "budget", batch)
        add("ours_vs_hf_static", m, "measured", _ratio(meas, "ours", "hf_static"), 1.3,
            "questions/s end to end, ours over HF generate (static batches)")
        add("ours_vs_hf_cb", m, "measured", _ratio(meas, "ours", "hf_cb"), 1.0,
            "questions/s end to end, ours over transformers' continuous batching")
        add("continuous_vs_static_decode_passes", m, "measured",
            _ratio(meas, "ours", "static", "decode_passes", invert=True), 1.5,
            "static batching's decode passes over continuous batching's")
        for w, c in (("measured", meas), ("budget", bud)):
            add("continuous_vs_static_wall", m, w, _ratio(c, "ours", "static"), 1.0,
                "questions/s end to end, continuous over static batching (same steps)")
            add("ours_vs_vllm", m, w, _ratio(c, "ours", "vllm", "generation_tokens_per_s"), round(1 / 1.5, 3),
                "generation tokens/s, ours over vLLM's CPU build (>= 1/1.5: within 1.5x)")
        ref = result.get("reference", {}).get(m, {}).get("budget")
        ours_b = (bud or {}).get("figures", {}).get("ours", {}).get("questions_per_s")
        add("ours_vs_reference", m, "budget",
            round(ours_b / ref["questions_per_s"], 3) if ref and ours_b else None, 10.0,
            "questions/s end to end, ours over the reference's algorithm (historical goal)")
    head = _cell(result, models[0], "measured", batch) if models else None
    out: Dict[str, Any] = {"goals": goals, "goals_met": all(g["met"] is not False for g in goals)}
    if head is not None:  # the headline cell, flat (bench/gpu.py reads it)
        out["figures"] = dict(head["figures"])
        ref = result.get("reference", {}).get(models[0], {}).get("measured")
        if ref:
            out["figures"]["reference"] = ref
        out["ratios"] = {g["goal"]: g["value"] for g in goals
                         if g["model"] == models[0] and g["workload"] in ("measured",) and g["value"] is not None}
    return out


def goal_table(goals: List[Dict]) -> List[str]:
    """Markdown rows: goal, model, workload, value, target, met."""
    rows = ["| goal | model | workload | batch | measured | target | met |", "|---|---|---|---|---|---|---|"]
    for g in goals:
        value = "not measured" if g["value"] is None else f"{g['value']:.2f}x"
        met = "n/a" if g["met"] is None else ("yes" if g["met"] else "**no**")
        rows.append(f"| {g['what']} | {g['model']} | {g['workload']} | {g['batch']} | {value} | "
                    f">= {g['target']:g}x | {met} |")
    return rows
