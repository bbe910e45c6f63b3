"""Measure what a reader of medcap meets: the public surface, file and function sizes,
and the files on the two paths through the library.

    python docs/count_modules.py [--json]        (also: make counts)

* exported names: the ``__all__`` of ``medcap`` and of every public package or module
  (``medcap/*/__init__.py``, ``medcap/cli.py``, ...), read from the source;
* sizes: the largest library file and the longest library function (``def`` line to
  last line, docstring included);
* reading paths: the files a reader opens to follow one OmniMedVQA row from
  ``medcap run generate`` to its scored CSV cell, and one training step, with their lines
  (``READING``: traced by hand, checked to exist);
* modules a tiny run loads (**run**) and those reachable by following imports from the
  recipe and its config (**reachable**), package ``__init__`` files left out, with lines.

No number here is an aim: the layout is judged by what a reader experiences
(docs/internals.md); ``tests/test_architecture.py`` holds the guard rails.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set

REPO = Path(__file__).resolve().parents[1]
PATHS = {  # label: (recipe, config)
    "config -> checkpoint": ("recipes/full_finetune_single_device.py", "recipes/configs/llama3_1/8B_full_single_device.yaml"),
    "config -> results file": ("recipes/generate.py", "recipes/configs/custom_generation_config.yaml"),
}


def module_file(name: str) -> Optional[Path]:
    """The file of a medcap module (a package's ``__init__.py``), or None."""
    base = REPO.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, *, type_checking: bool = False) -> Iterator[ast.AST]:
    """Import statements anywhere in the tree; ``if TYPE_CHECKING:`` bodies only when asked."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node) and not type_checking:
            yield from _imports(ast.Module(body=node.orelse, type_ignores=[]))
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _imports(node, type_checking=type_checking)


def _absolute(node: ast.ImportFrom, path: Path) -> str:
    if not node.level:
        return node.module or ""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _lazy_exports(tree: ast.AST, package: str) -> Dict[str, str]:
    """``{name: module}`` of a PEP 562 ``__init__`` whose ``_EXPORTS`` table maps modules
    to their names (``{"medcap.data._image": ["load_image"]}``) or names to modules
    (``{"run_items": "_loop"}``, relative to the package)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets):
            table = ast.literal_eval(node.value)
            if all(isinstance(v, str) for v in table.values()):
                return {name: (f"{package}.{m}" if m.startswith("_") else m) for name, m in table.items()}
            return {name: module for module, names in table.items() for name in names}
    return {}


def defining_module(package: str, name: str, seen: Optional[Set[str]] = None) -> str:
    """The module that defines ``name`` as seen from ``package`` (following re-exports)."""
    seen = seen or set()
    if module_file(f"{package}.{name}") is not None:
        return f"{package}.{name}"  # a submodule
    init = module_file(package)
    if init is None or init.name != "__init__.py" or package in seen:
        return package
    seen.add(package)
    tree = ast.parse(init.read_text(encoding="utf-8"))
    lazy = _lazy_exports(tree, package)
    if name in lazy:
        return defining_module(lazy[name], name, seen) if module_file(lazy[name]).name == "__init__.py" else lazy[name]
    for node in _imports(tree, type_checking=True):
        if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name for a in node.names):
            source = _absolute(node, init)
            if source.startswith("medcap"):
                original = next(a.name for a in node.names if (a.asname or a.name) == name)
                target = module_file(source)
                if target is not None and target.name == "__init__.py":
                    return defining_module(source, original, seen)
                return source
    return package  # defined in the __init__ itself


def components(config: Path) -> List[str]:
    """The medcap modules defining the ``_component_`` names of a YAML config."""
    import yaml

    names: List[str] = []

    def walk(node) -> None:
        if isinstance(node, dict):
            value = node.get("_component_")
            if isinstance(value, str) and value.startswith("medcap."):
                names.append(value)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(yaml.safe_load(config.read_text(encoding="utf-8")))
    return [defining_module(*name.rsplit(".", 1)) for name in names]


def reached(start: Path, config: Optional[Path] = None) -> List[str]:
    """Every medcap module reached from ``start`` (and ``config``'s components) by following imports."""
    found: Set[str] = set(components(config)) if config else set()
    todo = [start, *(module_file(m) for m in found)]
    while todo:
        path = todo.pop()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in _imports(tree):
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("medcap")]
            else:
                source = _absolute(node, path)
                if source == "medcap" or source.startswith("medcap."):
                    targets = [defining_module(source, a.name) for a in node.names]
            for target in targets:
                file = module_file(target)
                if file is not None and target not in found:
                    found.add(target)
                    todo.append(file)
    return sorted(found)


# The files a reader opens to follow one unit of work top to bottom (docs/internals.md
# walks through them step by step).
READING = {
    "one OmniMedVQA row": ["recipes/generate.py", "medcap/eval/_omnimedvqa.py", "medcap/eval/_run.py",
                           "medcap/eval/_results.py", "medcap/eval/_protocol.py", "medcap/generation/_engine.py",
                           "medcap/eval/_choices.py"],
    "one training step": ["recipes/full_finetune_single_device.py", "medcap/training/_loss.py",
                          "medcap/models/_model.py", "medcap/training/_optim.py"],
}


def lines(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def library_files() -> List[Path]:
    return sorted((REPO / "medcap").rglob("*.py"))


def function_sizes() -> List[tuple]:
    """``(lines, "file:function")`` of every function of the library, longest first."""
    sizes = []
    for path in library_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                sizes.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(REPO)}:{node.name}"))
    return sorted(sizes, reverse=True)


