"""The install is quiet and complete: the wheel setuptools builds from this checkout ships
every recipe and config, and setuptools prints none of its warning banners on the way
(a "Package would be ignored" box per folder of configs made `make demo`'s log 217 lines
longer). Built offline with the environment's own setuptools, in seconds."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BANNER = "*" * 80  # the border of every setuptools warning box (deprecations, ignored packages)


@pytest.mark.integration
def test_the_wheel_builds_without_setuptools_banners_and_ships_every_config(tmp_path):
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"pyproject.toml needs setuptools>=77 (an SPDX license string), found {setuptools.__version__}")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("medcap", "recipes"):
        shutil.copytree(REPO / folder, src / folder, symlinks=True, ignore=ignore)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                          "-v", "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-3000:]
    assert "would be ignored" not in log and BANNER not in log, log[-6000:]

    (wheel,) = (tmp_path / "dist").glob("medcap-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    configs = {"medcap/_recipes/" + p.relative_to(REPO / "recipes").as_posix()
               for p in (REPO / "recipes" / "configs").rglob("*.yaml")}
    recipes = {f"medcap/_recipes/{p.name}" for p in (REPO / "recipes").glob("*.py")}
    assert len(configs) >= 8 and configs <= shipped, sorted(configs - shipped)
    assert recipes <= shipped, sorted(recipes - shipped)
    hf = {f"medcap/export/hf/{p.name}" for p in (REPO / "medcap" / "export" / "hf").glob("*.py")}
    assert len(hf) == 3 and hf <= shipped, sorted(hf - shipped)  # what `medcap export` copies


@pytest.mark.integration
def test_the_editable_install_prints_no_setuptools_banner_with_the_makefiles_setting(tmp_path):
    """`make demo` / `make test` install medcap editable: setuptools' editable build prints an
    information box, which the Makefile's QUIET_EDITABLE silences (and only that box)."""
    import re

    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"pyproject.toml needs setuptools>=77, found {setuptools.__version__}")
    quiet = re.search(r"^QUIET_EDITABLE := PYTHONWARNINGS='([^']+)'$", (REPO / "Makefile").read_text(), re.M)
    assert quiet, "the Makefile's QUIET_EDITABLE setting"
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for folder in ("medcap", "recipes"):
        shutil.copytree(REPO / folder, src / folder, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    build = "import sys, setuptools.build_meta as b; b.build_editable(sys.argv[1])"

    def logs(**env):
        out = tmp_path / f"dist{len(env)}"
        out.mkdir()
        res = subprocess.run([sys.executable, "-c", build, str(out)], cwd=src, capture_output=True, text=True,
                             timeout=300, env={k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"} | env)
        assert res.returncode == 0, res.stderr[-3000:]
        assert list(out.glob("medcap-*.whl"))
        return res.stdout + res.stderr

    assert BANNER in logs()  # setuptools' box, as `pip install -e .` shows it without the setting
    assert BANNER not in logs(PYTHONWARNINGS=quiet.group(1))
