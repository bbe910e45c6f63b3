"""The ``medcap`` command (``medcap.cli``): dispatch to each subcommand's module, usage and
unknown commands, ``--help`` without torch, a quiet closed pipe, the installed console script,
every package listed in pyproject.toml. Each subcommand's own tests mirror its module:
``test_launch`` (run), ``test_config_commands`` (ls, cp, cat, validate), ``test_registry``."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from medcap import cli
from tests.test_registry import REPO_RECIPES, fake_recipes_folder


@pytest.fixture
def fake_recipes(tmp_path, monkeypatch):
    return fake_recipes_folder(tmp_path, monkeypatch)


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


def test_usage_and_unknown_command(capsys):
    assert cli.main([]) == 2
    assert cli.main(["--help"]) == 0
    assert "medcap <command>" in capsys.readouterr().out
    assert cli.main(["train"]) == 2
    assert "unknown command 'train'" in capsys.readouterr().err


def test_console_script_is_installed(fake_recipes):
    script = Path(sys.executable).parent / "medcap"
    if not script.is_file():
        pytest.skip("medcap is not installed as a console script in this environment")
    res = subprocess.run([str(script), "ls"], capture_output=True, text=True, env=dict(os.environ))
    assert res.returncode == 0, res.stderr
    assert "tiny/generate" in res.stdout


@pytest.mark.parametrize("command", ["run", "demo", "validate-data", "validate", "cat", "ls", "cp"])
def test_subcommand_help_does_not_import_torch(command):
    from tests.tools.test_entry_points import assert_no_torch

    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "medcap.cli", command, "--help"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert "usage" in res.stdout
    assert_no_torch(res.stderr)


@pytest.mark.parametrize("argv", [["ls"], ["--help"], ["run", "--dry-run", "generate", "--config", "tiny/generate"]])
def test_output_into_a_closed_pipe_is_quiet(fake_recipes, argv):
    """`medcap ls | head -1`: no BrokenPipeError traceback, the status a Unix tool gives."""
    from tests.tools.test_entry_points import run_to_closed_pipe

    res = run_to_closed_pipe([sys.executable, "-m", "medcap.cli", *argv])
    assert "Traceback" not in res.stderr and "BrokenPipe" not in res.stderr, res.stderr
    assert res.returncode == (0 if argv[0] == "run" else 141)  # a dry run prints to stderr only


def test_pyproject_lists_every_medcap_package_and_every_folder_of_configs():
    """Every package, and every folder of configs as a data-only package whose YAML ships
    (unlisted, setuptools would warn 'Package would be ignored' once per folder)."""
    import tomllib

    repo = REPO_RECIPES.parent
    setuptools = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    folders = {".".join(p.parent.relative_to(repo).parts) for p in (repo / "medcap").rglob("__init__.py")}
    configs = {".".join(("medcap._recipes",) + d.relative_to(repo / "recipes").parts)
               for d in [repo / "recipes" / "configs", *(repo / "recipes" / "configs").rglob("*")] if d.is_dir()}
    assert {"medcap._recipes.configs", "medcap._recipes.configs.tiny"} <= configs  # the walk found them
    # medcap.export.hf: the model folder's own code, shipped for `medcap export` to copy (no __init__)
    assert listed == folders | {"medcap._recipes", "medcap.export.hf"} | configs
    assert setuptools["package-data"] == {c: ["*.yaml"] for c in configs}
