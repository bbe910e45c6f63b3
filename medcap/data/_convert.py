"""``tools/convert_to_sharegpt.py``: public caption data sets -> the reference's sharegpt files.

In order: reading a source (``_pairs``: its (image, text) rows, once the two fields are
found in some record); the caption sources: ``convert_pmcoa`` (``pmcoa_train.json``),
``convert_vqarad`` (``vqarad_train.json``, ``vqarad_test.json``) and ``convert_textplus``
(PMC-VQA-text, ROCOv2, LLaVA-Med, PubMedVision -> ``textplus_train.json``; + MedICaT when
present, + PMC-OA -> ``textplus_pmcoa_train.json``; + PMC-Patients ->
``textplus_pmcoa_patients_train.json``, in the reference's order); then the command,
``convert_main``, which also runs SLAKE and PathVQA (``_convert_vqa``).

Input layouts and the fields read from each source: datasets/README.md (section 6 of
reference-behavior.md). Records with a missing image, an empty text or a lone surrogate
(named) are skipped and counted; a missing textplus source is reported and left out; a missing input of
``pmcoa``/``vqarad`` (or of every textplus source), or a field no record has, is an error.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from medcap.data._convert_vqa import convert_pathvqa, convert_slake
from medcap.data._converter import (
    INSTRUCTION_CHOICES,
    Converter,
    MissingInput,
    read_csv,
    read_json_list,
    read_jsonl,
    require_fields,
    write_records,
)

MEDICAT_BROKEN = "ffd83b6453f94f2a1ddb346e324f5bdbf228c1f3_4-Figure3-1.png"
PMCOA_IMAGES = "caption_T060_filtered_top4_sep_v0_subfigures"
MEDICAT_JSONL = "s2_full_figures_oa_nonroco_combined_medical_top4_public.jsonl"


# ---- Reading a source

def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise MissingInput(f"{what} not found: {path}")
    return path


def _pairs(source: str, path: Path, items: List[Any], image_key: str, text_key: str):
    """(image, text) of every item, after checking the two fields exist in some record."""
    require_fields(source, path, items, (image_key, text_key))
    return _get(items, image_key, text_key)


def _get(items: List[Any], image_key: str, text_key: str):
    for it in items:
        if isinstance(it, dict):
            yield it.get(image_key), it.get(text_key)
        else:
            yield None, None


# ---- The caption sources

def pmcoa_records(conv: Converter, pmcoa_dir: Path) -> List[Dict[str, Any]]:
    path = _need(pmcoa_dir / "train.jsonl", "PMC-OA index")
    items = read_jsonl(path, conv.skipped.setdefault("PMC-OA", Counter()))
    pairs = _pairs("PMC-OA", path, items, "image", "caption")
    return conv.records("PMC-OA", pairs, pmcoa_dir / PMCOA_IMAGES, len(items), origin=path)


def convert_pmcoa(data_dir, save_dir, conv: Converter) -> Dict[str, int]:
    recs = pmcoa_records(conv, Path(data_dir) / "pmc_oa")
    write_records(Path(save_dir) / "pmcoa_train.json", recs)
    return {"pmcoa_train.json": len(recs)}


def convert_vqarad(data_dir, save_dir, conv: Converter) -> Dict[str, int]:
    root = Path(data_dir) / "VQA_RAD"
    images = root / "VQA_RAD Image Folder"
    out = {}
    for split in ("train", "test"):
        path = root / f"{split}_text.json"
        if not path.exists():
            conv.warn(f"VQA-RAD {split}: {path} not found; vqarad_{split}.json not written")
            continue
        items = read_json_list(path)
        pairs = _pairs(f"VQA-RAD {split}", path, items, "image_name", "text")
        recs = conv.records(f"VQA-RAD {split}", pairs, images, len(items), origin=path)
        write_records(Path(save_dir) / f"vqarad_{split}.json", recs)
        out[f"vqarad_{split}.json"] = len(recs)
    if not out:
        raise MissingInput(f"VQA-RAD: neither train_text.json nor test_text.json found in {root}")
    return out


def _optional(conv: Converter, name: str, fn) -> Optional[List[Dict[str, Any]]]:
    """``fn()``'s records, or None (reported) when its inputs are missing."""
    try:
        return fn()
    except MissingInput as e:
        conv.warn(f"{name} left out: {e}")
        return None


