"""``make bench``: every CPU benchmark with its default settings, its JSON written to
``bench/results/NAME.json``, then the docs' tables regenerated (``tables.py``).

    python bench/run_all.py --demo DIR            # what `make bench` runs (DEMO=DIR)
    python bench/run_all.py --quick --out /tmp/x  # seconds per bench: checks the chain runs

The commands (``COMMANDS``) are the benches' defaults: the docs test checks that the
committed JSON was made with them. The serving benchmark needs the demo's trained model
(``medcap demo --out DIR``); without ``--demo`` it is skipped and says so. vLLM is used
where ``--vllm-python`` (or ``$MEDCAP_VLLM_PYTHON``, or ``.venv-vllm``) has it. Each bench
gets ``--time-limit`` style bounds of its own; the whole run is planned for <= 20 minutes on
2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
# name -> the arguments `make bench` gives (DEMO is filled in); the docs test reads these
COMMANDS: Dict[str, List[str]] = {
    "eval_omnimedvqa": ["--time-limit", "840"],
    "train_step": [],
    "serve": ["--demo", "DEMO"],
}


def run(name: str, extra: List[str], out: Path, env: Dict[str, str]) -> bool:
    cmd = [sys.executable, str(BENCH / f"{name}.py"), *extra]
    print(f"== {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    t = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)
    lines = proc.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        print(f"run_all.py: {name} printed no JSON (exit {proc.returncode})", file=sys.stderr)
        return False
    result["command"] = "python " + " ".join(str(Path(c).relative_to(REPO)) if c.startswith(str(REPO)) else c
                                             for c in cmd[1:])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"== {name}: {time.perf_counter() - t:.0f} s, goals met: {result.get('goals_met')}", file=sys.stderr)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", help="a finished `medcap demo --out DIR` folder (the serving benchmark's model)")
    p.add_argument("--vllm-python", help="the interpreter that has vLLM")
    p.add_argument("--out", type=Path, default=BENCH / "results")
    p.add_argument("--quick", action="store_true", help="every bench with --quick, no tables (a test of the chain)")
    args = p.parse_args(argv)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    if args.vllm_python:
        env["MEDCAP_VLLM_PYTHON"] = args.vllm_python
    t0, ok = time.perf_counter(), True
    for name, extra in COMMANDS.items():
        if "DEMO" in extra and not args.demo:
            print(f"run_all.py: {name} skipped: it needs --demo DIR (make bench DEMO=DIR; make demo makes one)",
                  file=sys.stderr)
            continue
        extra = [args.demo if a == "DEMO" else a for a in extra]
        if args.quick:
            extra = ["--quick"] + (["--demo", args.demo] if "--demo" in extra else [])
        ok &= run(name, extra, args.out, env)
    print(f"run_all.py: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if not args.quick:
        sys.path.insert(0, str(BENCH))
        import tables

        ok &= tables.main(["--results", str(args.out)]) == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
