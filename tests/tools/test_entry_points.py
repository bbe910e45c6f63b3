"""What every tool owes its user: `--help` without importing torch (it answers at once),
and no traceback when the reader of its output goes away (`tool | head`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOLS = ["convert_to_sharegpt.py", "preprocess_images.py", "judge.py", "draw_diagram.py"]


def _import_lines(importtime_stderr: str):
    """(depth, module) from ``python -X importtime`` output (``import time: self | total | name``,
    two spaces of indent per level; a module is listed after the modules it imported)."""
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and not line.rstrip().endswith("imported package"):
            name = line.rsplit("|", 1)[1]
            yield (len(name) - len(name.lstrip(" "))) // 2, name.strip()


def imported_modules(importtime_stderr: str) -> set:
    return {name for _, name in _import_lines(importtime_stderr)}


def import_chain(importtime_stderr: str, module: str) -> str:
    """Who imported ``module``: ``top -> ... -> module`` (for a failure message)."""
    lines = list(_import_lines(importtime_stderr))
    at = next(i for i, (_, name) in enumerate(lines) if name == module)
    chain, depth = [module], lines[at][0]
    for d, name in lines[at + 1:]:
        if d < depth:
            chain.append(name)
            depth = d
    return " -> ".join(reversed(chain))


def assert_no_torch(importtime_stderr: str) -> None:
    mods = imported_modules(importtime_stderr)
    assert "argparse" in mods  # the parsing really happened in this trace
    for heavy in ("torch", "transformers"):
        assert heavy not in mods, f"{heavy} imported before --help: {import_chain(importtime_stderr, heavy)}"


def run_to_closed_pipe(argv, **kw) -> subprocess.CompletedProcess:
    """Run ``argv`` with a stdout whose reader has already gone, as ``argv | head`` ends up."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(argv, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120, **kw)
    finally:
        os.close(write_end)


@pytest.mark.parametrize("tool", TOOLS)
def test_help_does_not_import_torch(tool):
    res = subprocess.run([sys.executable, "-X", "importtime", str(REPO / "tools" / tool), "--help"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("usage:")
    assert_no_torch(res.stderr)


@pytest.mark.parametrize("tool", TOOLS)
def test_help_into_a_closed_pipe_is_quiet(tool):
    res = run_to_closed_pipe([sys.executable, str(REPO / "tools" / tool), "--help"])
    assert "Traceback" not in res.stderr and "BrokenPipe" not in res.stderr, res.stderr
    assert res.returncode in (0, 141)


def test_a_summary_into_a_closed_pipe_is_quiet_and_the_work_is_done(tmp_path):
    from tests.tools.test_convert_to_sharegpt import make_pmcoa

    make_pmcoa(tmp_path)
    res = run_to_closed_pipe([sys.executable, str(REPO / "tools" / "convert_to_sharegpt.py"), "--dataset", "pmcoa",
                              "--data-dir", str(tmp_path), "--save-dir", str(tmp_path / "out"), "--no-progress"])  # fmt: skip
    assert res.returncode == 141, res.stderr
    assert "Traceback" not in res.stderr and "BrokenPipe" not in res.stderr, res.stderr
    assert len(json.loads((tmp_path / "out" / "pmcoa_train.json").read_text())) == 2
