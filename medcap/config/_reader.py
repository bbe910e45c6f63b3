"""The config reader every recipe shares: YAML + ``key=value`` overrides -> one typed dataclass.

In order: ``ConfigError`` (a user's mistake, reported as one line) and ``suggest``; the
command line and the YAML (``parse_args``: free-text keys such as ``prompt=`` stay the
strings typed; ``plain``; ``save_resolved``); the typed build (``from_config``: an
unknown key names the closest valid one, the class's ``LEGACY`` keys are mapped, each
value is converted to its field's type and bounded, naming the key on error); the
checks that need no weights (``check_component``, ``resolve``, ``must_exist``); then
``schema_for`` and ``validate`` (``medcap validate``) and ``run_recipe``, every recipe's
entry point (``medcap run: error: ...`` and exit status 2, Ctrl-C one line and 130; the
traceback with ``MEDCAP_DEBUG=1``).

The recipes' configs are in ``_train`` and ``_generate``; the rationale in docs/internals.md.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import logging
import os
import re
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from medcap._cmdline import EXIT_USER_ERROR, UserError, stopped

log = logging.getLogger("medcap.config")

DEBUG_ENV = "MEDCAP_DEBUG"
# recipe name -> its config class, by dotted name as a `_component_` names a builder (`medcap validate`).
SCHEMAS: Dict[str, str] = {
    "generate": "medcap.config.GenerateConfig",
    "full_finetune_single_device": "medcap.config.TrainConfig",
    "full_finetune_distributed": "medcap.config.TrainConfig",
}
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")


# ---- Errors

class ConfigError(UserError, ValueError):
    """A problem with the user's config or command line: reported as one line."""


def suggest(name: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest candidate, or nothing."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---- The command line and the YAML

def parse_args(argv: Sequence[str], free_text: Iterable[str] = ()) -> Tuple[Path, Any]:
    """``--config FILE key=value ...`` -> ``(file, DictConfig)``. Keys in ``free_text``
    keep the exact string typed after ``=``; the others are parsed as YAML values."""
    from omegaconf import OmegaConf

    free_text = set(free_text)
    args = list(argv)
    config_path: Optional[str] = None
    overrides: List[str] = []
    raw: Dict[str, str] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("--config", "-c") and i + 1 < len(args):
            config_path = args[i + 1]
            i += 2
            continue
        if a.startswith("--config="):
            config_path = a.split("=", 1)[1]
        elif "=" in a and not a.startswith("-"):
            key, value = a.split("=", 1)
            if key.lstrip("~+") in free_text:
                raw[key.lstrip("~+")] = value
            else:
                overrides.append(a)
        else:
            raise ConfigError(f"cannot read the argument {a!r}: give --config FILE and key=value overrides")
        i += 1
    if config_path is None:
        raise ConfigError("no --config given")
    path = must_exist(config_path, "--config")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:
        raise ConfigError(f"{path} is not a valid YAML config: {e}") from None
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    except Exception as e:
        raise ConfigError(f"cannot read the overrides {overrides}: {e}") from None
    for key, value in raw.items():
        cfg[key] = value
    return path, cfg


def plain(cfg) -> Tuple[Dict[str, Any], List[str]]:
    """``(resolved plain dict, names used only as ${...} variables)`` of a config."""
    from omegaconf import DictConfig, OmegaConf

    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        raw = data = dataclasses.asdict(cfg)
    elif isinstance(cfg, DictConfig):
        raw = OmegaConf.to_container(cfg, resolve=False)
        try:
            data = OmegaConf.to_container(cfg, resolve=True)
        except Exception as e:  # omegaconf's interpolation errors
            raise ConfigError(f"the config cannot be resolved: {e}") from None
    else:
        raw = data = dict(cfg)
    return data, sorted(_variables(raw))


def _variables(node: Any) -> set:
    found = set()
    if isinstance(node, Mapping):
        for v in node.values():
            found |= _variables(v)
    elif isinstance(node, list):
        for v in node:
            found |= _variables(v)
    elif isinstance(node, str):
        found |= set(_VAR.findall(node))
    return found


def save_resolved(cfg, folder: str | Path, name: str = "config.yaml") -> Path:
    """Write the config as it was run (interpolations resolved) into ``folder``."""
    from omegaconf import OmegaConf

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    data, _ = plain(cfg)
    from medcap._io import atomic_write_text

    return atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(data)))


# ---- The typed build

def from_config(cls, data: Mapping[str, Any], *, where: str = "", variables: Iterable[str] = ()) -> Any:
    """Build dataclass ``cls`` from ``data`` (plain values), checking every key.

    ``cls.LEGACY`` (optional) maps a legacy key to the field that takes its value,
    or to None for a key that is accepted and has no effect. ``variables``: keys
    that only serve ``${...}`` interpolation.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    legacy: Mapping[str, Optional[str]] = getattr(cls, "LEGACY", {})
    values: Dict[str, Any] = {}
    variables = set(variables)
    for key, value in data.items():
        name = legacy.get(key, key) if key in legacy else key
        if key in legacy and name is None:
            log.debug("%s%s is the reference's key and has no effect in medcap; ignored", where, key)
            continue
        if name not in fields:
            if key in variables:
                continue
            raise ConfigError(f"unknown key '{where}{key}'{suggest(key, list(fields) + list(legacy))}")
        values[name] = _convert(value, hints[name], f"{where}{name}", fields[name].metadata)
    missing = [n for n, f in fields.items() if n not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"the config lacks {', '.join(where + m for m in missing)}")
    return cls(**values)


def _convert(value: Any, tp: Any, key: str, meta: Mapping[str, Any]) -> Any:
    """``value`` as the type ``tp`` of the field ``key`` (bounded by ``meta["min"]``), or a ConfigError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Union:
        return _convert_union(value, args, key, meta)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r}: choose one of {list(args)}")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a section of keys, got {value!r}")
        return from_config(tp, value, where=f"{key}.")
    if origin in (list, List, Sequence, tuple):
        if isinstance(value, str) and "," in value:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        item = args[0] if args else Any
        return [_convert(v, item, f"{key}[{i}]", {}) for i, v in enumerate(value)]
    if origin in (dict, Dict, Mapping) or tp in (dict, Dict):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a section of keys, got {value!r}")
        return dict(value)
    if value is None:
        raise ConfigError(f"{key} needs a value (null is not allowed here)")
    if tp is bool:
        return _to_bool(value, key)
    value = _to_scalar(value, tp, key)
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"{key} must be >= {meta['min']}, got {value}")
    return value


