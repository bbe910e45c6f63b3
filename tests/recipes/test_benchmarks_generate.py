"""The field's benchmarks through the real generate recipe on the tiny model: every
suite from its config keys, its files, what it skipped, scores recounted here from
the rows (independently of medcap's scorer), ``medcap rescore`` and ``medcap report``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from medcap.testing import (
    make_hf_parquet_layout, make_pmcvqa_layout, make_questions_file, make_slake_layout,
)

SUITES = {"test_slake": "slake", "test_pathvqa": "pathvqa", "test_vqarad_hf": "vqaradhf", "test_pmcvqa": "pmcvqa"}
RAW_COLUMNS = ["image", "instruction", "output", "generated", "question", "answer", "answer_type"]


@pytest.fixture(scope="module")
def bench_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_data")
    return {
        "root": str(root),
        "slake": make_slake_layout(root),
        "pathvqa": make_hf_parquet_layout(root, "path-vqa"),
        "vqaradhf": make_hf_parquet_layout(root, "vqa-rad"),
        "pmcvqa": make_pmcvqa_layout(root),
        "questions": make_questions_file(root / "mine"),
    }


@pytest.fixture(scope="module")
def bench_run(gen_assets, gen_config, gen_run, bench_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_out")
    cfg = gen_config(gen_assets, out, dataset_source=bench_data["root"], **{s: True for s in SUITES})
    _, results = gen_run(cfg)
    qcfg = gen_config(gen_assets, out, dataset_source=bench_data["questions"]["path"], test_questions=True)
    _, qresults = gen_run(qcfg)
    return out, {**results, **qresults}


def _read(path):
    import csv

    with open(path, encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f))


def _recount_correct(row) -> int:
    """Written from the rules' descriptions, not from medcap's code."""
    reply, answer = row["generated"].lower(), row["output"].lower()
    if row["answer_type"] == "choice":
        letters = [L for L in "ABCD" if row[f"option_{L}"] == row["output"]]
        return int(bool(letters) and row["predict"] == letters[0])
    for marker in ("**answer**:", "**answer**", "*answer*:", "**answer:**", "answer is", "answer:", "答案:",
                   "final answer", "final answer is"):
        if marker in reply:
            reply = reply.split(marker)[-1]
    if row["answer_type"] == "open":
        return int(reply.strip() == answer.strip())
    flat = reply.replace("\n", "").replace(".", "").strip()
    if answer in ("yes", "no"):
        return int((("yes" in flat) ^ ("no" in flat)) and answer in flat)
    return int(flat == answer)


def test_each_suite_writes_raw_scored_and_summary(bench_run, bench_data):
    out, results = bench_run
    for suite, prefix in {**SUITES, "test_questions": "questions"}.items():
        raw = out / f"{prefix}-no_cond_desc-raw-meta_model_last.csv"
        assert raw.read_bytes().startswith(b"\xef\xbb\xbf")
        rows = _read(raw)
        assert set(RAW_COLUMNS) <= set(rows[0])
        summary = json.loads((out / f"{raw.stem}-summary.json").read_text())
        scored = [p for p in out.glob(f"{raw.stem}-*.csv") if re.search(r"-\d[\d.]*\.csv$", p.name)]
        assert len(scored) == 1, scored
        srows = _read(scored[0])
        assert len(srows) == len(rows)
        assert [r["generated"] for r in srows] == [r["generated"] for r in rows]
        # independent recount of every row and of the headline
        counted = [r for r in srows if r["answer_type"] in ("closed", "open", "choice") and r["output"] != ""]
        assert [int(r["correct"]) for r in counted] == [_recount_correct(r) for r in counted]
        overall = sum(_recount_correct(r) for r in counted) / len(counted)
        assert summary["scores"]["overall"] == pytest.approx(overall)
        assert float(scored[0].name[len(raw.stem) + 1 : -4]) == round(overall, 4)
        assert results[suite]["summary_path"] == str(out / f"{raw.stem}-summary.json")


def test_slake_is_english_and_reports_what_it_skipped(bench_run, bench_data):
    out, _ = bench_run
    rows = _read(out / "slake-no_cond_desc-raw-meta_model_last.csv")
    want = bench_data["slake"]["english"]
    assert [(r["image"], r["question"], r["output"], r["answer_type"]) for r in rows] == want
    report = json.loads((out / "slake-no_cond_desc-raw-meta_model_last-summary.json").read_text())["report"]
    assert (report["other_language"], report["empty_answers"], report["malformed"], report["missing_images"]) == (2, 1, 1, 1)


def test_parquet_suites_decode_cmyk_in_memory_and_leave_out_unreadable(bench_run, bench_data):
    out, _ = bench_run
    for prefix in ("pathvqa", "vqaradhf"):
        rows = _read(out / f"{prefix}-no_cond_desc-raw-meta_model_last.csv")
        kept = [k for k in bench_data[prefix]["kept"] if k[0] not in bench_data[prefix]["unreadable"]]
        assert [(r["image"], r["question"], r["output"], r["answer_type"]) for r in rows] == kept
        summary = json.loads((out / f"{prefix}-no_cond_desc-raw-meta_model_last-summary.json").read_text())
        assert list(summary["left_out_unreadable_images"]) == [f"{prefix}:5"]
        assert (summary["report"]["missing_images"], summary["report"]["empty_answers"]) == (1, 1)
    data_dir = Path(bench_data["root"]) / "path-vqa" / "data"
    assert sorted(p.name for p in data_dir.iterdir()) == ["test-00000-of-00002.parquet", "test-00001-of-00002.parquet"]


def test_pmcvqa_options_without_prefixes_and_letters(bench_run, bench_data):
    out, _ = bench_run
    rows = _read(out / "pmcvqa-no_cond_desc-raw-meta_model_last.csv")
    got = [(r["image"], {L: r[f"option_{L}"] for L in "ABCD"}, r["output"]) for r in rows]
    assert got == bench_data["pmcvqa"]["expected"]
    assert all(r["answer_type"] == "choice" for r in rows)


def test_rescore_agrees_with_every_file(bench_run):
    from medcap.eval._rescore import rescore_main

    out, _ = bench_run
    files = [str(p) for p in sorted(out.glob("*-raw-meta_model_last-*.csv")) if re.search(r"-\d[\d.]*\.csv$", p.name)]
    assert len(files) == 5
    assert rescore_main(files) == 0


def test_report_puts_the_suites_in_one_table(bench_run, capsys):
    from medcap.cli import main

    out, _ = bench_run
    assert main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "MedEvalKit" in text
    for name in ("SLAKE", "PathVQA", "VQA-RAD (HF)", "PMC-VQA", "questions"):
        assert name in text
    table = _read(out / "report.csv")
    assert [r["checkpoint"] for r in table] == ["meta_model_last"]
    summary = json.loads((out / "slake-no_cond_desc-raw-meta_model_last-summary.json").read_text())
    assert float(table[0]["SLAKE"]) == pytest.approx(summary["scores"]["overall"], abs=1e-6)
    assert (out / "report.md").read_text().startswith("scores in %")
    assert (out / "report.png").stat().st_size > 0


class _Stop(Exception):
    pass


def test_resume_after_an_interruption_ends_as_an_uninterrupted_run(gen_assets, gen_config, gen_recipe_module,
                                                                    bench_data, tmp_path):
    from medcap.eval import SuiteRun, run_benchmark

    def run(out, on_batch=None):
        cfg = gen_config(gen_assets, out, dataset_source=bench_data["root"], test_slake=True, batch_size=1)
        r = gen_recipe_module.GenerateRecipe(cfg)
        r.setup()
        context = SuiteRun(output_dir=out, ckpt=r.ckpt, image_loader=r.image_loader, identity=r.identity,
                           progress=False, on_batch=on_batch)
        return run_benchmark(r.engine, "test_slake", context, dataset_source=bench_data["root"],
                             vqa_type="no_cond_desc", max_seq_len=r.cfg.dataset_max_seq_len,
                             max_new_tokens=r.cfg.max_new_tokens)

    def stop_after_two(n):
        if n >= 2:
            raise _Stop

    with pytest.raises(_Stop):
        run(tmp_path / "a", stop_after_two)
    raw = "slake-no_cond_desc-raw-meta_model_last.csv"
    assert not (tmp_path / "a" / raw).exists() and (tmp_path / "a" / raw.replace(".csv", ".partial.csv")).exists()
    resumed = run(tmp_path / "a")
    whole = run(tmp_path / "b")
    assert (tmp_path / "a" / raw).read_bytes() == (tmp_path / "b" / raw).read_bytes()
    assert Path(resumed["scored_path"]).name == Path(whole["scored_path"]).name
    assert Path(resumed["scored_path"]).read_bytes() == Path(whole["scored_path"]).read_bytes()


def test_report_rows_are_checkpoints(bench_run, tmp_path, capsys):
    import shutil

    from medcap.eval._report import report_main

    out, _ = bench_run
    other = tmp_path / "run2"
    other.mkdir()
    for p in out.glob("pathvqa-*"):
        shutil.copy(p, other / p.name.replace("meta_model_last", "meta_model_2"))
    assert report_main([str(out), str(other), "--out", str(tmp_path / "both")]) == 0
    table = _read(tmp_path / "both.csv")
    assert [r["checkpoint"] for r in table] == [f"{out.name}/meta_model_last", "run2/meta_model_2"]
    assert table[0]["PathVQA"] == table[1]["PathVQA"] != ""
    assert table[1]["SLAKE"] == ""


def test_rescore_of_a_raw_file_needs_no_scored_file(bench_run):
    from medcap.eval._rescore import rescore

    out, _ = bench_run
    result = rescore(out / "slake-no_cond_desc-raw-meta_model_last.csv")
    summary = json.loads((out / "slake-no_cond_desc-raw-meta_model_last-summary.json").read_text())
    assert result["kind"] == "benchmark (raw)"
    assert result["scores"]["overall"]["recomputed"] == pytest.approx(summary["scores"]["overall"])


def test_pmcvqa_loglik_scoring(gen_assets, gen_config, gen_run, bench_data, tmp_path):
    cfg = gen_config(gen_assets, tmp_path, dataset_source=bench_data["root"], test_pmcvqa=True, vqa_scoring="loglik")
    _, results = gen_run(cfg)
    rows = _read(results["test_pmcvqa"]["scored_path"])
    for r in rows:
        scores = json.loads(r["predict_generated"])
        assert set(scores) == {L for L in "ABCD" if r[f"option_{L}"]}
        assert r["predict"] == max(scores, key=scores.get)
        assert int(r["correct"]) == _recount_correct(r)


def test_report_reads_omnimedvqa_macro_accuracy(tmp_path):
    import csv

    from medcap.eval._report import collect

    rows = [("CT", 1), ("CT", 0), ("X-Ray", 1)]  # per modality 0.5 and 1.0: macro 0.75
    path = tmp_path / "omnimedvqa-no_cond_desc-raw-ckpt_a-0_50-0.75.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "output", "generated", "modality_type", "correct"])
        w.writerows([["i.png", "x", "x", m, c] for m, c in rows])
    names, columns, scores = collect([tmp_path])
    assert (names, columns) == (["ckpt_a"], ["OmniMedVQA"])
    assert scores[("ckpt_a", "OmniMedVQA")] == pytest.approx(0.75)


@pytest.mark.parametrize("suite, words", [
    ("test_pathvqa", "huggingface-cli download flaviagiammarino/path-vqa"),
    ("test_vqarad_hf", "huggingface-cli download flaviagiammarino/vqa-rad"),
    ("test_slake", "Slake1.0"),
    ("test_pmcvqa", "test_clean.csv or test.csv"),
    ("test_questions", "JSONL"),
])
def test_a_missing_layout_is_named_before_anything_loads(gen_assets, gen_config, gen_recipe_module, tmp_path, suite, words):
    from medcap.config import ConfigError

    cfg = gen_config(gen_assets, tmp_path / "out", dataset_source=str(tmp_path), **{suite: True})
    with pytest.raises(ConfigError, match=re.escape(words)):
        gen_recipe_module.GenerateRecipe(cfg)


@pytest.mark.parametrize("settings, words", [
    ({"judge_endpoint": "http://127.0.0.1:9/v1"}, "judge_endpoint needs judge_model"),
    ({"judge_model": "gpt-4.1"}, "judge_model is set but judge_endpoint is null"),
    ({"judge_endpoint": "127.0.0.1:8000", "judge_model": "m"}, "must be an http(s) URL"),
    ({"judge_endpoint": "http://127.0.0.1:9/v1", "judge_model": "m", "test_slake": False, "test_pmcvqa": True},
     "judge_endpoint judges the open answers of test_slake"),
])
def test_judge_settings_are_checked_before_anything_loads(gen_assets, gen_config, gen_recipe_module, bench_data, tmp_path,
                                                          settings, words):
    from medcap.config import ConfigError

    cfg = gen_config(gen_assets, tmp_path, dataset_source=bench_data["root"], **{"test_slake": True, **settings})
    with pytest.raises(ConfigError, match=re.escape(words)):
        gen_recipe_module.GenerateRecipe(cfg)


def test_an_unreachable_judge_is_named_before_the_model_loads(gen_assets, gen_config, gen_recipe_module, bench_data,
                                                               tmp_path, monkeypatch):
    import socket

    from medcap.config import ConfigError

    port = socket.socket()
    port.bind(("127.0.0.1", 0))  # bound, not listening
    url = f"http://127.0.0.1:{port.getsockname()[1]}/v1"
    cfg = gen_config(gen_assets, tmp_path, dataset_source=bench_data["root"], test_slake=True, judge_endpoint=url,
                     judge_model="m")
    monkeypatch.setattr(gen_recipe_module.GenerateRecipe, "setup", lambda self: pytest.fail("loaded before the check"))
    with pytest.raises(ConfigError, match=re.escape(f"the judge at {url}/models cannot be reached")):
        gen_recipe_module.GenerateRecipe(cfg)
    port.close()


def test_the_question_sets_default_to_medevalkits(gen_assets, gen_config, bench_data, tmp_path):
    from medcap.config import GenerateConfig

    assert (GenerateConfig.q_lang, GenerateConfig.pmcvqa_file) == ("all", "auto")
    text = (Path(__file__).resolve().parents[2] / "recipes" / "configs" / "custom_generation_config.yaml").read_text()
    assert re.search(r"^q_lang: all\b", text, re.M) and re.search(r"^pmcvqa_file: auto\b", text, re.M)