def _pmcvqa(conv: Converter, root: Path) -> List[Dict[str, Any]]:
    path = _need(root / "train_text.json", "PMC-VQA-text index")
    items = read_json_list(path)
    pairs = _pairs("PMC-VQA-text", path, items, "Figure_path", "text")
    return conv.records("PMC-VQA-text", pairs, root / "images", len(items), origin=path)


def _rocov2(conv: Converter, root: Path) -> List[Dict[str, Any]]:
    path = _need(root / "train_captions.csv", "ROCOv2 captions")
    rows = read_csv(path, ["ID", "Caption"])
    pairs = ((f"{r['ID']}.jpg", r["Caption"]) for r in rows)
    return conv.records("ROCOv2", pairs, root / "train", len(rows), origin=path)


def _med60k(conv: Converter, root: Path) -> List[Dict[str, Any]]:
    path = _need(root / "train_text_med60k.json", "LLaVA-Med-60K-IM-text index")
    items = read_json_list(path)
    pairs = _pairs("LLaVA-Med-60K-IM-text", path, items, "image", "text")
    return conv.records("LLaVA-Med-60K-IM-text", pairs, root / "images_med60k" / "images", len(items), origin=path)


def _pubmedvision(conv: Converter, root: Path) -> List[Dict[str, Any]]:
    path = _need(root / "PubMedVision_Alignment_VQA.json", "PubMedVision index")
    items = read_json_list(path)
    require_fields("PubMedVision", path, items, ("image", "conversations"))
    image_dir = _need(root / "images_vision", "PubMedVision image folder")
    by_name: Dict[str, Any] = {}
    for it in items:
        try:
            text = it["conversations"][-1]["value"]
            names = it["image"]
        except (KeyError, IndexError, TypeError):
            continue
        for im in names if isinstance(names, list) else [names]:
            if isinstance(im, str):
                by_name[os.path.basename(im)] = text
    # Only the files present (the reference filtered diagrams out of the folder beforehand).
    present = sorted(f for f in os.listdir(image_dir) if f in by_name)
    return conv.records("PubMedVision", ((f, by_name[f]) for f in present), image_dir, len(present), origin=path)


def _medicat(conv: Converter, root: Path) -> List[Dict[str, Any]]:
    path = _need(root / "release" / MEDICAT_JSONL, "MedICaT index")
    items = read_jsonl(path, conv.skipped.setdefault("MedICaT", Counter()))
    require_fields("MedICaT", path, items, ("pdf_hash", "fig_uri", "s2_caption"))

    def pairs():
        for it in items:
            name = f"{it.get('pdf_hash')}_{it.get('fig_uri')}"
            if name == MEDICAT_BROKEN:
                conv.skipped.setdefault("MedICaT", Counter())["known-broken file"] += 1
                continue
            text = it.get("s2_caption")
            refs = it.get("s2orc_references")
            if isinstance(text, str) and refs:
                text = text + " " + " ".join(str(r) for r in refs)
            yield name, text

    return conv.records("MedICaT", pairs(), root / "release" / "figures", len(items), origin=path)


def _patients(conv: Converter, root: Path) -> List[Dict[str, Any]]:
    table = _need(root / "PMC-Patients.csv", "PMC-Patients table")
    rows = read_csv(table, ["file_path", "patient"])
    image_dir = _need(root / "images_patients" / "images", "PMC-Patients image folder")
    summaries: Dict[str, List[str]] = {}
    for r in rows:
        pmc_id = Path(str(r["file_path"])).name.split(".")[0]  # .../PMC1234567.xml -> PMC1234567
        summaries.setdefault(pmc_id, []).append(r["patient"])
    pairs = []
    no_summary = 0
    for f in sorted(os.listdir(image_dir)):
        if not f.endswith(".jpg"):
            continue
        texts = summaries.get(f.split("_")[0])
        if not texts:
            no_summary += 1
            continue
        pairs.extend((f, t) for t in texts)  # one sample per image and per case of its article
    recs = conv.records("PMC-Patients", pairs, image_dir, len(pairs), origin=table)
    if no_summary:
        conv.skipped.setdefault("PMC-Patients", Counter())["image without case summary"] += no_summary
        print(f"PMC-Patients: {no_summary} images have no case summary in the table; skipped", file=sys.stderr)
    return recs


