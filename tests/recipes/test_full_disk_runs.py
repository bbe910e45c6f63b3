"""A full disk at each write path of an evaluation and of training ends the command in
one line naming the file and the free space (exit 2), and the run after space is freed
ends with the files of a run that never stopped, byte for byte; no lock file is left.

The fake full disk (``full_disk``) fails ``os.write`` to the files a pattern names; the
last test fills a real tmpfs (a user namespace: ``unshare``) at every size the run
passes through."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict

import pytest
from omegaconf import OmegaConf

RAW = "omnimedvqa-no_cond_desc-raw-meta_model_last-0_50"


def _files(folder: Path) -> Dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def omni_run(gen_assets, gen_config, gen_recipe_module, tmp_path_factory):
    """(run(), the output folder, its files after one uninterrupted run): ``run()`` is
    ``medcap run generate`` (OmniMedVQA, descriptions, letter scoring) in this process."""
    root = tmp_path_factory.mktemp("disk_full")
    out = root / "out"
    config = root / "generate.yaml"
    OmegaConf.save(gen_config(gen_assets, out, test_omnimedvqa=True, vqa_type="no_cond_desc",
                              dataset_source=gen_assets["datasets"], max_new_tokens=8), config)

    def run() -> int:
        return gen_recipe_module.recipe_main(["--config", str(config)])

    assert run() == 0
    clean = _files(out)
    shutil.rmtree(out)
    return run, out, clean


CASES = {  # what fills up: (the file names the fake full disk fails, writes let through first)
    "the results lock": (r"^\." + RAW + r"\.csv\.lock$", 0),
    "the saved config": (r"config\.yaml\.\w+\.tmp$", 0),
    "the run record, first": (RAW + r"\.run\.json\.\w+\.tmp$", 0),
    "the partial rows' header": (RAW + r"\.partial\.csv$", 0),
    "the partial rows": (RAW + r"\.partial\.csv$", 1),
    "the description cache": (RAW + r"\.descriptions\.jsonl$", 0),
    "the run record, last": (RAW + r"\.run\.json\.\w+\.tmp$", 1),
    "the final raw file": (r"^\." + RAW + r"\.csv\.\w+\.tmp$", 0),
    "the scored rows": (RAW + r"-scored\.partial\.csv$", 1),
    "the scored breakdown": (RAW + r"-[0-9.]+-modality\.json\.\w+\.tmp$", 0),
}
FAST = {"the results lock", "the description cache", "the run record, last"}  # the rest: -m slow


@pytest.mark.parametrize("case", [c if c in FAST else pytest.param(c, marks=pytest.mark.slow) for c in CASES])
def test_a_full_disk_mid_evaluation_is_one_line_and_the_resume_is_byte_identical(omni_run, full_disk, capsys, case):
    run, out, clean = omni_run
    shutil.rmtree(out, ignore_errors=True)
    capsys.readouterr()
    full_disk.fill(*CASES[case])
    assert run() == 2
    err = capsys.readouterr().err
    assert full_disk.hits >= 1
    errors = [line for line in err.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert len(errors) == 1 and errors[0].startswith("medcap run: error: no space left on device writing "), err
    assert " free): free some space and run the same command again" in errors[0]
    assert not list(out.glob(".*.lock")) and not list(out.glob(".*.tmp"))
    full_disk.free()
    assert run() == 0
    assert _files(out) == clean  # byte for byte, and no lock file: the clean run left none


def test_a_full_disk_at_a_checkpoint_is_one_line_and_the_run_resumes(train_assets, train_config, train_recipe_module,
                                                                      tmp_path, monkeypatch, capsys):
    """The checkpoint writers (safetensors, torch.save) write in C, so the fault is raised
    as torch.save raises it, for the resumable state at the end of the second epoch; the
    run after that ends with the weights of a run that never stopped."""
    import errno

    import torch

    from medcap.models import load_vision_checkpoint

    recipe = train_recipe_module("full_finetune_single_device")
    over = dict(epochs=2, max_steps_per_epoch=2, progress=False)
    assert recipe.recipe_main(["--config", _save(train_config(SINGLE, train_assets, tmp_path / "full", **over),
                                                 tmp_path / "full.yaml")]) == 0
    config = _save(train_config(SINGLE, train_assets, tmp_path / "run", **over), tmp_path / "run.yaml")
    real_save, states = torch.save, []

    def save(obj, f, *a, **k):
        if isinstance(obj, dict) and "optimizer" in obj:
            states.append(f)
            if len(states) == 2:  # the end of epoch 1: epoch 0's state is on disk
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    capsys.readouterr()
    assert recipe.recipe_main(["--config", config]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert len(err) == 1 and "no space left on device writing recipe_state.pt in" in err[0], err
    assert "free): free some space and run the same command with resume_from_checkpoint=auto" in err[0], err
    ckpt = tmp_path / "run" / "checkpoint"
    assert not list(ckpt.glob(".*.tmp")) and not list(ckpt.parent.glob(".*.lock"))
    assert recipe.recipe_main(["--config", config, "resume_from_checkpoint=auto"]) == 0
    assert not list(ckpt.parent.glob(".*.lock"))
    resumed, _ = load_vision_checkpoint(ckpt / "meta_model_1.safetensors")
    full, _ = load_vision_checkpoint(tmp_path / "full" / "checkpoint" / "meta_model_1.safetensors")
    for part in ("visual", "projector"):
        assert resumed[part].keys() == full[part].keys()
        assert all(torch.equal(resumed[part][k], full[part][k]) for k in full[part]), part


SINGLE = "tiny/full_finetune_single_device"


def _save(cfg, path: Path) -> str:
    OmegaConf.save(cfg, path)
    return str(path)


def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare") or not sys.platform.startswith("linux"):
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "mkdir -p /tmp/.medcap-probe && mount -t tmpfs -o size=64k tmpfs /tmp/.medcap-probe"],
                           capture_output=True)
    return probe.returncode == 0


SWEEP = textwrap.dedent('''
    # In a user namespace with a 1 MiB tmpfs at MNT: fill it to leave 0, 1, 2, ... pages free,
    # run the evaluation, free the space, run it again; one report line per size.
    import contextlib, importlib.util, io, logging, shutil, sys
    from pathlib import Path

    mnt, config, report, recipes = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
    logging.basicConfig(level=logging.ERROR)
    spec = importlib.util.spec_from_file_location("generate_recipe", recipes / "generate.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    out = mnt / "out"

    def run():
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                code = recipe.recipe_main(["--config", config, f"output_dir={out}"])
        except BaseException as e:  # not one line: the test fails on it
            return 1, [f"Traceback: {type(e).__name__}: {e}"]
        lines = [l for l in err.getvalue().splitlines() if l.startswith("medcap run:") or "Traceback" in l]
        return code, lines

    code, lines = run()
    assert code == 0, lines
    want = {p.name: p.read_bytes() for p in out.iterdir()}
    shutil.rmtree(out)
    with open(report, "w") as rep:
        for pages in range(200):
            free = shutil.disk_usage(mnt).free
            (mnt / "filler").write_bytes(b"x" * max(free - pages * 4096, 0))
            code, lines = run()
            (mnt / "filler").unlink()
            if code == 0:
                rep.write(f"{pages} ok\\n")
                break
            again, _ = run()
            got = {p.name: p.read_bytes() for p in out.iterdir()}
            rep.write(f"{pages} {code} {again} {got == want} {lines!r}\\n")
            shutil.rmtree(out)
''')


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount_tmpfs(), reason="no user namespace to mount a small tmpfs in")
def test_a_real_full_disk_at_every_size_the_evaluation_passes_through(gen_assets, gen_config, tmp_path):
    """A 1 MiB tmpfs filled to leave 0, 1, 2, ... pages free: every run that fails says so in
    one line with the free space, and the run after freeing the space is byte-identical."""
    config = tmp_path / "generate.yaml"
    OmegaConf.save(gen_config(gen_assets, tmp_path / "unused", test_omnimedvqa=True, vqa_type="no_cond_desc",
                              dataset_source=gen_assets["datasets"], max_new_tokens=8), config)
    (tmp_path / "sweep.py").write_text(SWEEP)
    mnt, log = tmp_path / "mnt", tmp_path / "sweep.log"
    mnt.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                        os.environ.get("PYTHONPATH", "")])}
    recipes = Path(__file__).resolve().parents[2] / "recipes"
    script = f'mount -t tmpfs -o size=1m tmpfs "{mnt}" && exec "{sys.executable}" "{tmp_path / "sweep.py"}" ' \
             f'"{mnt}" "{config}" "{log}" "{recipes}"'
    res = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                         capture_output=True, text=True, env=env, timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = log.read_text().splitlines()
    assert lines[-1].endswith(" ok") and len(lines) > 3, lines
    for line in lines[:-1]:
        pages, first, again, same, errors = line.split(" ", 4)
        errors = ast.literal_eval(errors)  # the list the script wrote with repr()
        assert first == "2" and again == "0" and same == "True", line
        assert len(errors) == 1 and "no space left on device writing " in errors[0] and "free)" in errors[0], line
