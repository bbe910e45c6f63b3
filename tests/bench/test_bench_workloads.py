"""The measured workload (the demo's stop lengths) and the goals the evaluation bench prints,
checked against hand-derived values."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import _goals  # noqa: E402
import _workloads  # noqa: E402

HIST = {"kinds": {"desc": {"steps": {"14": 3, "15": 1}}, "answer": {"steps": {"2": 1, "3": 1}},
                  "score": {"steps": {"2": 2}}}}


def test_lengths_come_from_their_kinds_histogram_and_are_stable():
    s = _workloads.StopLengths(HIST, seed=0)
    assert s.means() == {"desc": 14.25, "answer": 2.5, "score": 2.0}
    assert {s.length(f"desc:{i}") for i in range(200)} == {14, 15}
    assert {s.length(f"answer:{i}") for i in range(200)} == {2, 3}
    assert {s.length(f"other:{i}") for i in range(50)} <= {14, 15}  # unknown kinds take the descriptions'
    assert [s.length(f"desc:{i}") for i in range(20)] == [_workloads.StopLengths(HIST, 0).length(f"desc:{i}")
                                                          for i in range(20)]
    share = sum(s.length(f"desc:{i}") == 14 for i in range(4000)) / 4000
    assert 0.70 < share < 0.80  # 3 of 4 counts are 14


def test_budgets_are_cut_to_the_drawn_length_or_kept():
    lengths = _workloads.StopLengths(HIST, seed=0)
    measured = _workloads.StopAtLengths(object(), lengths)
    assert measured.budgets([40, 1], ["score:a", "score:b"]) == [2, 1]
    assert _workloads.StopAtLengths(object(), None).budgets(40, ["desc:a", "desc:b"]) == [40, 40]


def test_the_committed_lengths_file_is_the_demo_s():
    data = _workloads.load_stop_lengths()
    assert set(data["kinds"]) == {"desc", "answer", "score", "caption"}
    for k in data["kinds"].values():
        assert sum(k["steps"].values()) == k["rows"] and k["rows"] > 0
        assert max(int(n) for n in k["steps"]) <= k["budget"]
    assert "demo_stop_lengths.py" in data["made_by"]


def _cell(model, workload, figures):
    return {"model": model, "workload": workload, "batch": 16, "figures": figures}


def test_goals_are_read_from_the_right_cells():
    result = {"settings": {"models": {"tiny": {}}, "batches": [1, 16]}, "reference": {"tiny": {"budget": {
        "questions_per_s": 0.5}}}, "cells": [
        _cell("tiny", "measured", {"ours": {"questions_per_s": 13.0, "decode_passes": 100,
                                            "generation_tokens_per_s": 300.0},
                                   "static": {"questions_per_s": 10.0, "decode_passes": 160},
                                   "hf_static": {"questions_per_s": 10.0}, "hf_cb": {"questions_per_s": 14.0},
                                   "vllm": {"generation_tokens_per_s": 600.0}}),
        _cell("tiny", "budget", {"ours": {"questions_per_s": 4.0}, "static": {"questions_per_s": 5.0}})]}
    out = _goals.eval_goals(result)
    got = {(g["goal"], g["workload"]): (g["value"], g["met"]) for g in out["goals"]}
    assert got[("ours_vs_hf_static", "measured")] == (1.3, True)
    assert got[("ours_vs_hf_cb", "measured")] == (round(13 / 14, 3), False)
    assert got[("continuous_vs_static_decode_passes", "measured")] == (1.6, True)
    assert got[("continuous_vs_static_wall", "measured")] == (1.3, True)
    assert got[("continuous_vs_static_wall", "budget")] == (0.8, False)
    assert got[("ours_vs_vllm", "measured")] == (0.5, False)
    assert got[("ours_vs_vllm", "budget")] == (None, None)  # not measured: shown, not hidden
    assert got[("ours_vs_reference", "budget")] == (8.0, False)
    assert out["goals_met"] is False
