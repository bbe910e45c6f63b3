"""The demo's figures, read back from the files the recipes wrote, for the whole test
split and for its two halves: images of combinations vision training saw ("seen")
and of combinations it never saw ("unseen").

    SPLITS, combination_of  the test images' halves, from ``world/world.json``
    read_eval               one evaluation folder: captioning metrics, caption exact
                            match and OmniMedVQA macro accuracy, whole and per half
    chance_figures          what an image-blind guess scores: another test image's
                            caption (CIDEr, exact match), a uniform pick among the options
    read_train_log          the vision training's loss, from torchtune's DiskLogger files

The whole-split captioning metrics are the recipe's own ``metrics-{ckpt}.csv``; a half's
are computed the same way (``medcap.eval.caption_metrics``: pycocoevalcap after its PTB
tokenizer) on that half's rows of ``metrics-raw-{ckpt}.csv``. CIDEr weighs n-grams by
their rarity among the scored references, so a half's CIDEr is that of the half as a
corpus, not an average of the whole's per-image scores.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import random
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from medcap._io import quiet_stderr_fd

SPLITS: Tuple[str, ...] = ("seen", "unseen")
_SCORED = re.compile(r"^omnimedvqa-.*-raw-.*-\d+\.\d+\.csv$")  # the scored file: its accuracy ends the name


# ---- files


def read_metrics_csv(path: Path) -> Dict[str, float]:
    """``metric,score`` lines (the reference's metrics-{ckpt}.csv) -> dict."""
    out: Dict[str, float] = {}
    with open(path, encoding="utf-8-sig") as f:
        for row in csv.reader(f):
            if len(row) >= 2:
                try:
                    out[row[0]] = float(row[1])
                except ValueError:
                    continue  # a header line
    return out


def _latest(paths: Sequence[Path]) -> Optional[Path]:
    return max(paths, key=lambda p: p.stat().st_mtime) if paths else None


def _rows(path: Path) -> List[Dict[str, str]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f))


def combination_of(world_dir: Path) -> Dict[str, str]:
    """Test image path (as the data files name it) -> "seen" or "unseen"."""
    world = json.loads((Path(world_dir) / "world.json").read_text(encoding="utf-8"))
    return {r["image"]: r.get("combination", "seen") for r in world["test"]}


def _halves(rows: Sequence[Dict[str, str]], combination: Mapping[str, str]) -> Dict[str, List[Dict[str, str]]]:
    out: Dict[str, List[Dict[str, str]]] = {s: [] for s in SPLITS}
    for r in rows:
        if r["image"] not in combination:
            raise ValueError(f"results row for image {r['image']!r}, which world.json does not hold as a test image")
        out[combination[r["image"]]].append(r)
    return out


# ---- captions


def _exact(rows: Sequence[Dict[str, str]]) -> Optional[float]:
    return sum(r["output"].strip() == r["generated"].strip() for r in rows) / len(rows) if rows else None


def _caption_block(refs: Sequence[str], cands: Sequence[str]) -> Dict[str, Any]:
    from medcap.eval import caption_metrics

    if not refs:
        return {"n_images": 0}
    scores = caption_metrics(refs, cands)
    return {"n_images": len(refs), "captioning": scores, "CIDEr": scores["CIDEr"],
            "caption_exact_match": sum(a.strip() == b.strip() for a, b in zip(refs, cands)) / len(refs)}


def _read_captions(folder: Path, combination: Mapping[str, str]) -> Dict[str, Any]:
    metrics = _latest([p for p in folder.glob("metrics-*.csv") if not p.name.startswith("metrics-raw-")])
    raw = _latest(list(folder.glob("metrics-raw-*.csv")))
    if metrics is None or raw is None:
        return {}
    rows = _rows(raw)
    out: Dict[str, Any] = {"captioning": read_metrics_csv(metrics), "metrics_file": str(metrics),
                           "caption_exact_match": _exact(rows), "n_images": len(rows)}
    out["CIDEr"] = out["captioning"].get("CIDEr")
    for split, part in _halves(rows, combination).items():
        out.setdefault("by_combination", {})[split] = _caption_block(
            [r["output"] for r in part], [r["generated"] for r in part])
    return out


# ---- questions


def _accuracy(rows: Sequence[Dict[str, str]]) -> Dict[str, Any]:
    """Macro accuracy over modalities (OmniMedVQA's figure), per modality, per question type
    (the demo's question ids end with the attribute asked about)."""
    if not rows:
        return {"n_questions": 0}
    by_mod: Dict[str, List[int]] = {}
    by_type: Dict[str, List[int]] = {}
    for r in rows:
        hit = int(r.get("correct") or 0)
        by_mod.setdefault(r["modality_type"], []).append(hit)
        by_type.setdefault(r.get("question_id", "").rsplit("_", 1)[-1], []).append(hit)
    per_mod = {k: sum(v) / len(v) for k, v in sorted(by_mod.items())}
    return {"n_questions": len(rows), "macro_accuracy": sum(per_mod.values()) / len(per_mod),
            "per_modality": per_mod, "per_question_type": {k: sum(v) / len(v) for k, v in sorted(by_type.items())}}


