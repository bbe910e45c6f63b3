"""The commands in the user docs must keep working: every `medcap run` line resolves to
medcap's recipe and config and names only keys that config has; every tool, `medcap`
subcommand and `make` target shown exists and accepts the flags shown. (The tiny
configs run these same recipes end to end in tests/recipes and in the demo.)"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest
from omegaconf import OmegaConf

from medcap import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = [p for p in ("README.md", "README_FINETUNE.md", "README_TUTORIAL.md") if (ROOT / p).is_file()]
_FENCE = re.compile(r"^```(\w*)\s*$")
_MISSING = object()


def _blocks(doc: str) -> Iterator[Tuple[str, str]]:
    lang, buf = None, []
    for line in (ROOT / doc).read_text().splitlines():
        m = _FENCE.match(line.strip())
        if m and lang is None:
            lang, buf = m.group(1) or "text", []
        elif line.strip() == "```" and lang is not None:
            yield lang, "\n".join(buf)
            lang = None
        elif lang is not None:
            buf.append(line)


def _shell_commands(text: str) -> List[str]:
    """Logical command lines of a shell block: continuations joined, comments dropped."""
    out, cur = [], ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if not cur and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        cur += line
        out.append(cur.split(" #")[0].strip())
        cur = ""
    return out


def _words(command: str) -> List[str]:
    # Shell variables stand for user paths; any non-empty value keeps the line's shape.
    command = re.sub(r"\$\{?(\w+)\}?", r"/path/\1", command)
    words = shlex.split(command)
    while words and re.match(r"^\w+=", words[0]):  # leading VAR=value assignments
        words.pop(0)
    return words


def _doc_commands():
    for doc in DOCS:
        for lang, text in _blocks(doc):
            if lang in ("bash", "sh", "shell", "console"):
                for c in _shell_commands(text):
                    if c.startswith("$ "):
                        c = c[2:]
                    yield doc, c
            elif lang == "python" and "os.system" in text:
                yield doc, ("python-launcher", text)


COMMANDS = list(_doc_commands())


def _check_run_line(argv: List[str]) -> None:
    cmd = cli.build_run_command(argv)
    recipe = next(Path(w) for w in cmd if w.endswith(".py"))
    assert recipe.is_file() and recipe.parent == cli.recipes_dir(), recipe
    config = Path(cmd[cmd.index("--config") + 1])
    cfg = OmegaConf.load(config)
    overrides = cmd[cmd.index("--config") + 2:]
    for ov in overrides:
        assert "=" in ov, f"override without '=': {ov!r}"
        key = ov.split("=", 1)[0].lstrip("~")
        assert OmegaConf.select(cfg, key, default=_MISSING) is not _MISSING, (
            f"{config.name} has no key {key!r} (from the documented override {ov!r})"
        )


def _help(argv: List[str]) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run(argv + ["--help"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout + res.stderr


def test_the_docs_show_commands():
    assert "README.md" in DOCS
    assert any(isinstance(c, str) and c.startswith("medcap run") for _, c in COMMANDS)


@pytest.mark.parametrize("doc,command", COMMANDS, ids=[f"{d}:{i}" for i, (d, _) in enumerate(COMMANDS)])
def test_documented_command(doc, command, monkeypatch):
    if isinstance(command, tuple):  # the reference's small-Python-launcher style
        ran: List[str] = []
        monkeypatch.setattr(os, "system", lambda c: ran.append(c) or 0)
        exec(compile(command[1], f"<{doc} launcher>", "exec"), {"__name__": "__doc_launcher__"})
        assert ran, "the launcher ran no command"
        for c in ran:
            words = _words(c)
            assert words[:2] == ["medcap", "run"], c
            _check_run_line(words[2:])
        return

    words = _words(command)
    if not words:  # a VAR=value line: the user's own paths
        return
    head = words[0]
    if head == "medcap":
        sub = words[1]
        if sub == "run":
            _check_run_line([w for w in words[2:] if w != "--dry-run"])
        else:
            assert sub in ("ls", "cp", "validate-data", "demo"), command
            text = _help([sys.executable, "-m", "medcap.cli", sub]) if sub != "ls" else ""
            for flag in (w.split("=")[0] for w in words[2:] if w.startswith("--")):
                assert flag in text, f"`medcap {sub}` does not know {flag}"
    elif head in ("python", "python3") and words[1].endswith(".py"):
        script = ROOT / words[1]
        assert script.is_file(), f"{words[1]} does not exist"
        text = _help([sys.executable, str(script)])
        for flag in (w.split("=")[0] for w in words[2:] if w.startswith("--")):
            assert flag in text, f"{words[1]} does not know {flag}"
    elif head == "make":
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M)
        for t in words[1:]:
            if "=" not in t:
                assert t in targets, f"no make target {t!r}"
    elif head == "PYTHONPATH=./" or command.startswith("PYTHONPATH=./ tune run"):
        _check_run_line(["/".join(["recipes", Path(words[2]).name])] + words[3:])
    # other shell lines (cd, source, pip, torchrun ... ) are the user's own environment