def sizes() -> Dict[str, object]:
    files = sorted(((lines(p), str(p.relative_to(REPO))) for p in library_files()), reverse=True)
    longest = function_sizes()[0]
    return {"largest_file": {"path": files[0][1], "lines": files[0][0]},
            "longest_function": {"name": longest[1], "lines": longest[0]},
            "library_lines": sum(n for n, _ in files), "library_files": len(files)}


def reading_paths() -> Dict[str, Dict[str, int]]:
    return {label: {f: lines(REPO / f) for f in files} for label, files in READING.items()}


# A run of each recipe on the tiny assets (python -m medcap.testing DIR): {assets} is that folder.
RUNS = {
    "config -> checkpoint": ("recipes/full_finetune_single_device.py", "tiny/full_finetune_single_device",
                             ["epochs=1", "max_steps_per_epoch=1", "batch_size=2", "output_dir={assets}/run"]),
    "config -> results file": ("recipes/generate.py", "tiny/generate",
                               ["test_vqarad=True", "dataset_source={assets}/datasets", "batch_size=2",
                                "max_new_tokens=2", "progress=False", "output_dir={assets}/results"]),
}
_RUN = """
import atexit, json, runpy, sys
out = sys.argv.pop(1)
sys.argv = sys.argv[1:]  # [recipe, --config, ...], as `python recipe.py ...` sees it
atexit.register(lambda: json.dump(sorted(m for m in sys.modules if m.startswith("medcap")), open(out, "w")))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def loaded_by_runs() -> Dict[str, List[str]]:
    """``{label: medcap modules loaded}`` for each run of ``RUNS`` (package ``__init__`` files left out)."""
    loaded = {}
    with tempfile.TemporaryDirectory(prefix="medcap-count-") as tmp:
        assets = Path(tmp) / "assets"
        make = ("import sys; from medcap.testing import make_tiny_training_assets, make_vqarad_layout; "
                "make_tiny_training_assets(sys.argv[1], samples=2); make_vqarad_layout(sys.argv[1] + '/datasets', n_images=1)")
        subprocess.run([sys.executable, "-c", make, str(assets)], cwd=REPO, check=True, capture_output=True)
        for label, (recipe, config, overrides) in RUNS.items():
            out = Path(tmp) / "modules.json"
            cmd = [sys.executable, "-c", _RUN, str(out), str(REPO / recipe), "--config",
                   str(REPO / "recipes" / "configs" / f"{config}.yaml"), f"assets_dir={assets}",
                   *(o.format(assets=assets) for o in overrides)]
            res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"{recipe} --config {config} failed:\n{res.stderr[-3000:]}")
            modules = json.loads(out.read_text())
            loaded[label] = [m for m in modules if module_file(m) is not None and module_file(m).name != "__init__.py"]
    return loaded


def public_modules() -> List[Path]:
    """``medcap`` itself, its packages, and its public top-level modules (``cli``, ``testing``)."""
    top = [p for p in (REPO / "medcap").glob("*.py") if not p.name.startswith("_")]
    packages = [p for p in (REPO / "medcap").glob("*/__init__.py") if not p.parent.name.startswith("_")]
    return sorted([REPO / "medcap" / "__init__.py", *packages, *top])


def exported_names() -> Dict[str, int]:
    """``{module: len(__all__)}`` for every public module and package, read from the
    source (a literal list, or the size of a lazy ``_EXPORTS``/``_PUBLIC`` table): nothing imported."""
    counts = {}
    for init in public_modules():
        name = module_name(init)
        tree = ast.parse(init.read_text(encoding="utf-8"))
        counts[name] = 0
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
                try:
                    counts[name] = len(ast.literal_eval(node.value))
                except ValueError:  # computed from a table
                    counts[name] = len(_lazy_exports(tree, name)) or _table_size(tree)
    return counts


def _table_size(tree: ast.AST) -> int:
    """The size of a module's ``_PUBLIC`` table (``__all__ = sorted(_PUBLIC)``)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_PUBLIC" for t in node.targets):
            return len(ast.literal_eval(node.value))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON object instead of text")
    args = parser.parse_args(argv)
    exports = exported_names()
    runs = loaded_by_runs()
    reachable = {label: reached(REPO / recipe, REPO / config) for label, (recipe, config) in PATHS.items()}
    size, reading = sizes(), reading_paths()
    run_lines = {label: sum(lines(module_file(m)) for m in mods) + lines(REPO / RUNS[label][0])
                 for label, mods in runs.items()}
    if args.json:
        print(json.dumps({"exported_names": exports, "sizes": size, "reading": reading, "run": runs,
                          "run_lines": run_lines, "reachable": reachable}))
        return 0
    print(f"exported names: {sum(exports.values())}")
    for package, n in exports.items():
        print(f"  {package:24s} {n}")
    print(f"library: {size['library_files']} files, {size['library_lines']} lines; largest file "
          f"{size['largest_file']['path']} ({size['largest_file']['lines']}); longest function "
          f"{size['longest_function']['name']} ({size['longest_function']['lines']})")
    for label, files in reading.items():
        print(f"{label}: {len(files)} files, {sum(files.values())} lines")
        for f, n in files.items():
            print(f"  {f:44s} {n}")
    for label, (recipe, config, _) in RUNS.items():
        print(f"{label}: {len(runs[label])} medcap modules run ({recipe}, {config}; "
              f"{run_lines[label]} lines with the recipe); {len(reachable[label])} reachable")
        for module in runs[label]:
            print(f"  {module}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
