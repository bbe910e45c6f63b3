"""The options that change a suite's question set: PMC-VQA's file (test_2.csv first, the
set MedEvalKit scores) and SLAKE's language, each run saying which published table its
questions make the suite comparable with."""

from __future__ import annotations

import csv
import shutil

import pytest

from medcap.eval._benchmark_readers import read_pmcvqa
from medcap.testing import make_pmcvqa_layout


def _test_2(tmp_path):
    """A test_2.csv as PMC-VQA's second release writes it: choices "A:text", the answer a letter."""
    with open(tmp_path / "PMC-VQA" / "test_2.csv", "w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows([
            ["index", "Figure_path", "Caption", "Question", "Choice A", "Choice B", "Choice C", "Choice D", "Answer", "split"],
            ["7", "PMC0_fig.jpg", "a caption", "Which scan?", "A:MRI ", "B:CT ", "C:PET ", "D:X-ray ", "B", "test"],
        ])


def test_auto_takes_test_2_the_set_medevalkit_scores(tmp_path):
    make_pmcvqa_layout(tmp_path)  # test_clean.csv
    _test_2(tmp_path)
    items, report = read_pmcvqa(tmp_path)
    assert report["file"] == "test_2.csv" and report["comparable_with"] == "MedEvalKit's PMC-VQA"
    assert [(it.question, it.answer, it.extra["option_B"]) for it in items] == [("Which scan?", "CT", "CT")]
    items, report = read_pmcvqa(tmp_path, file="test_clean.csv")
    assert report["file"] == "test_clean.csv" and report["comparable_with"] is None and len(items) == 3


def test_a_named_file_that_is_not_there_is_said(tmp_path):
    make_pmcvqa_layout(tmp_path)
    with pytest.raises(FileNotFoundError, match="test_3.csv"):
        read_pmcvqa(tmp_path, file="test_3.csv")
    shutil.rmtree(tmp_path / "PMC-VQA")
    with pytest.raises(FileNotFoundError, match="test_2.csv.*test_clean.csv.*test.csv"):
        read_pmcvqa(tmp_path)


def test_each_run_says_which_table_its_questions_compare_with(scripted, fake_image_loader, tmp_path, capsys):
    from medcap.eval import SuiteRun, run_benchmark

    make_pmcvqa_layout(tmp_path / "data")
    run = SuiteRun(output_dir=tmp_path / "out", ckpt="ck", image_loader=fake_image_loader, progress=False)
    engine = scripted(lambda text, key, budget: "B")
    common = dict(dataset_source=str(tmp_path / "data"), vqa_type="omit", max_seq_len=500, max_new_tokens=8)
    run_benchmark(engine, "test_pmcvqa", run, **common)
    assert "PMC-VQA: questions from test_clean.csv: not the set MedEvalKit's table scores" in capsys.readouterr().out
    from medcap.testing import make_slake_layout

    make_slake_layout(tmp_path / "data")
    run_benchmark(engine, "test_slake", run, **common, q_lang="en")
    assert "SLAKE: q_lang=en: English questions: the set LLaVA-Med's table scores" in capsys.readouterr().out
