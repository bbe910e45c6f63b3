"""The `medcap` command: name and path resolution, running recipes, ls, cp, dispatch."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import types
from pathlib import Path

import pytest

import medcap
from medcap import cli

REPO_RECIPES = Path(medcap.__file__).resolve().parents[1] / "recipes"

# A throwaway recipe: records how it was started, then exits with exit=N (default 0).
PROBE = """\
import json, os, sys
args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a and not a.startswith("-"))
with open(args["out"], "w") as f:
    json.dump({"argv": sys.argv, "cwd": os.getcwd(), "exe": sys.executable,
               "rank": os.environ.get("RANK"), "world": os.environ.get("WORLD_SIZE")}, f)
sys.exit(int(args.get("exit", 0)))
"""


@pytest.fixture
def fake_recipes(tmp_path, monkeypatch):
    """A recipes/ folder of throwaway recipes and configs, used through $MEDCAP_RECIPES_DIR."""
    root = tmp_path / "recipes"
    (root / "configs" / "tiny").mkdir(parents=True)
    (root / "configs" / "llama3_1").mkdir()
    for name in ("probe", "full_finetune_distributed", "_private"):
        (root / f"{name}.py").write_text(PROBE)
    (root / "__init__.py").write_text('"""recipes."""\n')
    (root / "configs" / "tiny" / "probe.yaml").write_text("# run: medcap run probe --config tiny/probe\nx: 1\n")
    (root / "configs" / "llama3_1" / "8B_full.yaml").write_text(
        "# tune run --nproc_per_node 8 full_finetune_distributed --config llama3_1/8B_full\nx: 2\n"
    )
    (root / "configs" / "orphan.yaml").write_text("# no recipe named here\nx: 3\n")
    monkeypatch.setenv(cli.RECIPES_ENV, str(root))
    return root


def _record(path: Path) -> dict:
    return json.loads(path.read_text())


def test_names_resolve_inside_our_recipes_folder(fake_recipes):
    assert cli.recipe_names() == ["full_finetune_distributed", "probe"]
    assert cli.resolve_recipe("probe") == fake_recipes / "probe.py"
    assert cli.resolve_recipe("full_finetune_distributed") == fake_recipes / "full_finetune_distributed.py"
    cfg = fake_recipes / "configs" / "tiny" / "probe.yaml"
    assert cli.resolve_config("tiny/probe") == cfg
    assert cli.resolve_config("tiny/probe.yaml") == cfg
    assert cli.config_names() == ["llama3_1/8B_full", "orphan", "tiny/probe"]
    with pytest.raises(cli.CLIError, match=r"unknown recipe 'lora_finetune_single_device'.*\['full_finetune_distributed', 'probe'\]"):
        cli.resolve_recipe("lora_finetune_single_device")
    with pytest.raises(cli.CLIError, match=r"config 'tiny/nope'.*'tiny/probe'"):
        cli.resolve_config("tiny/nope")
    with pytest.raises(cli.CLIError, match="recipe file not found"):
        cli.resolve_recipe("nowhere/probe.py")


def test_real_recipe_names_never_mean_torchtunes_builtins(monkeypatch):
    monkeypatch.delenv(cli.RECIPES_ENV, raising=False)
    names = [n for n in ("full_finetune_distributed", "full_finetune_single_device", "generate") if (REPO_RECIPES / f"{n}.py").is_file()]
    if not names:
        pytest.skip("no recipes written yet")
    for name in names:
        assert cli.resolve_recipe(name) == REPO_RECIPES / f"{name}.py"
    if "full_finetune_distributed" in names and (REPO_RECIPES / "configs" / "llama3_1" / "8B_full.yaml").is_file():
        cmd = cli.build_run_command(["--nproc_per_node", "8", "full_finetune_distributed", "--config", "llama3_1/8B_full"])
        assert cmd[:5] == [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "8"]
        assert cmd[5] == str(REPO_RECIPES / "full_finetune_distributed.py")
        assert "site-packages" not in " ".join(cmd)


def test_run_from_another_directory_with_an_absolute_config(fake_recipes, tmp_path, monkeypatch, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = fake_recipes / "configs" / "tiny" / "probe.yaml"
    out = tmp_path / "rec.json"
    assert cli.main(["run", "probe", "--config", str(cfg), f"out={out}", "optimizer.lr=2e-5"]) == 0
    rec = _record(out)
    assert rec["argv"] == [str(fake_recipes / "probe.py"), "--config", str(cfg), f"out={out}", "optimizer.lr=2e-5"]
    assert rec["cwd"] == str(elsewhere)
    assert Path(rec["exe"]).resolve() == Path(sys.executable).resolve()
    assert f"medcap run: {shlex.join([sys.executable, *rec['argv']])}" in capsys.readouterr().err


def test_run_with_relative_recipe_and_config_paths(tmp_path, monkeypatch):
    monkeypatch.delenv(cli.RECIPES_ENV, raising=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "my_recipe.py").write_text(PROBE)
    (tmp_path / "mine" / "my.yaml").write_text("x: 1\n")
    sub = tmp_path / "work" / "sub"
    sub.mkdir(parents=True)
    monkeypatch.chdir(sub)
    out = tmp_path / "rec.json"
    rc = cli.main(["run", "../../mine/my_recipe.py", "--config=../../mine/my.yaml", f"out={out}"])
    assert rc == 0
    assert _record(out)["argv"] == [
        str(tmp_path / "mine" / "my_recipe.py"), "--config", str(tmp_path / "mine" / "my.yaml"), f"out={out}",
    ]  # fmt: skip


def test_exit_status_propagates(fake_recipes, tmp_path):
    assert cli.main(["run", "probe", "--config", "tiny/probe", f"out={tmp_path / 'r.json'}", "exit=3"]) == 3


def test_torchrun_options_build_a_torch_distributed_command(fake_recipes, capsys):
    argv = ["--nproc_per_node", "2", "--rdzv_backend=c10d", "--standalone", "--master-port", "29555",
            "probe", "--config", "tiny/probe", "k=v"]  # fmt: skip
    cmd = cli.build_run_command(argv)
    assert cmd == [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc_per_node", "2", "--rdzv_backend=c10d", "--standalone", "--master-port", "29555",
        str(fake_recipes / "probe.py"), "--config", str(fake_recipes / "configs" / "tiny" / "probe.yaml"), "k=v",
    ]  # fmt: skip
    assert cli.main(["run", "--dry-run", *argv]) == 0
    assert shlex.join(cmd) in capsys.readouterr().err


@pytest.mark.integration
@pytest.mark.slow
def test_torchrun_launch_runs_the_recipe_as_rank_0(fake_recipes, tmp_path):
    out = tmp_path / "rec.json"
    rc = cli.main(["run", "--nproc_per_node", "1", "--standalone", "probe", "--config", "tiny/probe", f"out={out}"])
    assert rc == 0
    rec = _record(out)
    assert (rec["rank"], rec["world"]) == ("0", "1")
    assert rec["argv"][0] == str(fake_recipes / "probe.py")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "probe", "x=1"], "--config CONFIG is required"),
        (["run", "probe", "--config", "tiny/nothing"], "neither a file"),
        (["run", "nope", "--config", "tiny/probe"], "unknown recipe 'nope'"),
        (["run", "--no-python", "probe", "--config", "tiny/probe"], "leave out --no-python"),
        (["run", "probe", "--config"], "--config needs a value"),
    ],
)
def test_run_errors_are_one_clear_line(fake_recipes, capsys, argv, message):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_ls_lists_recipes_with_their_configs(fake_recipes, capsys):
    assert cli.main(["ls"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert rows[0] == ["RECIPE", "CONFIG"]
    assert ["full_finetune_distributed", "llama3_1/8B_full"] in rows
    assert ["probe", "tiny/probe"] in rows
    assert ["(other", "configs)", "orphan"] in rows
    assert not any("_private" in r for row in rows for r in row)


def test_ls_on_the_real_recipes(monkeypatch, capsys):
    monkeypatch.delenv(cli.RECIPES_ENV, raising=False)
    if not REPO_RECIPES.is_dir():
        pytest.skip("no recipes/ folder")
    assert cli.main(["ls"]) == 0
    out = capsys.readouterr().out
    for path in REPO_RECIPES.glob("*.py"):
        assert (path.stem in out) != path.name.startswith("_"), path.name


def test_cp_copies_and_refuses_to_overwrite(fake_recipes, tmp_path, capsys):
    src = fake_recipes / "configs" / "tiny" / "probe.yaml"
    dest = tmp_path / "edit" / "my_probe.yaml"
    assert cli.main(["cp", "tiny/probe", str(dest)]) == 0
    assert dest.read_bytes() == src.read_bytes()

    dest.write_text("my edits\n")
    assert cli.main(["cp", "tiny/probe", str(dest)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert dest.read_text() == "my edits\n"
    assert cli.main(["cp", "tiny/probe", str(dest), "--force"]) == 0
    assert dest.read_bytes() == src.read_bytes()

    # into a folder, without a suffix, and a recipe
    assert cli.main(["cp", "llama3_1/8B_full", str(tmp_path / "edit")]) == 0
    assert (tmp_path / "edit" / "8B_full.yaml").is_file()
    assert cli.main(["cp", "tiny/probe", str(tmp_path / "noext")]) == 0
    assert (tmp_path / "noext.yaml").is_file()
    assert cli.main(["cp", "probe", str(tmp_path / "edit")]) == 0
    assert (tmp_path / "edit" / "probe.py").read_text() == PROBE


def test_validate_data_and_demo_dispatch(monkeypatch, capsys):
    seen = {}

    def validate_main(argv):
        seen["argv"] = argv
        return 5

    monkeypatch.setitem(sys.modules, "medcap.data", types.SimpleNamespace(validate_main=validate_main))
    assert cli.main(["validate-data", "train.json", "--json"]) == 5
    assert seen["argv"] == ["train.json", "--json"]

    monkeypatch.setitem(sys.modules, "medcap.demo", None)  # as if the package were missing
    assert cli.main(["demo", "--out", "x"]) == 1
    assert "medcap demo: not available" in capsys.readouterr().err


def test_missing_recipes_folder_is_explained(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(cli.RECIPES_ENV, str(tmp_path / "none"))
    assert cli.main(["ls"]) == 2
    assert "is not a folder" in capsys.readouterr().err
    monkeypatch.delenv(cli.RECIPES_ENV)
    monkeypatch.setattr(medcap, "__file__", str(tmp_path / "site" / "medcap" / "__init__.py"))
    assert cli.main(["run", "generate", "--config", "x"]) == 2
    assert "pip install -e ." in capsys.readouterr().err


def test_usage_and_unknown_command(capsys):
    assert cli.main([]) == 2
    assert cli.main(["--help"]) == 0
    assert "medcap <command>" in capsys.readouterr().out
    assert cli.main(["train"]) == 2
    assert "unknown command 'train'" in capsys.readouterr().err


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


def test_console_script_is_installed(fake_recipes):
    script = Path(sys.executable).parent / "medcap"
    if not script.is_file():
        pytest.skip("medcap is not installed as a console script in this environment")
    res = subprocess.run([str(script), "ls"], capture_output=True, text=True, env=dict(os.environ))
    assert res.returncode == 0, res.stderr
    assert "tiny/probe" in res.stdout
