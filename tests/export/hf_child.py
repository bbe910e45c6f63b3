"""A Python process that cannot import medcap, loading an exported folder with transformers
alone: the child's code, and how it is started (``run_child``)."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Sequence

# Runs with `python -I -S`: no site (so no .pth file installs medcap's editable finder), no
# PYTHONPATH, no working folder on the path; sys.path gets the site-packages folders, without medcap.
CHILD = r"""
import importlib.util, json, sys
sys.path.extend(json.loads(sys.argv[1]))
proof = {"find_spec": importlib.util.find_spec("medcap") is None, "flags": [sys.flags.isolated, sys.flags.no_site]}
try:
    import medcap  # noqa: F401
    proof["import"] = "imported"
except ImportError as e:
    proof["import"] = f"{type(e).__name__}: {e}"
proof["finders"] = [getattr(f, "__qualname__", type(f).__qualname__) for f in sys.meta_path]
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor
folder, jobs = sys.argv[2], json.loads(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
rows = []
for image, question, max_new in jobs:
    inputs = processor(images=Image.open(image), text=question, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_new, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:]
    rows.append({"prompt": inputs["input_ids"][0].tolist(), "new": new.tolist(),
                 "text": processor.decode(new, skip_special_tokens=True).strip()})
proof["loaded"] = sorted(m for m in sys.modules if m == "medcap" or m.startswith("medcap."))
print("RESULT " + json.dumps({"rows": rows, "proof": proof, "model": type(model).__name__}))
"""


def site_dirs_without_medcap(scratch: Path) -> List[str]:
    """The site-packages folders; one that holds a ``medcap`` package is replaced by a folder of
    links to everything else in it."""
    out = []
    for d in site.getsitepackages():
        folder = Path(d)
        if not folder.is_dir():
            continue
        if (folder / "medcap").exists():
            shadow = scratch / f"site-{len(out)}"
            shadow.mkdir(parents=True, exist_ok=True)
            for entry in folder.iterdir():
                if entry.name != "medcap":
                    (shadow / entry.name).symlink_to(entry)
            folder = shadow
        out.append(str(folder))
    return out


def run_child(folder: str, jobs: Sequence[Sequence[Any]], scratch: str, timeout: int = 600) -> Dict[str, Any]:
    """``jobs``: ``[image path, question or None, max_new_tokens]``; returns the child's rows and proof."""
    scratch_dir = Path(scratch)
    scratch_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "MEDCAP"))}
    env.update(HF_MODULES_CACHE=str(scratch_dir / "hf_modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=str(scratch_dir / "hf_home"))
    cmd = [sys.executable, "-I", "-S", "-c", CHILD, json.dumps(site_dirs_without_medcap(scratch_dir)), str(folder),
           json.dumps([list(j) for j in jobs])]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=scratch_dir, env=env, timeout=timeout)
    lines = [line for line in res.stdout.splitlines() if line.startswith("RESULT ")]
    if res.returncode != 0 or not lines:
        raise AssertionError(f"the transformers-only process failed ({res.returncode}):\n{res.stderr[-4000:]}")
    out = json.loads(lines[-1][len("RESULT "):])
    out["stderr"] = res.stderr
    return out
