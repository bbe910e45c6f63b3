"""The commands in the user docs cannot rot: every `medcap run` line (shell blocks and
the Python launchers) must name a real recipe and config, and every `key=value` must
be a key of that config (or an argument of the component it configures); every tool
and `medcap` sub-command line must use flags that exist."""

from __future__ import annotations

import inspect
import re
import shlex
import sys
from pathlib import Path
from typing import List, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README_FINETUNE.md", "README_TUTORIAL.md", "README.md", "datasets/README.md"]
SHELL_VARS = {
    "LLAMA": "/models/llama", "PUBLISHED": "/results/meta_model_last.pt", "OUT": "/results/out",
    "RESULT": "/results/out",
}


def _blocks(text: str) -> List[Tuple[str, str]]:
    return re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S)


def _shell_commands(block: str) -> List[str]:
    """Logical lines (continuations joined, comments dropped, $VARS filled in)."""
    joined = re.sub(r"\\\n\s*", " ", block)
    out = []
    for line in joined.splitlines():
        line = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        if not line:
            continue
        for k, v in SHELL_VARS.items():
            line = line.replace(f"${k}", v)
        line = re.sub(r"^\.venv-vllm/bin/medcap ", "medcap ", line)  # the vLLM environment's medcap: same command
        out.append(line)
    return out


def _python_commands(block: str) -> List[str]:
    """Run a launcher block with os.system captured; returns the commands it would run."""
    ran: List[str] = []
    import os

    code = compile(block, "<launcher>", "exec")
    saved = os.system
    os.system = lambda cmd: ran.append(cmd) or 0
    try:
        exec(code, {"__name__": "__doc__", "print": lambda *a, **k: None})
    finally:
        os.system = saved
    return ran


def _is_synopsis(cmd: str) -> bool:
    """A usage line such as ``medcap run RECIPE --config CONFIG [key=value ...]``."""
    return "[key=value" in cmd or bool(re.search(r"\s(RECIPE|CONFIG)(\s|$)", cmd))


def doc_commands() -> List[Tuple[str, str]]:
    found = []
    for name in DOCS:
        path = ROOT / name
        if not path.exists():
            continue
        for lang, block in _blocks(path.read_text()):
            if lang == "python" and "os.system" in block:
                cmds = _python_commands(block)
            elif lang in ("bash", "sh", ""):
                cmds = _shell_commands(block)
            else:
                continue
            found += [(name, c) for c in cmds if re.search(r"(^|\s)(medcap|python) ", c) and not _is_synopsis(c)]
    return found


COMMANDS = doc_commands()


def test_the_docs_have_commands():
    names = {n for n, _ in COMMANDS}
    assert {"README_FINETUNE.md", "README_TUTORIAL.md"} <= names
    assert sum("medcap run" in c for _, c in COMMANDS) >= 8


def _argv_after(cmd: str, word: str) -> List[str]:
    toks = shlex.split(cmd)
    # drop leading environment assignments (CUDA_VISIBLE_DEVICES=0 medcap run ...)
    while toks and re.match(r"^[A-Z_]+=", toks[0]):
        toks.pop(0)
    i = toks.index(word)
    return toks[i + 1:]


def _config_key_ok(cfg, key: str) -> bool:
    from omegaconf import OmegaConf

    if OmegaConf.select(cfg, key, default="__missing__") != "__missing__":
        return True
    # not in the YAML: fine when it is an argument of the component of that section
    parent, _, leaf = key.rpartition(".")
    section = OmegaConf.select(cfg, parent) if parent else None
    comp = section.get("_component_") if section is not None and hasattr(section, "get") else None
    if not comp:
        return False
    from torchtune.config._utils import _get_component_from_path

    fn = _get_component_from_path(comp)
    return leaf in inspect.signature(fn).parameters


@pytest.mark.parametrize("doc,cmd", [c for c in COMMANDS if " run " in c[1] and "medcap" in c[1]],
                         ids=lambda v: v if v.endswith(".md") else v[:60])
def test_medcap_run_lines(doc, cmd):
    from omegaconf import OmegaConf

    from medcap.cli import build_run_command

    argv = [a for a in _argv_after(cmd, "run") if a != "--dry-run"]  # medcap run's own flag
    full = build_run_command(argv)  # raises on an unknown recipe, config or torchrun option
    config = Path(full[full.index("--config") + 1])
    recipe = Path([a for a in full if a.endswith(".py")][0])
    assert recipe.parent.name == "recipes" and config.is_file()
    cfg = OmegaConf.load(config)
    overrides = [a for a in full[full.index("--config") + 2:] if "=" in a]
    bad = [o for o in overrides if not _config_key_ok(cfg, o.split("=", 1)[0])]
    assert not bad, f"{doc}: keys not in {config.name}: {bad}\n{cmd}"


def _help_text(prog: List[str], capsys) -> str:
    """``--help`` of a tool script or a ``medcap`` sub-command, run in this process
    (torch is imported once for the whole module instead of once per command)."""
    import runpy

    capsys.readouterr()
    saved = sys.argv
    try:
        if prog[0] == "medcap":
            from medcap.cli import main

            with pytest.raises(SystemExit) as e:
                main([prog[1], "--help"])
        else:
            sys.argv = [prog[0], "--help"]
            sys.path.insert(0, str((ROOT / prog[0]).parent))  # as `python script.py` does
            try:
                with pytest.raises(SystemExit) as e:
                    runpy.run_path(str(ROOT / prog[0]), run_name="__main__")
            finally:
                sys.path.pop(0)
    finally:
        sys.argv = saved
    assert e.value.code in (0, None)
    return capsys.readouterr().out


_HELP_CACHE = {}


@pytest.mark.parametrize("doc,cmd", [c for c in COMMANDS if " run " not in c[1] or "medcap" not in c[1]],
                         ids=lambda v: v if v.endswith(".md") else v[:60])
def test_tool_lines(doc, cmd, capsys):
    toks = shlex.split(cmd)
    while toks and re.match(r"^[A-Z_]+=", toks[0]):
        toks.pop(0)
    if toks[0] == "python":
        script = toks[1]
        assert (ROOT / script).is_file(), f"{doc}: {script} does not exist"
        prog, args = [script], toks[2:]
    elif toks[0] == "medcap":
        if toks[1] in ("ls", "cp"):
            return  # exercised by tests/test_cli.py
        prog, args = ["medcap", toks[1]], toks[2:]
    else:
        pytest.skip(f"not a medcap/python command: {cmd}")
    flags = [a.split("=", 1)[0] for a in args if a.startswith("--")]
    if not flags:
        return  # nothing to check beyond the script existing (and --help could run it)
    key = tuple(prog)
    if key not in _HELP_CACHE:
        _HELP_CACHE[key] = _help_text(prog, capsys)
    missing = [f for f in flags if f not in _HELP_CACHE[key]]
    assert not missing, f"{doc}: {missing} are not options of {' '.join(prog)}"
