"""recipes/generate.py on the tiny model, in this process: each mode writes the
reference's files, accuracies agree with a recount of the written rows, existing
raw files are re-scored without generating, and the slow path agrees."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from medcap.eval import OMNIMEDVQA_MODALITIES, read_csv_rows
from medcap.generation import GenerationEngine, question_from_instruction

RAW = ["image", "instruction", "output", "generated"]
OMNI_RAW = RAW + ["option_A", "option_B", "option_C", "option_D", "modality_type", "question_id"]


def _recount(rows):
    """Accuracy from the written rows alone: ``predict`` is a letter, correct iff the
    option it names (A-D, absent ones empty) is the first one equal to the ground
    truth; mean over modalities of each one's accuracy."""
    per = {}
    for r in rows:
        options = [r[f"option_{L}"] for L in "ABCD"]
        assert len(r["predict"]) <= 1
        ok = int(r["predict"] in ("A", "B", "C", "D") and r["output"] in options
                 and "ABCD".index(r["predict"]) == options.index(r["output"]))
        assert int(r["correct"]) == ok
        per.setdefault(r["modality_type"], []).append(ok)
    return sum(sum(v) / len(v) for v in per.values()) / len(per)


def _no_generation(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("an existing raw file must not be generated again")

    monkeypatch.setattr(GenerationEngine, "generate_tokens", refuse)


@pytest.mark.slow
def test_omnimedvqa_letter_scoring_then_loglik_rescore(gen_assets, gen_config, gen_run, tmp_path, monkeypatch, capsys):
    cfg = gen_config(gen_assets, tmp_path, test_omnimedvqa=True, vqa_type="no_cond_desc",
                     dataset_source=gen_assets["datasets"], max_new_tokens=8)
    recipe, res = gen_run(cfg)
    assert recipe.ckpt == "meta_model_last"
    raw = tmp_path / "omnimedvqa-no_cond_desc-raw-meta_model_last-0_50.csv"  # the reference's name for this line
    rows = read_csv_rows(raw)
    assert list(rows[0].keys()) == OMNI_RAW
    assert len(rows) == gen_assets["omni"]["kept"] - gen_assets["omni"]["missing_images"]
    assert {r["modality_type"] for r in rows} == set(OMNIMEDVQA_MODALITIES)
    assert all(question_from_instruction(r["instruction"]).startswith("What finding is visible") for r in rows)
    assert all(not Path(r["image"]).is_absolute() and r["image"].startswith("Images/") for r in rows)  # as in the data set
    assert all(not r["instruction"].startswith("<|begin_of_text|>") for r in rows)
    assert raw.read_bytes().startswith(b"\xef\xbb\xbf")
    report = json.loads((tmp_path / "omnimedvqa-no_cond_desc-raw-meta_model_last-0_50.report.json").read_text())
    assert report["missing_images"] == 1 and report["modality_key_instead_of_modality_type"] == 1
    out = res["test_omnimedvqa"]
    scored = read_csv_rows(out["scored_path"])
    # the peers' cells beside medcap's (issue #25: medevalkit's and huatuo's conventions per row)
    assert list(scored[0].keys()) == OMNI_RAW + ["predict_generated", "predict", "correct", "medevalkit_correct",
                                                 "huatuo_predict", "huatuo_correct"]
    acc = _recount(scored)
    assert out["accuracy"] == pytest.approx(acc)
    assert Path(out["scored_path"]).name == f"{raw.stem}-{round(acc, 4)}.csv"
    # medcap rescore recomputes it from the rows, with no model.
    from medcap.eval._rescore import rescore

    again = rescore(out["scored_path"])["scores"]
    assert again["letter_macro"]["recomputed"] == pytest.approx(acc)
    assert again["letter_micro"]["recomputed"] == pytest.approx(sum(int(r["correct"]) for r in scored) / len(scored))
    for suffix in (".json", ".png"):
        assert Path(out["scored_path"]).with_name(Path(out["scored_path"]).stem + "-modality" + suffix).is_file()
    # the breakdown CSV is named so that a glob for scored files never matches it (issue #22 item 6)
    assert Path(out["scored_path"]).with_name("modality-" + Path(out["scored_path"]).name).is_file()
    assert [p.name for p in tmp_path.glob(f"{raw.stem}-*.csv")] == [Path(out["scored_path"]).name]
    assert "macro accuracy" in capsys.readouterr().out

    # Re-run with the raw file present: no generation, re-scored by log-likelihood.
    before = raw.read_bytes()
    _no_generation(monkeypatch)
    cfg2 = gen_config(gen_assets, tmp_path, test_omnimedvqa=True, vqa_type="no_cond_desc",
                      dataset_source=gen_assets["datasets"], max_new_tokens=8, vqa_scoring="loglik")
    _, res2 = gen_run(cfg2)
    assert raw.read_bytes() == before
    lrows = read_csv_rows(res2["test_omnimedvqa"]["scored_path"])
    assert Path(res2["test_omnimedvqa"]["scored_path"]).name.startswith(f"{raw.stem}-loglik-")
    for r in lrows:
        scores = json.loads(r["predict_generated"])
        options = {L: r[f"option_{L}"] for L in "ABCD" if r[f"option_{L}"] != ""}
        assert set(scores) == set(options)
        assert r["predict"] == max(scores, key=scores.get)  # the letter of the best option
    lacc = _recount(lrows)
    assert res2["test_omnimedvqa"]["accuracy"] == pytest.approx(lacc) and 0 < lacc


def test_vqarad_files_and_slow_path_agree(gen_assets, gen_config, gen_run, tmp_path):
    fast_dir, slow_dir = tmp_path / "fast", tmp_path / "slow"
    common = dict(test_vqarad=True, vqa_type="cond_desc", dataset_source=gen_assets["datasets"], max_new_tokens=8)
    gen_run(gen_config(gen_assets, fast_dir, batch_size=4, **common))
    name = "vqarad-cond_desc-raw-meta_model_last.csv"
    rows = read_csv_rows(fast_dir / name)
    assert list(rows[0].keys()) == RAW
    expected = gen_assets["vqarad"]["expected"]
    assert [(Path(r["image"]).name, question_from_instruction(r["instruction"]), r["output"]) for r in rows] == expected
    # enable_kv_cache=False: the reference's algorithm, one question at a time, no cache
    # (debug: the first 3 questions, under output_dir/debug).
    gen_run(gen_config(gen_assets, slow_dir, enable_kv_cache=False, debug=True, debug_samples=3, **common))
    slow = read_csv_rows(slow_dir / "debug" / name)
    assert slow == rows[:3]
    assert not (slow_dir / name).exists()


@pytest.mark.slow
def test_metrics_mode_and_rescore(gen_assets, gen_config, gen_run, tmp_path, monkeypatch):
    cfg = gen_config(gen_assets, tmp_path, test_metrics=True, dataset_source=gen_assets["train_json"])
    _, res = gen_run(cfg)
    raw = tmp_path / "metrics-raw-meta_model_last.csv"
    assert raw.read_bytes().startswith(b"\xef\xbb\xbf")  # UTF-8 with BOM, as the reference wrote it
    rows = read_csv_rows(raw)
    assert list(rows[0].keys()) == RAW and len(rows) == 5
    records = json.loads(Path(gen_assets["train_json"]).read_text())
    assert [r["output"] for r in rows] == [rec["conversations"][1]["value"] for rec in records]
    metrics = (tmp_path / "metrics-meta_model_last.csv").read_text().splitlines()
    assert [m.split(",")[0] for m in metrics] == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]
    _no_generation(monkeypatch)
    _, res2 = gen_run(cfg)
    assert res2["test_metrics"]["scores"] == res["test_metrics"]["scores"]


