"""What ``vqa_scoring=loglik`` costs against the reference's letter-mapping chat, on a finished run.

    python bench/loglik_cost.py --demo datasets/demo      # the demo's trained OmniMedVQA file

The raw OmniMedVQA file of a finished run (``--raw``; with ``--demo DIR`` the one in
``DIR/eval/trained``) is copied to a scratch folder and scored there both ways with the run's
model, loaded once (``medcap.load``): ``letter`` (one short generation per row, the reference's
rule) and ``loglik`` (the likelihood of every option, a forward pass over each option's tokens
after the prompt and the image). Only scoring is timed: the answers are the raw file's. The
last stdout line is JSON: seconds and rows per second each way, their ratio, both accuracies.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import medcap
from medcap.eval import ImageLoader, score_file


def main(argv: Optional[List[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", type=Path, help="a folder `medcap demo` wrote")
    p.add_argument("--raw", type=Path, help="a finished run's raw OmniMedVQA CSV (default: the demo's)")
    p.add_argument("--checkpoint", type=Path, help="the model that made it (default: the demo's)")
    p.add_argument("--image-root", type=Path, help="the folder the rows' image paths start in "
                   "(dataset_source/OmniMedVQA; default: the demo's)")
    args = p.parse_args(argv)
    if args.demo is None and (args.raw is None or args.checkpoint is None or args.image_root is None):
        p.error("give --demo DIR, or --raw FILE with --checkpoint CKPT and --image-root DIR")
    ckpt = args.checkpoint or args.demo / "train" / "checkpoint" / "meta_model_last.safetensors"
    if args.raw is None:  # the demo's file; several (other vqa_types) would make the choice a guess
        found = sorted((args.demo / "eval" / "trained").glob("omnimedvqa-*-raw-*-0_50.csv"))
        if len(found) > 1:
            p.error("several raw OmniMedVQA files; pick one with --raw: " + ", ".join(f.name for f in found))
    raw = args.raw or (found[0] if found else None)
    root = args.image_root or args.demo / "world" / "OmniMedVQA"
    if raw is None or not raw.is_file():
        p.error(f"no raw OmniMedVQA file found ({raw or args.demo / 'eval' / 'trained'})")
    model = medcap.load(ckpt, device="cpu")
    to_tensor = ImageLoader(model.engine.model.vision.visual.image_size)

    def loader(path: str):
        return to_tensor(str(root / path))

    out: Dict = {"raw": str(raw), "checkpoint": str(ckpt)}
    with tempfile.TemporaryDirectory(prefix="medcap_loglik_cost_") as scratch:
        for method in ("letter", "loglik"):
            copy = Path(scratch) / method / raw.name
            copy.parent.mkdir()
            shutil.copy2(raw, copy)
            t0 = time.perf_counter()
            summary = score_file(model.engine, copy, method=method, image_loader=loader, progress=False)
            seconds = time.perf_counter() - t0
            out[method] = {"seconds": round(seconds, 2), "rows": summary["rows"],
                           "rows_per_s": round(summary["rows"] / seconds, 2), "accuracy": round(summary["accuracy"], 4)}
    out["loglik_over_letter_seconds"] = round(out["loglik"]["seconds"] / out["letter"]["seconds"], 2)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
