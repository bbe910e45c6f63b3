"""Small VQA-RAD- and OmniMedVQA-layout datasets made on the spot (synthetic images,
no patient data), with the real sets' quirks, for tests, benchmarks and the demo.

OmniMedVQA quirks reproduced: the dataset's own modality spellings (``OCT
(Optical Coherence Tomography`` without its parenthesis, ``MR (Mag-netic
Resonance Imaging)``, lower-case ``ultrasound``), near-miss spellings that the
reference does not keep, records naming the modality in ``modality`` instead of
``modality_type``, questions with two or three options, and image paths that
point at no file.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Dict, List

from medcap.eval._datasets import OMNIMEDVQA_MODALITIES
from medcap.testing import make_image

_WORDS = ["lesion", "mass", "nodule", "effusion", "fracture", "opacity", "normal", "edema", "cyst", "tumor"]


def make_vqarad_layout(root: str | Path, *, n_images: int = 4, seed: int = 0, image_size: int = 40) -> Dict[str, Any]:
    """``{root}/VQA_RAD/VQA_RAD Dataset Public.json`` + ``VQA_RAD Image Folder/``.

    Each image gets a closed free-form question, a closed paraphrase, an open
    question and a closed training question: only the first two are test items.
    Returns ``{"root", "expected": [(image_name, question, answer), ...]}``.
    """
    root = Path(root)
    base = root / "VQA_RAD"
    img_dir = base / "VQA_RAD Image Folder"
    rng = random.Random(seed)
    records: List[Dict[str, Any]] = []
    expected = []
    qid = 0
    for i in range(n_images):
        name = f"synpic{1000 + i}.jpg"
        make_image(img_dir / name, image_size, seed=seed * 100 + i)
        w = rng.choice(_WORDS)
        rows = [
            ("test_freeform", "CLOSED", f"Is there a {w}?", rng.choice(["Yes", "No"])),
            ("test_para", "CLOSED", f"Does the image show a {w}?", rng.choice(["yes", "no"])),
            ("test_freeform", "OPEN", f"Where is the {w}?", "left lung"),
            ("freeform", "CLOSED", f"Is this a {w}?", "no"),
        ]
        for phrase_type, answer_type, q, a in rows:
            qid += 1
            records.append(
                {"qid": qid, "image_name": name, "image_organ": "CHEST", "answer": a, "answer_type": answer_type,
                 "question_type": "PRES", "question": q, "phrase_type": phrase_type}
            )
            if phrase_type in ("test_freeform", "test_para") and answer_type == "CLOSED":
                expected.append((name, q, a))
    base.mkdir(parents=True, exist_ok=True)
    (base / "VQA_RAD Dataset Public.json").write_text(json.dumps(records, indent=1))
    return {"root": str(root), "expected": expected}


def make_omnimedvqa_layout(
    root: str | Path, *, per_modality: int = 2, seed: int = 0, image_size: int = 40, quirks: bool = True
) -> Dict[str, Any]:
    """``{root}/OmniMedVQA/QA_information/Open-access/*.json`` + images under ``{root}/OmniMedVQA/Images/``.

    ``per_modality`` questions for each of the 8 kept modalities, spread over two
    files. With ``quirks``: one record uses ``modality``, some lack option C/D,
    one image is missing, and a few records carry spellings that are not kept.
    Returns counts for checking: ``kept`` (questions the reader keeps by default;
    the ``modality`` record is left out as the reference leaves it out),
    ``missing_images``, ``excluded`` (by spelling), ``modality_key``, ``no_option_C``.
    """
    root = Path(root)
    base = root / "OmniMedVQA"
    qa_dir = base / "QA_information" / "Open-access"
    qa_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    files: Dict[str, List[Dict[str, Any]]] = {"Dataset-A.json": [], "Dataset-B.json": []}
    counts = {"kept": 0, "missing_images": 0, "excluded": 0, "modality_key": 0, "no_option_C": 0}
    n = 0
    for m_i, modality in enumerate(OMNIMEDVQA_MODALITIES):
        for k in range(per_modality):
            n += 1
            rel = f"Images/{m_i}/img_{k:03d}.png"
            make_image(base / rel, image_size, seed=seed * 1000 + n)
            options = [f"{rng.choice(_WORDS)} {j}" for j in range(4)]
            n_opts = 4 if (not quirks or n % 3) else (2 if n % 2 else 3)
            rec: Dict[str, Any] = {
                "question_id": f"q{n:04d}",
                "dataset": "Dataset-A" if n % 2 else "Dataset-B",
                "question_type": "Modality Recognition",
                "question": f"What finding is visible in image {n}?",
                "gt_answer": options[rng.randrange(n_opts)],
                "image_path": rel,
                "modality_type": modality,
            }
            for j in range(n_opts):
                rec[f"option_{'ABCD'[j]}"] = options[j]
            if n_opts < 3 and not (quirks and n == 3):  # among the questions kept by default
                counts["no_option_C"] += 1
            if quirks and n == 3:
                rec["modality"] = rec.pop("modality_type")
                counts["modality_key"] += 1
                counts["kept"] -= 1  # undone by the += 1 below: left out by default
            if quirks and n == 5:
                rec["image_path"] = "Images/does_not_exist.png"
                counts["missing_images"] += 1
            counts["kept"] += 1
            files["Dataset-A.json" if n % 2 else "Dataset-B.json"].append(rec)
    if quirks:
        for j, odd in enumerate(("MR (Magnetic Resonance Imaging)", "OCT (Optical Coherence Tomography)", "Ultrasound")):
            n += 1
            rel = f"Images/odd/img_{j}.png"
            make_image(base / rel, image_size, seed=seed * 1000 + n)
            files["Dataset-B.json"].append(
                {"question_id": f"q{n:04d}", "dataset": "Dataset-B", "question_type": "x", "question": "Which one?",
                 "gt_answer": "a", "image_path": rel, "option_A": "a", "option_B": "b", "modality_type": odd}
            )
            counts["excluded"] += 1
    for name, recs in files.items():
        (qa_dir / name).write_text(json.dumps(recs, indent=1))
    return {"root": str(root), **counts}
