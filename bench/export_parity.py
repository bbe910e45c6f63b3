"""``medcap export``'s folder against medcap itself, on a trained model: are the greedy answers equal?

    python bench/export_parity.py --demo datasets/demo            # the demo's model, 12 test images
    python bench/export_parity.py --checkpoint CKPT --images a.png b.png --questions "Is there a fracture?"

The checkpoint (``--demo DIR``: ``DIR/train/checkpoint/meta_model_last.safetensors``, with
``DIR``'s held-out test images and each image's first OmniMedVQA-layout question) is exported
into a scratch folder. Each image is captioned and asked its questions twice, greedily: with
``medcap.load`` (medcap's engine) and, in a Python process that cannot import medcap, with
transformers alone (``AutoModelForCausalLM`` and ``AutoProcessor``, ``trust_remote_code``;
the child is ``tests/export/hf_child.py``, the one the export tests run). The last stdout line
is JSON: rows, rows whose text is equal, the first differences.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "export"))  # the transformers-only child of the export tests

from hf_child import run_child  # noqa: E402

import medcap  # noqa: E402


def demo_rows(demo: Path, n: int) -> List[List[Optional[str]]]:
    """[image, question] rows: a caption (None) and the data set's first question, for the first
    ``n`` test images of the demo's OmniMedVQA layout."""
    root = demo / "world" / "OmniMedVQA"
    questions: Dict[str, str] = {}
    for f in sorted((root / "QA_information" / "Open-access").glob("*.json")):
        for q in json.loads(f.read_text(encoding="utf-8")):
            questions.setdefault(q["image_path"], q["question"])
    images = sorted(questions)[:n]
    return [[str(root / im), q] for im in images for q in (None, questions[im])]


def main(argv: Optional[List[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", type=Path, help="a folder `medcap demo` wrote")
    p.add_argument("--checkpoint", type=Path, help="a checkpoint medcap trained (default: the demo's)")
    p.add_argument("--images", nargs="*", default=[], help="images (with --checkpoint)")
    p.add_argument("--questions", nargs="*", default=[], help="questions asked of every --images image")
    p.add_argument("--n-images", type=int, default=12, help="--demo: how many test images (default 12)")
    p.add_argument("--max-new-tokens", type=int, default=40)
    args = p.parse_args(argv)
    if args.demo is None and (args.checkpoint is None or not args.images):
        p.error("give --demo DIR, or --checkpoint CKPT with --images")
    ckpt = args.checkpoint or args.demo / "train" / "checkpoint" / "meta_model_last.safetensors"
    rows = demo_rows(args.demo, args.n_images) if args.demo and not args.images else [
        [im, q] for im in args.images for q in [None, *args.questions]]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="medcap_export_parity_") as scratch:
        folder = Path(scratch) / "exported"
        subprocess.run([sys.executable, "-m", "medcap.cli", "export", str(ckpt), "--out", str(folder)], check=True)
        model = medcap.load(ckpt, device="cpu")
        ours = [model.ask(im, q, max_new_tokens=args.max_new_tokens) for im, q in rows]
        theirs = run_child({"generate": [[str(folder), im, q, args.max_new_tokens] for im, q in rows]},
                           str(Path(scratch) / "child"))
    texts = [r["text"] for r in theirs["rows"]]
    differ = [{"image": Path(im).name, "question": q, "medcap": a, "transformers": b}
              for (im, q), a, b in zip(rows, ours, texts) if a.strip() != b.strip()]
    result = {"checkpoint": str(ckpt), "rows": len(rows), "images": len({im for im, _ in rows}),
              "equal": len(rows) - len(differ), "first_differences": differ[:5],
              "medcap_importable_in_child": theirs["proof"].get("import") == "imported",
              "max_new_tokens": args.max_new_tokens, "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