def test_single_shot_captions_and_answers(gen_assets, gen_config, gen_run, tmp_path, capsys):
    imgs = sorted(str(p) for p in Path(gen_assets["train_json"]).parent.glob("images/*.png"))[:2]
    _, res = gen_run(gen_config(gen_assets, tmp_path, image=",".join(imgs), prompt="What is shown?"))
    assert [r["image"] for r in res["single"]] == imgs
    out = capsys.readouterr().out
    assert all(f"{p}: " in out for p in imgs)
    _, res2 = gen_run(gen_config(gen_assets, tmp_path, images=imgs[:1]))
    assert res2["single"][0]["prompt"] == ""


def test_chunk_file_names(gen_assets, gen_config, gen_run, tmp_path):
    # 16 questions, chunks of max(16 // 2, 50) = 50: chunk 1 of 2 is empty, and says so in its name.
    _, res = gen_run(gen_config(gen_assets, tmp_path, test_omnimedvqa=True, vqa_type="omit",
                                dataset_source=gen_assets["datasets"], test_chunk_idx=1, test_chunk=2))
    assert Path(res["test_omnimedvqa"]["raw_path"]).name == "omnimedvqa-omit-raw-meta_model_last-1_2.csv"
    assert read_csv_rows(res["test_omnimedvqa"]["raw_path"]) == []


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"test_vqarad": True, "vqa_type": "describe"}, "vqa_type"),
        ({"test_vqarad": True, "quantizer": {"_component_": "x"}}, "quantizer"),
        ({}, "nothing to do"),
        ({"test_metrics": True, "dataset_conversation_style": "openai"}, "sharegpt"),
        ({"test_omnimedvqa": True, "vqa_scoring": "judge"}, "vqa_scoring"),
        ({"test_metrics": True, "vision": "clip"}, "vision"),
    ],
)
def test_config_errors_are_clear(gen_assets, gen_config, gen_recipe_module, tmp_path, overrides, match):
    mod = gen_recipe_module
    with pytest.raises(ValueError, match=match):
        mod.GenerateRecipe(gen_config(gen_assets, tmp_path, **overrides))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback when no GPU is present")
