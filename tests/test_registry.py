"""medcap's recipes and configs (``medcap._registry``): names and paths resolved inside our
recipes folder (never torchtune's), the registry naming every shipped file once, a missing
folder explained, a non-editable install that carries them.

``PROBE``, ``fake_recipes_folder`` and ``REGISTERED`` are shared with the tests of the commands that use the
registry (``test_launch``, ``test_config_commands``, ``test_cli``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import medcap
from medcap import _registry as registry
from medcap import cli
from medcap._cmdline import CLIError
from medcap._launch import build_run_command

REPO_RECIPES = Path(medcap.__file__).resolve().parents[1] / "recipes"


# A throwaway recipe: records how it was started, sleeps sleep=S seconds (default 0),
# then exits with exit=N (default 0). The record is complete before the sleep.
PROBE = """\
import json, os, sys, time
args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a and not a.startswith("-"))
with open(args["out"] + ".tmp", "w") as f:
    json.dump({"argv": sys.argv, "cwd": os.getcwd(), "exe": sys.executable, "pid": os.getpid(),
               "rank": os.environ.get("RANK"), "world": os.environ.get("WORLD_SIZE")}, f)
os.replace(args["out"] + ".tmp", args["out"])
time.sleep(float(args.get("sleep", 0)))
sys.exit(int(args.get("exit", 0)))
"""


def fake_recipes_folder(tmp_path: Path, monkeypatch) -> Path:
    """A recipes/ folder of throwaway recipes and configs, used through $MEDCAP_RECIPES_DIR:
    the probe stands in for two registered recipes (generate, full_finetune_distributed)."""
    root = tmp_path / "recipes"
    (root / "configs" / "tiny").mkdir(parents=True)
    (root / "configs" / "llama3_1").mkdir()
    for name in ("generate", "full_finetune_distributed", "_private"):
        (root / f"{name}.py").write_text(PROBE)
    (root / "__init__.py").write_text('"""recipes."""\n')
    (root / "configs" / "tiny" / "generate.yaml").write_text("# run: medcap run generate --config tiny/generate\nx: 1\n")
    (root / "configs" / "llama3_1" / "8B_full.yaml").write_text(
        "# tune run --nproc_per_node 8 full_finetune_distributed --config llama3_1/8B_full\nx: 2\n"
    )
    (root / "configs" / "orphan.yaml").write_text("# no recipe named here\nx: 3\n")
    monkeypatch.setenv(registry.RECIPES_ENV, str(root))
    return root


@pytest.fixture
def fake_recipes(tmp_path, monkeypatch):
    return fake_recipes_folder(tmp_path, monkeypatch)


# every (recipe, config) pair the registry names
REGISTERED = [(recipe, config) for recipe, rec in sorted(registry.RECIPES.items()) for config in rec.configs]


def test_names_resolve_inside_our_recipes_folder(fake_recipes):
    assert registry.recipe_names() == ["full_finetune_distributed", "full_finetune_single_device", "generate"]
    assert registry.resolve_recipe("generate") == fake_recipes / "generate.py"
    assert registry.resolve_recipe("full_finetune_distributed") == fake_recipes / "full_finetune_distributed.py"
    cfg = fake_recipes / "configs" / "tiny" / "generate.yaml"
    assert registry.resolve_config("tiny/generate") == cfg
    assert registry.resolve_config("tiny/generate.yaml") == cfg
    assert registry.config_names() == ["llama3_1/8B_full", "orphan", "tiny/generate"]
    with pytest.raises(CLIError, match=r"unknown recipe 'lora_finetune_single_device'.*\['full_finetune_distributed', 'full_finetune_single_device', 'generate'\]"):
        registry.resolve_recipe("lora_finetune_single_device")
    with pytest.raises(CLIError, match=r"config 'tiny/nope'.*'tiny/generate'"):
        registry.resolve_config("tiny/nope")
    with pytest.raises(CLIError, match="recipe file not found"):
        registry.resolve_recipe("nowhere/probe.py")


def test_real_recipe_names_never_mean_torchtunes_builtins(monkeypatch):
    monkeypatch.delenv(registry.RECIPES_ENV, raising=False)
    names = [n for n in ("full_finetune_distributed", "full_finetune_single_device", "generate") if (REPO_RECIPES / f"{n}.py").is_file()]
    if not names:
        pytest.skip("no recipes written yet")
    for name in names:
        assert registry.resolve_recipe(name) == REPO_RECIPES / f"{name}.py"
    if "full_finetune_distributed" in names and (REPO_RECIPES / "configs" / "llama3_1" / "8B_full.yaml").is_file():
        cmd = build_run_command(["--nproc_per_node", "8", "full_finetune_distributed", "--config", "llama3_1/8B_full"])
        assert cmd[:5] == [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "8"]
        assert cmd[5] == str(REPO_RECIPES / "full_finetune_distributed.py")
        assert "site-packages" not in " ".join(cmd)


def test_the_registry_names_every_shipped_recipe_and_config_once():
    files = sorted(p.name for p in REPO_RECIPES.glob("*.py") if not p.name.startswith("_"))
    assert sorted(rec.file for rec in registry.RECIPES.values()) == files
    on_disk = sorted(p.relative_to(REPO_RECIPES / "configs").with_suffix("").as_posix()
                     for p in (REPO_RECIPES / "configs").rglob("*.yaml"))  # fmt: skip
    assert sorted(config for _, config in REGISTERED) == on_disk  # each once, none left out


def test_missing_recipes_folder_is_explained(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(registry.RECIPES_ENV, str(tmp_path / "none"))
    assert cli.main(["ls"]) == 2
    assert "is not a folder" in capsys.readouterr().err
    monkeypatch.delenv(registry.RECIPES_ENV)
    monkeypatch.setattr(medcap, "__file__", str(tmp_path / "site" / "medcap" / "__init__.py"))
    assert cli.main(["run", "generate", "--config", "x"]) == 2
    assert "pip install -e ." in capsys.readouterr().err


def test_pythonpath_dot_makes_recipes_ours_for_tune_run():
    """`tune run recipes/x.py` imports the module recipes.x with the working directory
    appended to sys.path; torchtune's wheel has its own `recipes` package. With
    PYTHONPATH=./ from the repository root, ours must win (and import cleanly)."""
    if not (REPO_RECIPES / "__init__.py").is_file():
        pytest.skip("no recipes/ package")
    code = "import sys; sys.path.append('.'); import recipes; print(recipes.__file__)"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # -P: no script folder at the front of sys.path, exactly like the `tune` console script
    ours = subprocess.run(
        [sys.executable, "-P", "-c", code], cwd=REPO_RECIPES.parent, env={**env, "PYTHONPATH": "./"},
        capture_output=True, text=True,
    )  # fmt: skip
    assert ours.returncode == 0, ours.stderr
    assert Path(ours.stdout.strip()).resolve() == REPO_RECIPES / "__init__.py"
    # why PYTHONPATH=./ is needed: without it the installed `recipes` is found first
    theirs = subprocess.run(
        [sys.executable, "-P", "-c", code], cwd=REPO_RECIPES.parent, env=env, capture_output=True, text=True
    )
    assert theirs.returncode != 0 or Path(theirs.stdout.strip()).resolve() != REPO_RECIPES / "__init__.py"


def _copy_source(dest: Path) -> Path:
    """The files a wheel is built from, copied out (building in the checkout would leave
    build/ behind for everyone working in it)."""
    import shutil

    repo = REPO_RECIPES.parent
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo / name, dest / name)
    for name in ("medcap", "recipes"):
        shutil.copytree(repo / name, dest / name, ignore=skip)
    return dest


@pytest.mark.slow
@pytest.mark.integration
def test_a_non_editable_install_runs_a_recipe_from_another_directory(tmp_path):
    """`pip install .` (here into a --target folder, dependencies taken from this
    environment): the wheel carries the recipes and configs under medcap/_recipes (not
    under torchtune's top-level name), and the installed `medcap` runs them from anywhere."""
    (tmp_path / "src").mkdir()
    src = _copy_source(tmp_path / "src")
    site = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--target", str(site), str(src)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert pip.returncode == 0, pip.stderr[-3000:]
    assert (site / "medcap" / "_recipes" / "generate.py").is_file()
    assert (site / "medcap" / "_recipes" / "configs" / "tiny" / "generate.yaml").is_file()
    assert (site / "medcap" / "export" / "hf" / "modeling_medcap.py").is_file()  # what medcap export copies out
    assert not (site / "recipes").exists()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in (registry.RECIPES_ENV, "PYTHONPATH")}
    env["PYTHONPATH"] = str(site)

    def medcap_(*args):
        res = subprocess.run([str(site / "bin" / "medcap"), *args], cwd=elsewhere, env=env, capture_output=True,
                             text=True, timeout=300)  # fmt: skip
        assert res.returncode == 0, res.stderr[-3000:]
        return res

    where = subprocess.run([sys.executable, "-c", "import medcap; print(medcap.__file__)"], cwd=elsewhere, env=env,
                           capture_output=True, text=True)  # fmt: skip
    assert Path(where.stdout.strip()).parent == site / "medcap"
    assert f"recipes: {site / 'medcap' / '_recipes'}" in medcap_("ls").stdout
    assert medcap_("cat", "tiny/generate").stdout == (REPO_RECIPES / "configs" / "tiny" / "generate.yaml").read_text()

    assets = tmp_path / "assets"
    made = subprocess.run([sys.executable, "-m", "medcap.testing", str(assets), "--samples", "1"], cwd=elsewhere,
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert made.returncode == 0, made.stderr[-3000:]
    image = assets / "data" / "images" / "img_0000.png"
    res = medcap_("run", "generate", "--config", "tiny/generate", f"assets_dir={assets}", f"image={image}",
                  "prompt=What is shown?", "max_new_tokens=3", f"output_dir={tmp_path / 'out'}", "progress=False")
    assert f"medcap run: {sys.executable} {site / 'medcap' / '_recipes' / 'generate.py'}" in res.stderr
    assert f"{image}: " in res.stdout
