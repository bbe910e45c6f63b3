"""A smoke run of the whole demo at tiny sizes (``medcap demo --quick``): every stage
runs through the real recipes, summary.json holds every key, and a second run
resumes (skips every finished stage)."""

from __future__ import annotations

import json
import shlex
import shutil

import pytest

from medcap.demo import main
from medcap.demo._settings import STAGES

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    if shutil.which("java") is None:
        pytest.skip("Java is needed for the captioning metrics (scripts/ensure_java.sh)")
    out = tmp_path_factory.mktemp("demo")
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = main(["--out", str(out), "--quick"])
    assert rc == 0
    (out / "printed.txt").write_text(printed.getvalue())
    return out


def test_summary_has_every_key(quick_demo):
    s = json.loads((quick_demo / "summary.json").read_text())
    for who in ("trained", "control"):
        assert set(s[who]) >= {"captioning", "CIDEr", "macro_accuracy", "per_modality", "caption_exact_match",
                               "seen", "unseen"}
        assert set(s[who]["captioning"]) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
        assert 0.0 <= s[who]["macro_accuracy"] <= 1.0
        for half in ("seen", "unseen"):  # the quick world: 16 test images, 8 of each half, 1 question each
            assert s[who][half]["n_images"] == 8 and s[who][half]["n_questions"] == 8
            assert set(s[who][half]["captioning"]) == set(s[who]["captioning"])
            assert 0.0 <= s[who][half]["macro_accuracy"] <= 1.0
    for half in ("all", "seen", "unseen"):
        assert {"CIDEr", "caption_exact_match", "macro_accuracy"} <= set(s["chance"][half])
    assert s["chance_CIDEr"] == s["chance"]["all"]["CIDEr"]
    assert len(s["held_out"]["combinations"]) == 16 and s["held_out"]["test_images"] == {"seen": 8, "unseen": 8}
    assert set(s["seconds"]) == set(STAGES) | {"total"}
    assert abs(s["seconds"]["total"] - sum(v for k, v in s["seconds"].items() if k != "total")) < 0.5
    assert set(s["cpu_seconds"]) >= set(STAGES[:-1]) and s["cpu_seconds"]["total"] > 0
    assert set(s["commands"]) == set(STAGES)
    assert {"targets", "targets_met", "targets_verdict", "chance_accuracy", "chance_CIDEr", "settings"} <= set(s)
    assert [(c["metric"], c["combinations"]) for c in s["targets"]["checks"]] == [
        ("CIDEr", "seen"), ("CIDEr", "unseen"), ("macro_accuracy", "seen"), ("macro_accuracy", "unseen")]
    # chance of the quick world's questions (2 or 4 options) lies between 1/4 and 1/2
    assert 0.25 <= s["chance_accuracy"] <= 0.5
    assert (quick_demo / "report.png").stat().st_size > 10_000


def test_quick_run_says_which_targets_it_can_meet(quick_demo):
    """No bare "targets met: False": a quick run says it is not judged, and why."""
    s = json.loads((quick_demo / "summary.json").read_text())
    assert s["quick"] is True and s["targets_met"] is None
    printed = (quick_demo / "printed.txt").read_text()
    assert "targets not judged: a --quick run is a smoke run" in printed
    assert "Cannot be met in a quick run: CIDEr" in printed
    assert "targets met: False" not in printed and "report.png:" not in printed  # no image went missing
    for row in ("CIDEr, seen (8)", "CIDEr, unseen (8)", "macro accuracy, unseen (8)", "caption exact match, seen"):
        assert row in printed
    assert printed.count("(not judged in --quick)") == 4 and "MISSED" not in printed


def test_commands_rerun_their_stage(quick_demo):
    """Each recipe stage's command is a `medcap run` line whose config and keys resolve,
    and the demo's own stages point back at `medcap demo --stage`."""
    from medcap.cli import build_run_command

    s = json.loads((quick_demo / "summary.json").read_text())
    for stage, cmd in s["commands"].items():
        argv = shlex.split(cmd)
        if argv[1] == "run":
            full = build_run_command(argv[2:] + ["seed=3"])  # appending an override still parses
            assert full[-1] == "seed=3" and f"demo_dir={quick_demo}" in full
        else:
            assert argv[:2] == ["medcap", "demo"] and argv[argv.index("--stage") + 1] == stage
            assert "--quick" in argv


def test_second_run_skips_finished_stages(quick_demo, capsys):
    before = (quick_demo / "summary.json").stat().st_mtime_ns
    assert main(["--out", str(quick_demo), "--quick"]) == 0
    out = capsys.readouterr().out
    for stage in STAGES[:-1]:
        assert f"{stage}: already done" in out
    # the report is always rewritten, from the kept results
    assert (quick_demo / "summary.json").stat().st_mtime_ns >= before


def test_a_moved_demo_still_evaluates(quick_demo, tmp_path):
    """`mv` the whole demo folder: the captioning evaluation runs from the new place
    (the data name their images relative to their own folder) and reads only files there."""
    moved = tmp_path / "moved_demo"
    shutil.move(str(quick_demo), str(moved))
    try:
        assert main(["--out", str(moved), "--quick", "--stage", "eval_trained_captions"]) == 0
        raw = list((moved / "eval" / "trained").glob("metrics-raw-*.csv"))
        assert len(raw) == 1 and (moved / "eval" / "trained" / "metrics-meta_model_last.csv").is_file()
        from medcap.eval import read_csv_rows

        rows = read_csv_rows(raw[0])
        assert len(rows) == len(json.loads((moved / "world" / "test.json").read_text()))
        assert str(quick_demo) not in raw[0].read_text(encoding="utf-8-sig")
    finally:
        shutil.move(str(moved), str(quick_demo))