def test_cuda_falls_back_to_cpu(gen_assets, gen_config, gen_recipe_module, tmp_path, caplog):
    r = gen_recipe_module.GenerateRecipe(gen_config(gen_assets, tmp_path, device="cuda", test_metrics=True))
    assert r.device == torch.device("cpu")
    assert "no CUDA device" in caplog.text


@pytest.mark.slow
@pytest.mark.integration
def test_documented_command_killed_and_restarted_ends_with_the_same_files(gen_assets, gen_config, gen_run, tmp_path):
    """`medcap run generate --config tiny/generate ...` killed with SIGKILL after a few
    rows, then started again, writes what an uninterrupted run writes."""
    # chunk_size=1: each row reaches the disk on its own; 40 questions, so that the kill
    # after the second row lands mid-run however fast the rows come.
    from medcap.testing import make_vqarad_layout

    datasets = tmp_path / "datasets"
    n_items = len(make_vqarad_layout(datasets, n_images=20, image_size=36)["expected"])
    args = dict(test_vqarad="True", vqa_type="no_cond_desc", batch_size="1", chunk_size="1", max_new_tokens="48",
                dataset_source=str(datasets), vision_checkpoint=gen_assets["vision_checkpoint"])
    name = "vqarad-no_cond_desc-raw-meta_model_last.csv"
    ref_dir = tmp_path / "ref"
    gen_run(gen_config(gen_assets, ref_dir, **{k: (int(v) if v.isdigit() else v) for k, v in args.items()}))

    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "medcap.cli", "run", "generate", "--config", "tiny/generate",
           f"assets_dir={gen_assets['assets_dir']}", f"output_dir={out}", "progress=False",
           *[f"{k}={v}" for k, v in args.items()]]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    partial = out / name.replace(".csv", ".partial.csv")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if partial.exists() and len(read_csv_rows(partial)) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the recipe it started
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.stderr.close()
    n_before = len(read_csv_rows(partial))
    assert 2 <= n_before < n_items and not (out / name).exists()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming with" in done.stderr
    assert (out / name).read_bytes() == (ref_dir / name).read_bytes()
    assert not partial.exists()