def convert_textplus(data_dir, save_dir, conv: Converter) -> Dict[str, int]:
    data_dir, save_dir = Path(data_dir), Path(save_dir)
    root = data_dir / "PMC-VQA-text"
    if not root.is_dir():
        raise MissingInput(f"textplus: folder not found: {root} (PMC-VQA-text and the other sources live there)")
    records: List[Dict[str, Any]] = []
    found = 0
    for name, fn in (
        ("PMC-VQA-text", _pmcvqa),
        ("ROCOv2", _rocov2),
        ("LLaVA-Med-60K-IM-text", _med60k),
        ("PubMedVision", _pubmedvision),
    ):
        got = _optional(conv, name, lambda: fn(conv, root))
        found += got is not None
        records.extend(got or [])
    if not found:
        raise MissingInput(f"textplus: none of PMC-VQA-text, ROCOv2, LLaVA-Med-60K-IM-text, PubMedVision found in {root}")
    out = {"textplus_train.json": len(records)}
    write_records(save_dir / "textplus_train.json", records)

    if (root / "release" / MEDICAT_JSONL).exists():
        records.extend(_optional(conv, "MedICaT", lambda: _medicat(conv, root)) or [])
    else:
        print("MedICaT not present; skipped (optional)", file=sys.stderr)

    pmcoa = _optional(conv, "PMC-OA", lambda: pmcoa_records(conv, data_dir / "pmc_oa"))
    if not pmcoa:
        conv.warn("textplus_pmcoa_train.json and textplus_pmcoa_patients_train.json not written: PMC-OA missing or empty")
        return out
    records.extend(pmcoa)
    write_records(save_dir / "textplus_pmcoa_train.json", records)
    out["textplus_pmcoa_train.json"] = len(records)

    patients = _optional(conv, "PMC-Patients", lambda: _patients(conv, root))
    if not patients:
        conv.warn("textplus_pmcoa_patients_train.json not written: PMC-Patients missing or empty")
        return out
    records.extend(patients)
    write_records(save_dir / "textplus_pmcoa_patients_train.json", records)
    out["textplus_pmcoa_patients_train.json"] = len(records)
    return out


# ---- The command

CONVERTERS = {"pmcoa": convert_pmcoa, "vqarad": convert_vqarad, "textplus": convert_textplus,
              "slake": convert_slake, "pathvqa": convert_pathvqa}


def convert_main(argv: Optional[Sequence[str]] = None) -> int:
    """``tools/convert_to_sharegpt.py``; exit 0 on success, 1 when required inputs are missing."""
    import argparse

    from medcap._cmdline import accept_snake_case

    p = argparse.ArgumentParser(
        prog="tools/convert_to_sharegpt.py",
        description="Convert public medical datasets to medcap's sharegpt JSON. "
        "The input layouts and the fields read from each source: datasets/README.md.",
    )
    p.add_argument("--dataset", choices=sorted(CONVERTERS), default="textplus")
    p.add_argument("--data-dir", default="./datasets", help="where the public data sets are (default ./datasets)")
    p.add_argument("--save-dir", default="./datasets/medcap", help="where the JSON files go (default ./datasets/medcap)")
    p.add_argument("--instruction", choices=INSTRUCTION_CHOICES, default="none",
                   help="text after the placeholders: none (reference default), a random or the fixed caption request")
    p.add_argument("--seed", type=int, default=0, help="seed of --instruction random")
    p.add_argument("--q-lang", choices=("en", "zh", "all"), default="en", help="--dataset slake: the questions' language")
    p.add_argument("--no-progress", action="store_true")
    args = accept_snake_case(p).parse_args(argv)
    conv = Converter(args.instruction, seed=args.seed, progress=not args.no_progress)
    try:
        extra = {"q_lang": args.q_lang} if args.dataset == "slake" else {}
        written = CONVERTERS[args.dataset](args.data_dir, args.save_dir, conv, **extra)
    except (MissingInput, ValueError) as e:
        print(f"convert_to_sharegpt: error: {e}", file=sys.stderr)
        return 1
    report = {
        "dataset": args.dataset,
        "written": written,
        "skipped": {k: dict(v) for k, v in conv.skipped.items() if v},
        "warnings": conv.warnings,
    }
    print(json.dumps(report, ensure_ascii=False))
    return 0
