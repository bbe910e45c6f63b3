"""Scoring a benchmark's raw file: one scored file per raw file."""

from __future__ import annotations


def test_scoring_again_replaces_only_its_own_scored_file(tmp_path):
    import shutil
    from pathlib import Path

    from medcap.eval._benchmarks import score_benchmark

    src = tmp_path / "questions-no_cond_desc-raw-ck.csv"
    with open(src, "w", encoding="utf-8", newline="") as f:
        f.write("image,instruction,output,generated,question,answer,answer_type\n"
                "a.png,p,yes,Yes.,q,yes,closed\nb.png,p,left lung,lung,q,left lung,open\n")
    other = tmp_path / "questions-no_cond_desc-raw-ck-2.csv"  # the raw file of a checkpoint named ck-2
    shutil.copy(src, other)
    first = score_benchmark(None, src)
    assert Path(first["scored_path"]).name == "questions-no_cond_desc-raw-ck-0.5.csv"
    Path(first["scored_path"]).rename(tmp_path / "questions-no_cond_desc-raw-ck-0.25.csv")  # a stale scoring
    second = score_benchmark(None, src)
    assert Path(second["scored_path"]).exists() and other.exists()
    assert not (tmp_path / "questions-no_cond_desc-raw-ck-0.25.csv").exists()
