"""``bench/demo_seeds.py``: the demo's figures over seeds, and the README table made from them.
The README's table must be what the committed JSON renders to, and that JSON must come
from full demo runs with the demo's default settings."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("_demo_seeds", REPO / "bench" / "demo_seeds.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _summary(seed: int, trained_unseen_acc: float, wall: float) -> dict:
    return {
        "settings": {"seed": seed, "threads": 0, "n_train": 5000},
        "trained": {"CIDEr": 9.0, "seen": {"CIDEr": 9.5, "macro_accuracy": 1.0},
                    "unseen": {"CIDEr": 6.0, "macro_accuracy": trained_unseen_acc}},
        "control": {"seen": {"macro_accuracy": 0.3}, "unseen": {"macro_accuracy": 0.4}},
        "chance": {"all": {"CIDEr": 1.7}, "seen": {"macro_accuracy": 0.35}, "unseen": {"macro_accuracy": 0.35}},
        "seconds": {"total": wall, "train": wall / 2}, "cpu_seconds": {"total": wall / 2}, "threads": 1,
        "targets_met": True, "held_out": {"test_images": {"seen": 120, "unseen": 120}},
    }


def test_figures_and_aggregate_by_hand(tmp_path):
    ds = _script()
    for seed, acc, wall in ((0, 0.8, 300.0), (1, 0.9, 400.0), (2, 0.7, 500.0)):
        folder = tmp_path / f"seed{seed}"
        folder.mkdir()
        (folder / "summary.json").write_text(json.dumps(_summary(seed, acc, wall)))
    data = ds.collect(tmp_path, [0, 1, 2], run=False)
    agg = data["aggregate"]
    assert agg["trained.unseen.macro_accuracy"] == pytest.approx({"mean": 0.8, "min": 0.7, "max": 0.9})
    assert agg["trained.all.CIDEr"]["mean"] == 9.0 and agg["chance.all.CIDEr"]["max"] == 1.7
    assert agg["control.seen.macro_accuracy"]["mean"] == pytest.approx(0.3)
    assert agg["seconds.total"] == {"mean": 400.0, "min": 300.0, "max": 500.0}
    assert agg["running_share"]["mean"] == pytest.approx(0.5)
    assert data["settings"] == {"n_train": 5000}
    table = ds.render_table(data)
    assert "| OmniMedVQA-layout macro accuracy, **unseen** | **0.800 (0.700-0.900)** | 0.400 (0.400-0.400) | " \
           "0.350 (0.350-0.350) |" in table
    assert "120 test images of seen and 120 of unseen combinations" in table
    assert "| targets met (all four: CIDEr and accuracy, seen and unseen) | 3 of 3 runs |" in table
    assert "300-500 s per run, of which vision training 150-250 s" in table
    assert "ran 50-50% of it (CPU s / (wall s x threads): 150-250 CPU s)" in table


def test_refuses_mixed_settings_and_wrong_seeds(tmp_path):
    ds = _script()
    for seed in (0, 1):
        (tmp_path / f"seed{seed}").mkdir()
        s = _summary(seed, 0.8, 300.0)
        s["settings"]["n_train"] = 5000 + seed
        (tmp_path / f"seed{seed}" / "summary.json").write_text(json.dumps(s))
    with pytest.raises(SystemExit, match="different settings"):
        ds.collect(tmp_path, [0, 1], run=False)
    (tmp_path / "seed2").mkdir()
    (tmp_path / "seed2" / "summary.json").write_text(json.dumps(_summary(0, 0.8, 300.0)))  # seed 0's run
    with pytest.raises(SystemExit, match="not a full demo run with seed 2"):
        ds.collect(tmp_path, [2], run=False)


def test_readme_block_is_replaced_and_nothing_else(tmp_path):
    ds = _script()
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{ds.BEGIN}\nold table\n{ds.END}\nafter\n")
    ds.write_readme("new | table", readme)
    assert readme.read_text() == f"before\n{ds.BEGIN}\nnew | table\n{ds.END}\nafter\n"
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="needs one"):
        ds.write_readme("x", readme)


def test_committed_figures_are_the_readme_table():
    """The README's seed table is what `python bench/demo_seeds.py --table-only` makes from
    the committed JSON, and that JSON holds full runs of seeds 0-2 with the default settings."""
    from medcap.demo._settings import DemoSettings

    ds = _script()
    data = json.loads(ds.RESULTS.read_text(encoding="utf-8"))
    text = ds.README.read_text(encoding="utf-8")
    block = text.split(ds.BEGIN)[1].split(ds.END)[0].strip("\n")
    assert block == ds.render_table(data), "README's demo-seeds table differs from bench/results/demo_seeds.json"
    defaults = {k: v for k, v in dataclasses.asdict(DemoSettings()).items() if k not in ("seed", "threads")}
    assert data["settings"] == defaults
    assert data["seeds"] == [0, 1, 2] and [r["seed"] for r in data["runs"]] == [0, 1, 2]