def test_another_model_under_the_same_checkpoint_name_never_reuses_rows(gen_assets, gen_config, gen_run, tmp_path):
    """Model B, saved as meta_model_last.pt like model A, evaluated into A's folder: the
    finished file of A is refused (naming what to move), never re-scored as B's; with
    overwrite=True B gets its own rows, equal to B evaluated in a fresh folder."""
    from medcap.models import medcap_tiny, save_vision_checkpoint

    torch.manual_seed(77)
    other = tmp_path / "b" / "meta_model_last.pt"
    save_vision_checkpoint(medcap_tiny(**gen_assets["model_kwargs"], num_image_tokens=4), other)
    common = dict(test_vqarad=True, vqa_type="no_cond_desc", dataset_source=gen_assets["datasets"], max_new_tokens=6)
    shared, fresh = tmp_path / "shared", tmp_path / "fresh"
    gen_run(gen_config(gen_assets, shared, **common))
    name = "vqarad-no_cond_desc-raw-meta_model_last.csv"
    a_bytes = (shared / name).read_bytes()
    with pytest.raises(ValueError, match=r"another model.*vision_checkpoint.*overwrite=True"):
        gen_run(gen_config(gen_assets, shared, vision_checkpoint=str(other), **common))
    assert (shared / name).read_bytes() == a_bytes
    gen_run(gen_config(gen_assets, shared, vision_checkpoint=str(other), overwrite=True, **common))
    gen_run(gen_config(gen_assets, fresh, vision_checkpoint=str(other), **common))
    assert (shared / name).read_bytes() == (fresh / name).read_bytes()
    # Other settings (a longer description budget) are refused the same way.
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen_run(gen_config(gen_assets, fresh, vision_checkpoint=str(other), **{**common, "max_new_tokens": 9}))


def _cli(gen_assets, tmp_path, *overrides, env=None):
    cmd = [sys.executable, "-m", "medcap.cli", "run", "generate", "--config", "tiny/generate",
           f"assets_dir={gen_assets['assets_dir']}", f"output_dir={tmp_path / 'out'}", "progress=False",
           f"vision_checkpoint={gen_assets['vision_checkpoint']}", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


@pytest.mark.integration
@pytest.mark.parametrize(
    "overrides,message",
    [
        (["test_metrics=True", "batch_sze=4"], "medcap run: error: unknown key 'batch_sze' (did you mean 'batch_size'?)"),
        (["test_metrics=True", "tokenizer.path=/nowhere/tokenizer.model"],
         "medcap run: error: tokenizer.path='/nowhere/tokenizer.model': no such file"),
        (["test_metrics=True", "model.num_layer=3"], "medcap run: error: model.num_layer: medcap.models.medcap_tiny "
                                                      "takes no argument 'num_layer' (did you mean 'num_layers'?)"),
    ],
)
def test_user_errors_are_one_line_before_any_model_is_built(gen_assets, tmp_path, overrides, message):
    done = _cli(gen_assets, tmp_path, *overrides)
    assert done.returncode == 2
    # The launcher's echo of the command it runs, then the recipe's one line.
    lines = [ln for ln in done.stderr.splitlines() if ln.strip() and not ln.startswith(f"medcap run: {sys.executable}")]
    assert lines == [message], done.stderr[-2000:]  # no traceback, and no weight was read (nothing else logged)
    assert not (tmp_path / "out").exists()


def test_debug_env_shows_the_traceback(gen_assets, tmp_path):
    done = _cli(gen_assets, tmp_path, "test_metrics=True", "batch_sze=4", env={"MEDCAP_DEBUG": "1"})
    assert done.returncode != 0 and "Traceback" in done.stderr and "ConfigError" in done.stderr


@pytest.mark.integration
def test_free_text_prompts_stay_free_text(gen_assets, tmp_path):
    img = sorted(Path(gen_assets["train_json"]).parent.glob("images/*.png"))[0]
    for prompt in ("[urgent] Modality: which one?", "yes"):
        done = _cli(gen_assets, tmp_path, f"image={img}", f"prompt={prompt}", "debug=True", "max_new_tokens=2")
        assert done.returncode == 0, done.stderr[-2000:]
        assert f"<|start_header_id|>user<|end_header_id|>\n\n" in done.stdout
        assert f"\n\n{prompt}<|eot_id|><|start_header_id|>assistant" in done.stdout  # the question as typed


@pytest.mark.slow
@pytest.mark.integration
def test_two_ranks_write_the_files_of_one_process_even_after_a_rank_is_killed(gen_assets, gen_config, gen_run, tmp_path):
    """`medcap run --nproc_per_node 2 generate ...` (torchrun, gloo on the CPU): each rank
    answers its share, rank 0 writes the files; a rank killed mid-run, then the same
    command again, ends with the bytes one process writes."""
    common = dict(test_omnimedvqa=True, vqa_type="no_cond_desc", dataset_source=gen_assets["datasets"], max_new_tokens=6)
    ref = tmp_path / "one"
    _, res = gen_run(gen_config(gen_assets, ref, **common))
    raw_name = Path(res["test_omnimedvqa"]["raw_path"]).name
    scored_name = Path(res["test_omnimedvqa"]["scored_path"]).name

    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "medcap.cli", "run", "--nproc-per-node", "2", "--standalone", "generate",
           "--config", "tiny/generate", f"assets_dir={gen_assets['assets_dir']}", f"output_dir={out}", "progress=False",
           f"vision_checkpoint={gen_assets['vision_checkpoint']}", "batch_size=1", "chunk_size=1",
           *[f"{k}={v}" for k, v in common.items()]]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 240
        rank1 = out / raw_name.replace(".csv", ".partial.rank1.csv")
        while time.time() < deadline and proc.poll() is None:
            if rank1.exists() and len(read_csv_rows(rank1)) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        victim = _worker_pid(str(out), rank=1)
        os.kill(victim, signal.SIGKILL)  # one rank dies; torchrun takes the job down
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.stderr.close()
    assert proc.returncode != 0 and not (out / raw_name).exists()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming with" in done.stderr
    assert (out / raw_name).read_bytes() == (ref / raw_name).read_bytes()
    assert (out / scored_name).read_bytes() == (ref / scored_name).read_bytes()
    assert not list(out.glob("*.partial*.csv")) and not list(out.glob("*.left_out.rank*"))


