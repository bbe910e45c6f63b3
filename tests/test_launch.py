"""``medcap run`` (``medcap._launch``): a recipe run by its path from anywhere, its exit
status passed on, stopped by the signals a user or a scheduler sends, alone (the recipe
replaces the launcher) or under torchrun (a supervised child that dies with the launcher);
errors in one clear line."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medcap import cli
from medcap._launch import build_run_command
from medcap._registry import RECIPES_ENV
from tests.test_registry import PROBE, fake_recipes_folder


@pytest.fixture
def fake_recipes(tmp_path, monkeypatch):
    return fake_recipes_folder(tmp_path, monkeypatch)


def _record(path: Path) -> dict:
    return json.loads(path.read_text())


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
    env = {k: v for k, v in os.environ.items() if k != RECIPES_ENV}
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
from medcap._launch import supervise
sys.exit(supervise([sys.executable, sys.argv[1], "out=" + sys.argv[2], "sleep=" + sys.argv[3],
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
    cmd = build_run_command(argv)
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
