"""The `medcap` command: name and path resolution, running recipes (and stopping them), ls,
cp, cat, validate, the registry, a non-editable install, dispatch, the shared command-line conventions (snake_case aliases, broken pipes)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

import medcap
from medcap import cli

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


@pytest.fixture
def fake_recipes(tmp_path, monkeypatch):
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
    monkeypatch.setenv(cli.RECIPES_ENV, str(root))
    return root


def _record(path: Path) -> dict:
    return json.loads(path.read_text())


def test_names_resolve_inside_our_recipes_folder(fake_recipes):
    assert cli.recipe_names() == ["full_finetune_distributed", "full_finetune_single_device", "generate"]
    assert cli.resolve_recipe("generate") == fake_recipes / "generate.py"
    assert cli.resolve_recipe("full_finetune_distributed") == fake_recipes / "full_finetune_distributed.py"
    cfg = fake_recipes / "configs" / "tiny" / "generate.yaml"
    assert cli.resolve_config("tiny/generate") == cfg
    assert cli.resolve_config("tiny/generate.yaml") == cfg
    assert cli.config_names() == ["llama3_1/8B_full", "orphan", "tiny/generate"]
    with pytest.raises(cli.CLIError, match=r"unknown recipe 'lora_finetune_single_device'.*\['full_finetune_distributed', 'full_finetune_single_device', 'generate'\]"):
        cli.resolve_recipe("lora_finetune_single_device")
    with pytest.raises(cli.CLIError, match=r"config 'tiny/nope'.*'tiny/generate'"):
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


def _medcap(*args: str, **kw) -> subprocess.CompletedProcess:
    """``medcap ARGS`` in a child process (a run replaces its process by the recipe)."""
    return subprocess.run([sys.executable, "-m", "medcap.cli", *args], capture_output=True, text=True,
                          timeout=120, **kw)  # fmt: skip


def test_run_from_another_directory_with_an_absolute_config(fake_recipes, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cfg = fake_recipes / "configs" / "tiny" / "generate.yaml"
    out = tmp_path / "rec.json"
    res = _medcap("run", "generate", "--config", str(cfg), f"out={out}", "optimizer.lr=2e-5", cwd=elsewhere)
    assert res.returncode == 0, res.stderr
    rec = _record(out)
    assert rec["argv"] == [str(fake_recipes / "generate.py"), "--config", str(cfg), f"out={out}", "optimizer.lr=2e-5"]
    assert rec["cwd"] == str(elsewhere)
    assert Path(rec["exe"]).resolve() == Path(sys.executable).resolve()
    assert f"medcap run: {shlex.join([sys.executable, *rec['argv']])}" in res.stderr


def test_run_with_relative_recipe_and_config_paths(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "my_recipe.py").write_text(PROBE)
    (tmp_path / "mine" / "my.yaml").write_text("x: 1\n")
    sub = tmp_path / "work" / "sub"
    sub.mkdir(parents=True)
    out = tmp_path / "rec.json"
    env = {k: v for k, v in os.environ.items() if k != cli.RECIPES_ENV}
    res = _medcap("run", "../../mine/my_recipe.py", "--config=../../mine/my.yaml", f"out={out}", cwd=sub, env=env)
    assert res.returncode == 0, res.stderr
    assert _record(out)["argv"] == [
        str(tmp_path / "mine" / "my_recipe.py"), "--config", str(tmp_path / "mine" / "my.yaml"), f"out={out}",
    ]  # fmt: skip


def test_exit_status_propagates(fake_recipes, tmp_path):
    assert _medcap("run", "generate", "--config", "tiny/generate", f"out={tmp_path / 'r.json'}", "exit=3").returncode == 3


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> dict:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"launcher exited early ({proc.returncode}): {proc.stderr.read()}"
        assert time.monotonic() < end, f"no {path.name} after {timeout} s"
        time.sleep(0.05)
    return _record(path)


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a running (not zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _gone_within(pid: int, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while _alive(pid):
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def _kill_leftover(pid: int) -> None:
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")


@needs_proc
def test_sigterm_to_a_plain_run_stops_the_recipe(fake_recipes, tmp_path):
    """Without torchrun options the recipe IS the launcher's process: the PID a scheduler
    signals is the recipe's, and nothing is left behind."""
    out = tmp_path / "rec.json"
    proc = subprocess.Popen([sys.executable, "-m", "medcap.cli", "run", "generate", "--config", "tiny/generate",
                             f"out={out}", "sleep=60"], stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        rec = _wait_for(out, proc, 60)
        assert rec["pid"] == proc.pid  # replaced, not a child
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == -signal.SIGTERM
        assert _gone_within(rec["pid"], 5)
    finally:
        proc.kill()
        proc.wait()


# A launcher that supervises a sleeping child the way `medcap run` supervises torchrun.
SUPERVISE = """\
import sys
from medcap.cli import _supervise
sys.exit(_supervise([sys.executable, sys.argv[1], "out=" + sys.argv[2], "sleep=" + sys.argv[3],
                     "exit=" + sys.argv[4]]))
"""


def _supervised(tmp_path: Path, sleep: float, exit: int = 0):
    (tmp_path / "probe.py").write_text(PROBE)
    out = tmp_path / "child.json"
    proc = subprocess.Popen([sys.executable, "-c", SUPERVISE, str(tmp_path / "probe.py"), str(out), str(sleep),
                             str(exit)], stderr=subprocess.PIPE, text=True)  # fmt: skip
    return proc, out


@needs_proc
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_supervised_child_gets_the_launchers_stop_signals(tmp_path, sig):
    proc, out = _supervised(tmp_path, sleep=60)
    try:
        child = _wait_for(out, proc, 60)["pid"]
        assert child != proc.pid
        proc.send_signal(getattr(signal, sig))  # to the launcher only, as `kill PID` or a scheduler does
        # the child died of the signal; the launcher reports it the way shells do
        assert proc.wait(timeout=10) == 128 + getattr(signal, sig)
        assert _gone_within(child, 5)
    finally:
        proc.kill()
        proc.wait()
        if out.exists():
            _kill_leftover(_record(out)["pid"])


@needs_proc
def test_supervised_child_dies_with_a_killed_launcher(tmp_path):
    """SIGKILL cannot be forwarded: the kernel's parent-death signal stops the child."""
    proc, out = _supervised(tmp_path, sleep=60)
    try:
        child = _wait_for(out, proc, 60)["pid"]
        proc.kill()
        proc.wait(timeout=10)
        assert _gone_within(child, 5)
    finally:
        if out.exists():
            _kill_leftover(_record(out)["pid"])


def test_supervised_exit_status_is_passed_on(tmp_path):
    proc, _ = _supervised(tmp_path, sleep=0, exit=7)
    assert proc.wait(timeout=60) == 7


def test_torchrun_options_build_a_torch_distributed_command(fake_recipes, capsys):
    argv = ["--nproc_per_node", "2", "--rdzv_backend=c10d", "--standalone", "--master-port", "29555",
            "generate", "--config", "tiny/generate", "k=v"]  # fmt: skip
    cmd = cli.build_run_command(argv)
    assert cmd == [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc_per_node", "2", "--rdzv_backend=c10d", "--standalone", "--master-port", "29555",
        str(fake_recipes / "generate.py"), "--config", str(fake_recipes / "configs" / "tiny" / "generate.yaml"), "k=v",
    ]  # fmt: skip
    assert cli.main(["run", "--dry-run", *argv]) == 0
    assert shlex.join(cmd) in capsys.readouterr().err


@pytest.mark.integration
@pytest.mark.slow
def test_torchrun_launch_runs_the_recipe_as_rank_0(fake_recipes, tmp_path):
    out = tmp_path / "rec.json"
    rc = cli.main(["run", "--nproc_per_node", "1", "--standalone", "generate", "--config", "tiny/generate", f"out={out}"])
    assert rc == 0
    rec = _record(out)
    assert (rec["rank"], rec["world"]) == ("0", "1")
    assert rec["argv"][0] == str(fake_recipes / "generate.py")


@needs_proc
@pytest.mark.integration
@pytest.mark.slow
def test_stopping_a_torchrun_launch_stops_the_recipe(fake_recipes, tmp_path):
    """SIGTERM to the launcher reaches torchrun, which stops its worker (the recipe). A killed
    launcher's child gets SIGTERM from the kernel instead: test_supervised_child_dies_with_..."""
    out = tmp_path / "rec.json"
    proc = subprocess.Popen([sys.executable, "-m", "medcap.cli", "run", "--nproc-per-node", "1", "--standalone",
                             "generate", "--config", "tiny/generate", f"out={out}", "sleep=120"],
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        rec = _wait_for(out, proc, 120)
        assert rec["rank"] == "0" and rec["pid"] != proc.pid
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) != 0
        assert _gone_within(rec["pid"], 40)  # torchrun gives a worker up to 30 s before SIGKILL
    finally:
        proc.kill()
        proc.wait()
        if out.exists():
            _kill_leftover(_record(out)["pid"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "generate", "x=1"], "--config CONFIG is required"),
        (["run", "generate", "--config", "tiny/nothing"], "neither a file"),
        (["run", "nope", "--config", "tiny/generate"], "unknown recipe 'nope'"),
        (["run", "--no-python", "generate", "--config", "tiny/generate"], "leave out --no-python"),
        (["run", "generate", "--config"], "--config needs a value"),
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
    assert ["generate", "tiny/generate"] in rows
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
    src = fake_recipes / "configs" / "tiny" / "generate.yaml"
    dest = tmp_path / "edit" / "my_edit.yaml"
    assert cli.main(["cp", "tiny/generate", str(dest)]) == 0
    assert dest.read_bytes() == src.read_bytes()

    dest.write_text("my edits\n")
    assert cli.main(["cp", "tiny/generate", str(dest)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert dest.read_text() == "my edits\n"
    assert cli.main(["cp", "tiny/generate", str(dest), "--force"]) == 0
    assert dest.read_bytes() == src.read_bytes()

    # into a folder, without a suffix, and a recipe
    assert cli.main(["cp", "llama3_1/8B_full", str(tmp_path / "edit")]) == 0
    assert (tmp_path / "edit" / "8B_full.yaml").is_file()
    assert cli.main(["cp", "tiny/generate", str(tmp_path / "noext")]) == 0
    assert (tmp_path / "noext.yaml").is_file()
    assert cli.main(["cp", "generate", str(tmp_path / "edit")]) == 0
    assert (tmp_path / "edit" / "generate.py").read_text() == PROBE


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


def test_old_snake_case_flags_are_rewritten_and_help_shows_kebab_case(capsys):
    import argparse

    p = argparse.ArgumentParser(prog="tool")
    p.add_argument("--input-dir", required=True)
    p.add_argument("--pad-ratio", type=float, default=1.8)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("rest", nargs="*")
    cli.accept_snake_case(p)
    ns = p.parse_args(["--input_dir", "a", "--pad_ratio=2.5", "--no_progress", "--", "--pad_ratio"])
    assert (ns.input_dir, ns.pad_ratio, ns.no_progress, ns.rest) == ("a", 2.5, True, ["--pad_ratio"])
    assert p.parse_args(["--inp", "b"]).input_dir == "b"  # abbreviations stay unambiguous
    p.print_help()
    out = capsys.readouterr().out
    assert "--input-dir" in out and "--input_dir" not in out


# ---------------------------------------------------------------------------------------
# the registry, cat, validate, and a non-editable install

REGISTERED = [(recipe, config) for recipe, rec in sorted(cli.RECIPES.items()) for config in rec.configs]


def test_the_registry_names_every_shipped_recipe_and_config_once():
    files = sorted(p.name for p in REPO_RECIPES.glob("*.py") if not p.name.startswith("_"))
    assert sorted(rec.file for rec in cli.RECIPES.values()) == files
    on_disk = sorted(p.relative_to(REPO_RECIPES / "configs").with_suffix("").as_posix()
                     for p in (REPO_RECIPES / "configs").rglob("*.yaml"))  # fmt: skip
    assert sorted(config for _, config in REGISTERED) == on_disk  # each once, none left out


def test_ls_pairs_configs_by_the_registry_not_by_their_comments(fake_recipes, capsys):
    # this config's comments name another recipe: the registry decides
    (fake_recipes / "configs" / "llama3_1" / "8B_full.yaml").write_text("# medcap run generate --config ...\nx: 2\n")
    assert cli.main(["ls"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert ["full_finetune_distributed", "llama3_1/8B_full"] in rows
    assert ["generate", "tiny/generate"] in rows


@pytest.mark.parametrize("recipe, config", REGISTERED)
def test_cat_prints_the_config_with_its_comments(recipe, config, capsys, monkeypatch):
    monkeypatch.delenv(cli.RECIPES_ENV, raising=False)
    assert cli.main(["cat", config]) == 0
    out = capsys.readouterr().out
    assert out == (REPO_RECIPES / "configs" / f"{config}.yaml").read_text(encoding="utf-8")
    assert out.lstrip().startswith("#")


def test_cat_of_a_recipe_or_an_unknown_name_says_what_to_do(capsys):
    assert cli.main(["cat", "generate"]) == 2
    assert "'generate' is a recipe; its configs are" in capsys.readouterr().err
    assert cli.main(["cat", "tiny/nope"]) == 2
    assert "neither a file" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    from medcap.testing import make_tiny_training_assets

    return make_tiny_training_assets(tmp_path_factory.mktemp("tiny"), samples=2)


@pytest.mark.parametrize("recipe, config", REGISTERED)
def test_validate_names_a_misspelled_key_on_every_config(recipe, config, capsys, monkeypatch):
    monkeypatch.delenv(cli.RECIPES_ENV, raising=False)
    assert cli.main(["validate", config, "batch_sze=4"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("medcap validate: error: ")
    assert "'batch_sze'" in err and "did you mean 'batch_size'" in err


@pytest.mark.parametrize("recipe, config", REGISTERED)
def test_validate_reports_every_shipped_config_in_one_line(recipe, config, capsys, monkeypatch, tmp_path):
    """As shipped, a config names folders that exist only after a download or a demo run:
    validate says which key points where, in one line, without a traceback."""
    monkeypatch.delenv(cli.RECIPES_ENV, raising=False)
    rc = cli.main(["validate", config, f"output_dir={tmp_path}"])
    out, err = capsys.readouterr()
    if rc == 0:
        assert f"{config} is a valid config for {recipe}" in out
    else:
        assert rc == 1 and err.count("\n") == 1 and err.startswith("medcap validate: error: "), err


TINY_READY = {  # what each tiny config needs besides the assets to have something to do
    "tiny/generate": lambda a: ["test_metrics=True", f"dataset_source={a['train_json']}"],
    "tiny/full_finetune_single_device": lambda a: [],
    "tiny/full_finetune_distributed": lambda a: [],
}


@pytest.mark.parametrize("config", sorted(TINY_READY))
def test_validate_passes_a_ready_tiny_config_without_reading_weights(config, tiny_assets, tmp_path, capsys):
    """With the assets made, a tiny config is valid; the LLM's weights file is never
    read (here it is not even a safetensors file), only checked to exist."""
    import shutil

    assets = tmp_path / "assets"
    shutil.copytree(tiny_assets["assets_dir"], assets)
    weights = assets / "llm" / "model.safetensors"
    weights.write_bytes(b"not weights")
    a = {**tiny_assets, "train_json": str(assets / "data" / "train.json")}
    argv = ["validate", config, f"assets_dir={assets}", f"output_dir={tmp_path / 'out'}", *TINY_READY[config](a)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert f"{config} is a valid config" in capsys.readouterr().out
    weights.unlink()
    assert cli.main(argv) == 1
    assert "model.safetensors" in capsys.readouterr().err


def test_validate_a_copied_config_by_its_name_or_with_recipe(tmp_path, capsys):
    assert cli.main(["cp", "tiny/generate", str(tmp_path)]) == 0
    assert cli.main(["validate", str(tmp_path / "generate.yaml"), "batch_sze=1"]) == 1
    assert "did you mean 'batch_size'" in capsys.readouterr().err  # generate.yaml: generate's
    (tmp_path / "generate.yaml").rename(tmp_path / "mine.yaml")
    assert cli.main(["validate", str(tmp_path / "mine.yaml")]) == 2
    assert "add --recipe NAME" in capsys.readouterr().err
    assert cli.main(["validate", str(tmp_path / "mine.yaml"), "--recipe", "generate", "batch_sze=1"]) == 1
    assert "did you mean 'batch_size'" in capsys.readouterr().err


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
    assert not (site / "recipes").exists()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in (cli.RECIPES_ENV, "PYTHONPATH")}
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


def test_pyproject_lists_every_medcap_package():
    import tomllib

    repo = REPO_RECIPES.parent
    listed = set(tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join(p.parent.relative_to(repo).parts) for p in (repo / "medcap").rglob("__init__.py")}
    assert listed == folders | {"medcap._recipes"}
