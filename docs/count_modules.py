"""Print how big medcap's public surface is and how many modules a reader follows.

    python docs/count_modules.py [--json]

* exported names: the ``__all__`` of ``medcap/__init__.py`` and of every
  ``medcap/*/__init__.py``, added up (read from the source, nothing imported);
* modules on a path, two ways. **Run**: the medcap modules loaded when the
  recipe runs its tiny config to the end (a one-step training run that saves a
  checkpoint; a VQA-RAD evaluation that writes its results file), package
  ``__init__`` files left out (they only re-export). **Reachable**: the medcap
  modules reached by following imports from a
  recipe file and from the ``_component_`` names of its full-size config
  (``recipes/full_finetune_single_device.py`` with
  ``llama3_1/8B_full_single_device``: config to checkpoint; ``recipes/generate.py``
  with ``custom_generation_config``: config to results file). Imports inside functions
  count (they run when the recipe does); imports under ``if TYPE_CHECKING:`` do
  not. ``from medcap.data import load_image`` leads to the module that defines
  ``load_image`` (``medcap/data/_image.py``), not to every module the package's
  ``__init__`` re-exports, because that is the file a reader opens; an
  ``__init__`` counts only when the name is defined in it. Reachable is the
  larger: it counts what any function of a reached module might import.

docs/internals.md quotes these numbers; tests/test_architecture.py runs this
script and holds them to their aims.
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


def exported_names() -> Dict[str, int]:
    """``{package: len(__all__)}`` for medcap and each of its packages, read from the
    source (a literal list, or ``sorted(...)`` of a lazy ``_EXPORTS`` table): nothing imported."""
    counts = {}
    for init in sorted([REPO / "medcap" / "__init__.py", *(REPO / "medcap").glob("*/__init__.py")]):
        name = module_name(init)
        tree = ast.parse(init.read_text(encoding="utf-8"))
        counts[name] = 0
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
                try:
                    counts[name] = len(ast.literal_eval(node.value))
                except ValueError:  # computed from the lazy table
                    counts[name] = len(_lazy_exports(tree, name))
    return counts


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON object instead of text")
    args = parser.parse_args(argv)
    exports = exported_names()
    runs = loaded_by_runs()
    reachable = {label: reached(REPO / recipe, REPO / config) for label, (recipe, config) in PATHS.items()}
    if args.json:
        print(json.dumps({"exported_names": exports, "run": runs, "reachable": reachable}))
        return 0
    print(f"exported names: {sum(exports.values())}")
    for package, n in exports.items():
        print(f"  {package:24s} {n}")
    for label, (recipe, config, _) in RUNS.items():
        print(f"{label}: {len(runs[label])} medcap modules run ({recipe}, {config}); "
              f"{len(reachable[label])} reachable")
        for module in runs[label]:
            print(f"  {module}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
