"""The measured workload: where the trained demo model stops, from a finished demo folder.

    python bench/demo_stop_lengths.py /tmp/demo        # writes bench/workloads/demo_stop_lengths.json

Reads the trained model's results files in ``DEMO/eval/trained`` (``medcap demo --out DEMO``):
the OmniMedVQA descriptions (``*.descriptions.jsonl``), its answers (the raw CSV's
``generated``), its letter replies (the scored CSV's ``predict_generated``) and the
captioning suite's captions (``metrics-raw-*.csv``), and counts each text's tokens with
the demo LM's own tokenizer (``DEMO/llm/original``). A row that ended before its budget
sampled one more token, the stop token, which is counted too (``steps``): the bench's
rows, whose random weights never stop, then do the same work. The files hold text, not
ids, so the counts are of the re-encoded text.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Dict, List

import yaml

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

OUT = REPO / "bench" / "workloads" / "demo_stop_lengths.json"
LETTER_BUDGET = 20  # medcap.eval's letter-reply budget
ANSWER_CAP = 50  # answers: min(50, max_new_tokens)


def _rows(path: Path) -> List[Dict[str, str]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


def _find(trained: Path) -> Dict[str, Path]:
    """The results files by what their columns hold (file names carry scores and suffixes)."""
    found: Dict[str, Path] = {}
    for p in sorted(trained.glob("*.csv")):
        if p.name.endswith("-modality.csv"):
            continue
        cols = set(_rows(p)[0]) if p.stat().st_size else set()
        if "predict_generated" in cols:
            found["score"] = p
        elif "question_id" in cols and "generated" in cols:
            found["answer"] = p
        elif p.name.startswith("metrics-raw-"):
            found["caption"] = p
    descs = sorted(trained.glob("*.descriptions.jsonl"))
    if descs:
        found["desc"] = descs[0]
    missing = {"desc", "answer", "score", "caption"} - set(found)
    if missing:
        raise SystemExit(f"demo_stop_lengths.py: error: {trained} lacks the {sorted(missing)} results of a finished demo")
    return found


def _texts(kind: str, path: Path) -> List[str]:
    if kind == "desc":
        lines = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
        return [x["value"] for x in lines if x.get("key") != "__fingerprint__"]
    col = "predict_generated" if kind == "score" else "generated"
    return [r[col] for r in _rows(path)]


def main(argv=None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("demo_dir", type=Path, help="a finished `medcap demo --out DIR` folder")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    trained = args.demo_dir / "eval" / "trained"
    configs = sorted(trained.glob("generate-*.config.yaml"))
    if not configs:
        raise SystemExit(f"demo_stop_lengths.py: error: no generate-*.config.yaml in {trained}: not a finished demo")
    cfg = yaml.safe_load(configs[0].read_text())
    max_new = int(cfg["max_new_tokens"])
    from medcap.models import llama3_tokenizer

    llm = args.demo_dir / "llm" / "original"
    tok = llama3_tokenizer(str(llm / "tokenizer.model"), str(llm / "special_tokens.json"))
    budgets = {"desc": max_new, "caption": max_new, "answer": min(ANSWER_CAP, max_new), "score": LETTER_BUDGET}
    kinds = {}
    files = _find(trained)
    for kind in ("desc", "answer", "score", "caption"):
        texts = _texts(kind, files[kind])
        counts = [len(tok.encode(t, add_bos=False, add_eos=False)) for t in texts]
        steps = [min(n + 1, budgets[kind]) for n in counts]  # + the stop token, unless the budget ended it
        kinds[kind] = {
            "file": files[kind].name, "rows": len(texts), "budget": budgets[kind],
            "stopped_by_the_model": sum(n < budgets[kind] for n in counts),
            "mean_steps": round(sum(steps) / len(steps), 2),
            "steps": {str(k): v for k, v in sorted(Counter(steps).items())},
        }
    digest = hashlib.sha256(b"".join(files[k].read_bytes() for k in sorted(files))).hexdigest()[:16]
    out = {
        "what": "tokens the trained demo model generated per row on its held-out set, + 1 for the stop token "
                "it sampled (steps), per kind of generation",
        "made_by": "python bench/demo_stop_lengths.py DEMO_DIR  (DEMO_DIR from: medcap demo --out DEMO_DIR)",
        "demo": {"model": cfg.get("model", {}).get("_component_"), "seed": cfg.get("seed"),
                 "max_new_tokens": max_new, "results_sha256": digest},
        "kinds": kinds,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(json.dumps({k: (v["rows"], v["mean_steps"]) for k, v in kinds.items()}))
    return out


if __name__ == "__main__":
    main()