def _worker_pid(marker: str, rank: int) -> int:
    """The PID of the torchrun worker of ``rank`` whose command line names ``marker``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            environ = (entry / "environ").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "generate.py" in cmdline and marker in cmdline and f"RANK={rank}" in environ:
            return int(entry.name)
    raise AssertionError(f"no worker of rank {rank} found")


def test_the_launcher_refuses_a_misspelled_key_before_importing_torch(gen_assets, tmp_path):
    """`medcap run` reads the config as the recipe will before it starts anything, so a
    typo in an 8B run costs a fraction of a second: torch is never imported."""
    cmd = [sys.executable, "-X", "importtime", "-m", "medcap.cli", "run", "generate", "--config", "tiny/generate",
           f"assets_dir={gen_assets['assets_dir']}", "test_metrics=True", "batch_sze=4"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = [ln for ln in done.stderr.splitlines() if not ln.startswith("import time:")]
    assert lines == ["medcap run: error: unknown key 'batch_sze' (did you mean 'batch_size'?)"]
    assert not [ln for ln in done.stderr.splitlines() if ln.startswith("import time:") and ln.rstrip().endswith("| torch")]


def test_compile_and_chunk_size_reach_the_engine(gen_assets, gen_config, gen_recipe_module, tmp_path):
    r = gen_recipe_module.GenerateRecipe(gen_config(gen_assets, tmp_path, test_metrics=True, batch_size=3))
    r.setup()
    assert (r.engine.batch_size, r.engine.chunk_size, bool(r.engine.compile)) == (3, 12, False)  # 4 x batch_size
    r2 = gen_recipe_module.GenerateRecipe(gen_config(gen_assets, tmp_path, test_metrics=True, chunk_size=5, compile=True))
    r2.setup()
    assert r2.engine.chunk_size == 5 and r2.engine.compile
