"""The docs' benchmark figures are the committed JSON's (``bench/results/*.json``), and that
JSON was made with ``make bench``'s settings (``bench/run_all.py``'s commands). Fast: no
benchmark runs here."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"
sys.path.insert(0, str(BENCH))

import run_all  # noqa: E402
import tables  # noqa: E402


def _results():
    res = tables.load_results()
    missing = set(tables.BENCHES) - set(res)
    assert not missing, f"bench/results/ lacks {sorted(missing)}: run make bench"
    return res


def _args_of(name: str):
    return [a for a in run_all.COMMANDS[name] if a != "DEMO"] + (["DIR"] if "DEMO" in run_all.COMMANDS[name] else [])


def test_every_docs_block_equals_what_the_committed_json_gives():
    res = _results()
    for name, (path, make) in tables.BLOCKS.items():
        assert tables.current_block(path.read_text(encoding="utf-8"), name) == make(res), (
            f"{path.name}: the {name} block differs from bench/results/*.json (edited by hand? "
            "python bench/tables.py remakes it)")


def test_a_figure_edited_by_hand_is_caught(tmp_path):
    res = _results()
    shutil.copytree(BENCH / "results", tmp_path / "results")
    r = res["train_step"]
    r["figures"]["ours"]["samples_per_s"] += 1.0  # the JSON no longer gives the docs' figure
    (tmp_path / "results" / "train_step.json").write_text(json.dumps(r), encoding="utf-8")
    assert tables.main(["--check", "--results", str(tmp_path / "results")]) == 1
    assert tables.main(["--check"]) == 0


def test_the_committed_json_was_made_with_make_bench_settings():
    import eval_omnimedvqa
    import serve
    import train_step

    res = _results()
    want = json.loads(json.dumps(eval_omnimedvqa.settings(eval_omnimedvqa.parse(run_all.COMMANDS["eval_omnimedvqa"]))))
    assert res["eval_omnimedvqa"]["settings"] == want
    cli = json.loads(json.dumps(train_step.cli_settings(train_step.parse(run_all.COMMANDS["train_step"]))))
    got = res["train_step"]["settings"]
    assert {k: got.get(k) for k in cli} == cli
    assert res["serve"]["settings"] == serve.settings(serve._args(_args_of("serve")))


def test_the_settings_check_can_fail():
    import eval_omnimedvqa

    other = eval_omnimedvqa.settings(eval_omnimedvqa.parse(["--grid", "tiny:measured:16"]))
    assert _results()["eval_omnimedvqa"]["settings"] != json.loads(json.dumps(other))


def test_no_retired_figure_is_left_in_the_docs():
    for path in (REPO / "README.md", BENCH / "README.md", REPO / "docs" / "internals.md"):
        text = path.read_text(encoding="utf-8")
        for old in ("12.6x", "1.43x", "1.46x", "5.2x", "14.0x", "4.20 questions/s"):
            assert old not in text, f"{path.name} still quotes {old}, which no command reproduces"


@pytest.mark.parametrize("name", tables.BENCHES)
def test_the_goals_are_printed_met_or_missed(name):
    r = _results()[name]
    met = r["goals_met"].values() if isinstance(r["goals_met"], dict) else [r["goals_met"]]
    assert r["goals"] and all(m in (True, False) for m in met)