def _convert_union(value: Any, args: Tuple[Any, ...], key: str, meta: Mapping[str, Any]) -> Any:
    """``Optional[X]`` and other unions: None where allowed, else the first member that takes the value."""
    if value is None and type(None) in args:
        return None
    inner = [a for a in args if a is not type(None)]
    errors = []
    for a in inner:
        try:
            return _convert(value, a, key, meta)
        except ConfigError as e:
            errors.append(str(e))
    raise ConfigError(errors[0] if len(errors) == 1 else f"{key}={value!r} is not valid: {'; '.join(errors)}")


def _to_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ConfigError(f"{key}={value!r} must be True or False")


def _to_scalar(value: Any, tp: Any, key: str) -> Any:
    """A whole number, a number or text, as ``tp`` says (any other type: the value as given)."""
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and re.fullmatch(r"-?\d+", value))
                                           or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{key}={value!r} must be a whole number")
        return int(value)
    if tp is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r} must be a number") from None
    if tp is str:
        if isinstance(value, (Mapping, list)):
            raise ConfigError(f"{key} must be text, got {value!r}")
        return str(value)
    return value


# ---- Checks that need no weights

def check_component(section: Mapping[str, Any], key: str, *, ignore: Sequence[str] = ()) -> Callable:
    """The callable a ``_component_`` section names, its arguments checked against its
    signature (unknown ones named with the closest valid one)."""
    path = section.get("_component_")
    if not path:
        raise ConfigError(f"{key}._component_ is missing: which builder should make the {key}?")
    target = resolve(str(path), f"{key}._component_")
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return target
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return target
    names = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for arg in section:
        if arg == "_component_" or arg in ignore:
            continue
        if arg not in names:
            raise ConfigError(f"{key}.{arg}: {path} takes no argument {arg!r}{suggest(arg, names)}")
    return target


def resolve(path: str, key: str) -> Any:
    """``package.module.name`` -> the object, or a ConfigError naming the key."""
    module, _, name = path.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"{key}={path!r} cannot be found ({e})") from None
    return obj


def must_exist(path: Any, key: str, kind: str = "file") -> Path:
    """``path`` as a Path, or a ConfigError saying which key names a missing file or folder."""
    if path is None or str(path) == "":
        raise ConfigError(f"{key} is not set")
    p = Path(str(path)).expanduser()
    ok = p.is_file() if kind == "file" else p.is_dir() if kind == "dir" else p.exists()
    if not ok:
        what = {"file": "file", "dir": "folder"}.get(kind, "path")
        raise ConfigError(f"{key}={str(path)!r}: no such {what}")
    if not os.access(p, os.R_OK):
        raise ConfigError(f"{key}={str(path)!r} cannot be read (permissions)")
    return p


# ---- A recipe's config and entry point

def schema_for(recipe: str):
    """The config class of a recipe (by name or file stem)."""
    name = Path(recipe).stem
    if name not in SCHEMAS:
        raise ConfigError(f"no config schema for recipe {recipe!r}{suggest(name, SCHEMAS)}")
    return resolve(SCHEMAS[name], f"the config class of {name}")


def validate(recipe: str, cfg) -> Any:
    """Every key and every path of a config, nothing loaded: the typed config, or a
    ConfigError. ``cfg`` is a DictConfig or a mapping (interpolations resolved here)."""
    cls = schema_for(recipe)
    data, variables = plain(cfg)
    obj = from_config(cls, data, variables=variables)
    check = getattr(obj, "check", None)
    if check is not None:
        check()
    return obj


def _user_errors() -> Tuple[type, ...]:
    """Errors that mean "the user's input is wrong" (or their disk is full), not "medcap is broken"."""
    from medcap._io import DiskFullError, LockedError

    # UserError: ConfigError, and the refusals of the library (a results folder holding another run's files)
    errors: List[type] = [UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
                          LockedError, DiskFullError]
    try:
        from medcap.data import BadSample

        errors.append(BadSample)
    except ImportError:
        pass
    return tuple(errors)


def run_recipe(main: Callable[[Any], Any], argv: Optional[Sequence[str]] = None, *, free_text: Iterable[str] = (),
               prog: str = "medcap run", on_stop: str = "") -> int:
    """A recipe's entry point: parse, run ``main(cfg)``, report user errors in one line (exit
    status 2) and a Ctrl-C in one line (``on_stop``: what the user can do next; exit status 130)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from medcap._io import quiet_library_noise

    quiet_library_noise()
    try:
        _, cfg = parse_args(sys.argv[1:] if argv is None else argv, free_text)
        main(cfg)
        return 0
    except _user_errors() as e:
        if os.environ.get(DEBUG_ENV):
            raise
        msg = str(e) if not isinstance(e, OSError) or not e.filename else f"{e.strerror}: {e.filename}"
        print(f"{prog}: error: {msg}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        if os.environ.get(DEBUG_ENV):
            raise
        return stopped(prog, on_stop)