def _read_vqa(folder: Path, combination: Mapping[str, str]) -> Dict[str, Any]:
    scored = _latest([p for p in folder.glob("omnimedvqa-*.csv") if _SCORED.match(p.name)])
    if scored is None:
        return {}
    rows = _rows(scored)
    out = {**_accuracy(rows), "vqa_file": str(scored)}
    out["by_combination"] = {split: _accuracy(part) for split, part in _halves(rows, combination).items()}
    return out


def read_eval(folder: Path, world_dir: Path) -> Dict[str, Any]:
    """Captioning and OmniMedVQA figures of one evaluation folder (``eval/trained`` or
    ``eval/control``): the whole test split's at the top, each half's under
    ``seen`` and ``unseen``."""
    combination = combination_of(world_dir)
    caps, vqa = _read_captions(folder, combination), _read_vqa(folder, combination)
    out = {k: v for k, v in {**caps, **vqa}.items() if k not in ("by_combination", "n_images", "n_questions")}
    for split in SPLITS:
        part = {**caps.get("by_combination", {}).get(split, {}), **vqa.get("by_combination", {}).get(split, {})}
        if part:
            out[split] = part
    return out


# ---- chance


def derangement(n: int, seed: int = 0) -> List[int]:
    """For each of ``n`` items, another item's index (a fixed shuffled cycle; never itself)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    nxt = {order[k]: order[(k + 1) % n] for k in range(n)}
    return [nxt[i] for i in range(n)]


def _chance_captions(refs: Sequence[str]) -> Dict[str, Any]:
    """CIDEr and exact match of every caption against another one (no METEOR: it is slow)."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if len(refs) < 2:
        return {}
    cands = [refs[j] for j in derangement(len(refs))]
    with contextlib.redirect_stdout(io.StringIO()), quiet_stderr_fd():
        tok = PTBTokenizer()
        gts = tok.tokenize({i: [{"caption": r}] for i, r in enumerate(refs)})
        res = tok.tokenize({i: [{"caption": c}] for i, c in enumerate(cands)})
        cider, _ = Cider().compute_score(gts, res)
    return {"CIDEr": float(cider), "caption_exact_match": sum(a == b for a, b in zip(refs, cands)) / len(refs)}


def _chance_accuracy(questions: Sequence[Dict[str, Any]]) -> Optional[float]:
    """Macro accuracy of guessing uniformly among each question's options."""
    per: Dict[str, List[float]] = {}
    for q in questions:
        n = sum(1 for letter in "ABCD" if q.get(f"option_{letter}"))
        per.setdefault(q["modality_type"], []).append(1.0 / n)
    return sum(sum(v) / len(v) for v in per.values()) / len(per) if per else None


def chance_figures(world_dir: Path) -> Dict[str, Dict[str, Any]]:
    """An image-blind model's figures, whole (``all``) and per half: every test caption
    scored against another test image's caption of the same half (a fixed derangement;
    "all" draws from the whole split), and uniform guessing among the options."""
    world_dir = Path(world_dir)
    combination = combination_of(world_dir)
    records = json.loads((world_dir / "test.json").read_text(encoding="utf-8"))
    qpath = world_dir / "OmniMedVQA" / "QA_information" / "Open-access" / "MedcapDemo.json"
    questions = json.loads(qpath.read_text(encoding="utf-8"))
    out: Dict[str, Dict[str, Any]] = {}
    for split in ("all",) + SPLITS:
        keep = lambda image: split == "all" or combination.get(image) == split  # noqa: E731
        refs = [r["conversations"][-1]["value"] for r in records if keep(r["image"])]
        qs = [q for q in questions if keep(q["image_path"])]
        out[split] = {**_chance_captions(refs), "macro_accuracy": _chance_accuracy(qs)}
    return out


# ---- training


def read_train_log(log_dir: Path) -> List[Tuple[int, float]]:
    """(step, loss) pairs from torchtune's DiskLogger files (``Step N | loss:X ...``)."""
    points: List[Tuple[int, float]] = []
    for f in sorted(Path(log_dir).glob("log_*.txt")):
        for line in f.read_text(errors="replace").splitlines():
            m = re.match(r"Step (\d+) \|.*?\bloss:([-+0-9.eE]+|nan)", line)
            if m:
                points.append((int(m.group(1)), float(m.group(2))))
    return points
