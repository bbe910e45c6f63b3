"""The library's shape as a reader meets it: test helpers stay out of production code,
no import cycles, our scripts use only public names, nothing below the CLI imports it,
files and functions stay readable (guard rails, not aims), each module opens with a
short map, and docs/internals.md maps every module."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "docs"))
import count_modules  # noqa: E402

TEST_HELPERS = "medcap.testing"


def production_files():
    """What ships or runs for a user: the medcap package (its test helpers aside), the
    recipes and the tools."""
    files = [p for p in (REPO / "medcap").rglob("*.py") if p != REPO / "medcap" / "testing.py"]
    return sorted(files + list((REPO / "recipes").glob("*.py")) + list((REPO / "tools").glob("*.py")))


def imported_modules(path: Path):
    """(line, module) of every import in a file, at any depth (lazy imports included)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            yield node.lineno, node.module
            yield from ((node.lineno, f"{node.module}.{a.name}") for a in node.names)


def test_no_production_file_imports_the_test_helpers():
    found = [f"{p.relative_to(REPO)}:{line} imports {mod}" for p in production_files()
             for line, mod in imported_modules(p) if mod == TEST_HELPERS or mod.startswith(TEST_HELPERS + ".")]  # fmt: skip
    assert not found, found


def test_importing_every_production_module_leaves_the_test_helpers_unloaded():
    code = f"""
import importlib, pkgutil, runpy, sys
import medcap
for info in pkgutil.walk_packages(medcap.__path__, "medcap."):
    if info.name != {TEST_HELPERS!r}:
        importlib.import_module(info.name)
for recipe in sys.argv[1:]:
    runpy.run_path(recipe, run_name="import_check")  # top-level imports only: main() is not called
print(sorted(m for m in sys.modules if m.startswith("medcap")))
"""
    recipes = [str(p) for p in sorted((REPO / "recipes").glob("*.py")) if p.name != "__init__.py"]
    res = subprocess.run([sys.executable, "-c", code, *recipes], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    loaded = ast.literal_eval(res.stdout.strip().splitlines()[-1])
    assert "medcap.models._model" in loaded and "medcap.demo._lm" in loaded  # the walk really imported
    assert TEST_HELPERS not in loaded


def _package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def test_packages_do_not_import_each_other_in_a_circle():
    """Which medcap package imports which (lazy imports included): no cycles, so a reader
    can take the packages in order (the demo once imported medcap.eval, which imported it back)."""
    edges = {}
    for path in (REPO / "medcap").rglob("*.py"):
        here = _package(count_modules.module_name(path))
        if here == TEST_HELPERS:
            continue
        for _, mod in imported_modules(path):
            there = _package(mod)
            if mod.startswith("medcap.") and there != here and count_modules.module_file(there) is not None:
                edges.setdefault(here, set()).add(there)

    def cycle_from(node, stack):
        if node in stack:
            return stack[stack.index(node):] + [node]
        for nxt in sorted(edges.get(node, ())):
            found = cycle_from(nxt, stack + [node])
            if found:
                return found
        return None

    for start in sorted(edges):
        cycle = cycle_from(start, [])
        assert cycle is None, " -> ".join(cycle)


def test_the_counter_follows_a_name_to_the_module_that_defines_it():
    assert count_modules.defining_module("medcap.data", "load_image") == "medcap.data._image"  # lazy table
    assert count_modules.defining_module("medcap.models", "MedcapModel") == "medcap.models._model"  # eager import
    assert count_modules.defining_module("medcap.demo", "main") == "medcap.demo"  # defined in the __init__
    assert count_modules.defining_module("medcap", "cli") == "medcap.cli"  # a submodule


def test_the_counter_follows_lazy_imports_and_skips_type_checking_ones(tmp_path, monkeypatch):
    pkg = tmp_path / "medcap"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("from medcap.a._x import f\n")
    (pkg / "a" / "_x.py").write_text("def f():\n    from medcap.a import _y\n")
    (pkg / "a" / "_y.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from medcap.a import _z\n")
    (pkg / "a" / "_z.py").write_text("")
    (tmp_path / "recipe.py").write_text("def main():\n    from medcap.a import f\n")
    monkeypatch.setattr(count_modules, "REPO", tmp_path)
    assert count_modules.reached(tmp_path / "recipe.py") == ["medcap.a._x", "medcap.a._y"]


# ---- guard rails on what a reader meets
# Numbers here are rails, not aims: a module holds one concern and is named for it.
MAX_FILE_LINES, MAX_FUNCTION_LINES, MAX_MAP_LINES = 500, 60, 20


def library_modules():
    return sorted((REPO / "medcap").rglob("*.py"))


def test_no_library_file_is_over_500_lines():
    long = [f"{p.relative_to(REPO)}: {count_modules.lines(p)}" for p in library_modules()
            if count_modules.lines(p) > MAX_FILE_LINES]
    assert not long, long


def test_no_library_function_is_over_60_lines():
    long = [f"{name}: {n}" for n, name in count_modules.function_sizes() if n > MAX_FUNCTION_LINES]
    assert not long, long


def test_every_library_module_opens_with_a_short_map():
    """A docstring first, short enough to read as a map (the long rationale lives in
    docs/internals.md), and one section-marker style (``# ---- title``)."""
    missing, long, markers = [], [], []
    for path in library_modules():
        text = path.read_text(encoding="utf-8")
        doc = ast.get_docstring(ast.parse(text), clean=False)
        if not doc and text.strip():
            missing.append(str(path.relative_to(REPO)))
        elif doc and len(doc.strip().splitlines()) > MAX_MAP_LINES:
            long.append(f"{path.relative_to(REPO)}: {len(doc.strip().splitlines())}")
        markers += [f"{path.relative_to(REPO)}:{i}" for i, line in enumerate(text.splitlines(), 1)
                    if re.match(r"\s*# ?[-=]{3,}", line) and not re.match(r"\s*# ---- \S", line)]
    assert not missing, f"no docstring: {missing}"
    assert not long, f"docstring over {MAX_MAP_LINES} lines: {long}"
    assert not markers, f"another section-marker style than '# ---- title': {markers}"


def test_recipes_bench_and_tools_import_only_public_names():
    """What our own scripts use is what a user may use: no ``medcap.x._y`` and no ``medcap._x``."""
    scripts = sorted([*(REPO / "recipes").glob("*.py"), *(REPO / "bench").glob("*.py"), *(REPO / "tools").glob("*.py")])
    private = [f"{p.relative_to(REPO)}:{line} {mod}" for p in scripts for line, mod in imported_modules(p)
               if mod.startswith("medcap.") and any(part.startswith("_") for part in mod.split(".")[1:])]
    assert scripts and not private, private


def _module_edges():
    """``{module: {modules it imports}}`` over the library, lazy imports included, each
    name followed to the module that defines it (package ``__init__`` files left out)."""
    edges = {}
    for path in library_modules():
        here = count_modules.module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in count_modules._imports(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("medcap")]
            else:
                source = count_modules._absolute(node, path)
                targets = ([count_modules.defining_module(source, a.name) for a in node.names]
                           if source == "medcap" or source.startswith("medcap.") else [])
            for target in targets:
                file = count_modules.module_file(target)
                if file is not None and file.name != "__init__.py" and target != here:
                    edges.setdefault(here, set()).add(target)
    return edges


def test_no_module_imports_itself_back_through_others():
    """No import cycle between modules (lazy imports included): a reader never goes back to
    a file already left (eval's benchmarks and rescore, and the two converters, once did)."""
    edges = _module_edges()
    assert "medcap.eval._rescore" in edges and "medcap.recipes" not in edges  # the walk really ran
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt]
            if nxt not in state:
                found = visit(nxt, stack + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for start in sorted(edges):
        if start not in state:
            cycle = visit(start, [start])
            assert cycle is None, " -> ".join(cycle)


def test_nothing_below_the_command_line_imports_it():
    """``medcap.cli`` sits on top: the server, ``medcap caption`` and the library share
    what they need through lower modules, never through the CLI."""
    found = [f"{p.relative_to(REPO)}:{line}" for p in library_modules() if p.name != "cli.py"
             for line, mod in imported_modules(p) if mod == "medcap.cli" or mod.startswith("medcap.cli.")]
    assert not found, found


@pytest.mark.slow
def test_the_measuring_script_runs_and_its_reading_paths_exist():
    res = subprocess.run([sys.executable, str(REPO / "docs" / "count_modules.py"), "--json"], capture_output=True,
                         text=True, cwd=REPO, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    counts = json.loads(res.stdout.strip().splitlines()[-1])
    assert {"medcap.models", "medcap.data", "medcap.eval", "medcap.training", "medcap.config"} <= set(counts["exported_names"])
    for label, modules in counts["run"].items():
        assert "medcap.models._model" in modules, label  # the run really ran
        assert TEST_HELPERS not in modules
    assert counts["reading"]["one OmniMedVQA row"]["recipes/generate.py"] > 0


def test_internals_md_maps_every_module():
    """docs/internals.md names each medcap package and module, so the map stays whole."""
    text = (REPO / "docs" / "internals.md").read_text(encoding="utf-8")
    names = {count_modules.module_name(p) for p in library_modules()}
    missing = [name for name in sorted(names)
               if f"`{name}`" not in text and f"`{name.rsplit('.', 1)[-1]}`" not in text]
    assert not missing, f"docs/internals.md does not mention {missing}"
    assert "@" not in text.replace("`@`", ""), "a placeholder was left in docs/internals.md"


def test_test_modules_have_unique_names():
    """tests/ has no package __init__, so pytest imports each test file by its base name:
    two files of one name stop the whole collection ("import file mismatch")."""
    seen = {}
    for p in sorted((REPO / "tests").rglob("test_*.py")):
        assert p.name not in seen, f"{p.relative_to(REPO)} and {seen[p.name].relative_to(REPO)} share a name"
        seen[p.name] = p
