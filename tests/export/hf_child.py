"""A Python process that cannot import medcap, loading an exported folder with transformers
alone: the child's code, and how it is started (``run_child``)."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

MAX_NEW = 12  # new tokens per row (the tiny random LLM rarely stops by itself)
QUESTIONS = [None, "Is there a fracture?", "Modality: which one? [urgent]"]  # None: the captioning prompt

# Runs with `python -I -S`: no site (so no .pth file installs medcap's editable finder), no
# PYTHONPATH, no working folder on the path; sys.path gets the site-packages folders, without medcap.
CHILD = r"""
import hashlib, importlib.util, json, sys
sys.path.extend(json.loads(sys.argv[1]))
proof = {"find_spec_is_none": importlib.util.find_spec("medcap") is None, "flags": [sys.flags.isolated, sys.flags.no_site]}
try:
    import medcap  # noqa: F401
    proof["import"] = "imported"
except ImportError as e:
    proof["import"] = f"{type(e).__name__}: {e}"
proof["finders"] = [getattr(f, "__qualname__", type(f).__qualname__) for f in sys.meta_path]
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor
plan = json.loads(sys.argv[2])
out = {"rows": [], "broken": {}, "meta": {}}
loaded = {}
for folder, image, question, max_new in plan.get("generate", []):
    if folder not in loaded:
        loaded[folder] = (AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True),
                          AutoProcessor.from_pretrained(folder, trust_remote_code=True))
    model, processor = loaded[folder]
    inputs = processor(images=Image.open(image), text=question, return_tensors="pt")
    ids = model.generate(**inputs, max_new_tokens=max_new, do_sample=False)
    new = ids[0, inputs["input_ids"].shape[1]:]
    out["rows"].append({"folder": folder, "image": image, "question": question, "prompt": inputs["input_ids"][0].tolist(),
                        "new": new.tolist(), "text": processor.decode(new, skip_special_tokens=True).strip(),
                        "pixels": hashlib.sha256(inputs["pixel_values"].contiguous().numpy().tobytes()).hexdigest(),
                        "class": type(model).__name__, "dtype": str(model.dtype)})
for folder in plan.get("broken", []):
    try:
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
        out["broken"][folder] = "loaded"
    except Exception as e:
        out["broken"][folder] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
for folder in plan.get("meta", []):
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    prompts = [processor.tokenizer(processor.prompt(q), add_special_tokens=False)["input_ids"] for q in plan["questions"]]
    out["meta"][folder] = {"shapes": {k: list(v.shape) for k, v in model.state_dict().items()}, "prompts": prompts,
                           "class": type(model).__name__}
proof["loaded"] = sorted(m for m in sys.modules if m == "medcap" or m.startswith("medcap."))
out["proof"] = proof
print("RESULT " + json.dumps(out))
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


def run_child(plan: Dict[str, Any], scratch: str, timeout: int = 900) -> Dict[str, Any]:
    """``plan``: ``generate`` ([folder, image, question or None, max_new_tokens] rows), ``broken``
    (folders whose load must fail: the first line of each error) and ``meta`` (folders built on
    the meta device: every tensor's shape); returns those and the ``proof`` medcap was not there."""
    scratch_dir = Path(scratch)
    scratch_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "MEDCAP"))}
    env.update(HF_MODULES_CACHE=str(scratch_dir / "hf_modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=str(scratch_dir / "hf_home"))
    cmd = [sys.executable, "-I", "-S", "-c", CHILD, json.dumps(site_dirs_without_medcap(scratch_dir)), json.dumps(plan)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=scratch_dir, env=env, timeout=timeout)
    lines = [line for line in res.stdout.splitlines() if line.startswith("RESULT ")]
    if res.returncode != 0 or not lines:
        raise AssertionError(f"the transformers-only process failed ({res.returncode}):\n{res.stderr[-4000:]}")
    out = json.loads(lines[-1][len("RESULT "):])
    out["stderr"] = res.stderr
    return out
