"""Public medical datasets -> the reference's sharegpt files (``tools/convert_to_sharegpt.py``).

Input layouts under ``data_dir`` (section 6 of reference-behavior.md; the fields
read from each source are listed in datasets/README.md)::

    pmc_oa/train.jsonl                                   {"image", "caption"} per line
    pmc_oa/caption_T060_filtered_top4_sep_v0_subfigures/ images
    VQA_RAD/train_text.json, VQA_RAD/test_text.json      [{"image_name", "text"}]
    VQA_RAD/VQA_RAD Image Folder/                        images
    PMC-VQA-text/train_text.json + images/               PMC-VQA-text [{"Figure_path", "text"}]
    PMC-VQA-text/train_captions.csv + train/{ID}.jpg     ROCOv2 (columns ID, Caption)
    PMC-VQA-text/train_text_med60k.json + images_med60k/images/   LLaVA-Med-60K-IM-text [{"image", "text"}]
    PMC-VQA-text/PubMedVision_Alignment_VQA.json + images_vision/ PubMedVision (image list, last turn's value)
    PMC-VQA-text/release/s2_full_figures_oa_nonroco_combined_medical_top4_public.jsonl
                 + release/figures/                      MedICaT (optional)
    PMC-VQA-text/PMC-Patients.csv + images_patients/images/PMC<id>_*.jpg   PMC-Patients

SLAKE (``Slake1.0/train.json``, ``validate.json``) and PathVQA
(``path-vqa/data/train-*.parquet``, ``validation-*``) become question/answer
records: see ``_convert_vqa``.

Outputs in ``save_dir``: ``pmcoa_train.json``; ``vqarad_train.json`` and
``vqarad_test.json``; ``textplus_train.json`` (PMC-VQA-text, ROCOv2,
LLaVA-Med, PubMedVision), ``textplus_pmcoa_train.json`` (+ MedICaT when
present, + PMC-OA) and ``textplus_pmcoa_patients_train.json`` (+ PMC-Patients),
in the reference's order (MedICaT joins after ``textplus_train.json`` is written,
as in the reference).

Each record: a human turn of 50 ``①`` (plus a blank line and a caption
instruction with ``--instruction random|fixed``), a gpt turn with the text
(``①`` rewritten to ``(1)``), ``image`` relative to ``meta``'s ``dir=``, which is
written as an absolute path so the file works from any working directory.
Records whose image file is missing, or whose text is empty, and JSONL lines
that are not valid JSON, are skipped and counted. A missing source of
``textplus`` is reported and left out; a missing input of ``pmcoa``/``vqarad``
(or of every textplus source) is an error, and so is a source whose records all
lack a field it needs (the wrong file, or a changed release): the message names
the field and the fields the records do have.
"""

from __future__ import annotations

import csv
import json
import os
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from medcap.data._records import PLACEHOLDER_CHAR

NUM_PLACEHOLDERS = 50
INSTRUCTION_CHOICES = ("none", "random", "fixed")
# Our own phrasings of a caption request; "fixed" uses the first.
CAPTION_INSTRUCTIONS = (
    "Describe the image in detail.",
    "Write a caption for this medical image.",
    "What does this image show?",
    "Give a concise description of this figure.",
    "Describe the findings in this image.",
    "Summarise what is visible in this image.",
    "Explain the content of this medical image.",
    "Provide a detailed caption for the picture.",
    "What can be seen in this scan?",
    "Report on this image.",
    "Characterise the main structures shown here.",
    "Write a short report describing this image.",
    "What is depicted in this figure?",
    "Give a brief account of the image.",
    "Describe this picture for a clinician.",
    "List the notable features of this image.",
)
MEDICAT_BROKEN = "ffd83b6453f94f2a1ddb346e324f5bdbf228c1f3_4-Figure3-1.png"
PMCOA_IMAGES = "caption_T060_filtered_top4_sep_v0_subfigures"
MEDICAT_JSONL = "s2_full_figures_oa_nonroco_combined_medical_top4_public.jsonl"
_NAMED_BAD_LINES = 5  # invalid JSONL lines named one by one; the rest are only counted


class MissingInput(FileNotFoundError):
    """An input file or folder the conversion needs is not there."""


class MissingField(ValueError):
    """No record of a source has a field the conversion reads from it."""


def require_fields(source: str, path: Path, items: Sequence[Any], fields: Sequence[str]) -> None:
    """Raise ``MissingField`` when some field of ``fields`` is in no record of ``items``:
    then ``path`` is not what ``source`` should be. Some records lacking it is data, not schema."""
    records = [it for it in items if isinstance(it, dict)]
    if not items:
        return
    for field in fields:
        if not any(field in r for r in records):
            seen = sorted({k for r in records[:1000] for k in r})
            raise MissingField(
                f"{source}: no record of {path} has the field {field!r} "
                f"(expected {list(fields)}; the records have {seen if seen else 'no fields: not JSON objects'})"
            )


def clean_text(text: Any) -> Optional[str]:
    """Caption text with the placeholder character rewritten; None when empty or not text."""
    if not isinstance(text, str):
        return None
    text = text.replace(PLACEHOLDER_CHAR, "(1)").strip()
    return text or None


class _Folder:
    """``exists(rel)`` for many files of one folder, listing each directory once."""

    def __init__(self, root: Path):
        self.root = root
        self._listing: Dict[Path, frozenset] = {}

    def exists(self, rel: str) -> bool:
        p = self.root / rel
        d = p.parent
        if d not in self._listing:
            try:
                self._listing[d] = frozenset(os.listdir(d))
            except OSError:
                self._listing[d] = frozenset()
        return p.name in self._listing[d]


class Converter:
    """Turns (image, text) pairs into records; counts what it skips, per source."""

    def __init__(self, instruction: str = "none", seed: int = 0, progress: bool = True):
        if instruction not in INSTRUCTION_CHOICES:
            raise ValueError(f"instruction must be one of {INSTRUCTION_CHOICES}, got {instruction!r}")
        self.instruction = instruction
        self.rng = random.Random(seed)
        self.progress = progress
        self.skipped: Dict[str, Counter] = {}
        self.warnings: List[str] = []

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)
        print(f"WARNING: {msg}", file=sys.stderr)

    def human_value(self) -> str:
        marker = PLACEHOLDER_CHAR * NUM_PLACEHOLDERS
        if self.instruction == "none":
            return marker
        if self.instruction == "fixed":
            return marker + "\n\n" + CAPTION_INSTRUCTIONS[0]
        return marker + "\n\n" + self.rng.choice(CAPTION_INSTRUCTIONS)

    def records(self, source: str, pairs: Iterable[Tuple[Any, Any]], image_dir: Path, total: Optional[int] = None):
        """``pairs`` of (image path relative to ``image_dir``, text) -> records."""
        from tqdm import tqdm

        if not image_dir.is_dir():
            raise MissingInput(f"{source}: image folder not found: {image_dir}")
        skipped = self.skipped.setdefault(source, Counter())
        folder = _Folder(image_dir)
        meta = f"dir={image_dir.resolve()}"
        out = []
        for image, text in tqdm(pairs, desc=source, total=total, unit="rec", disable=not self.progress, file=sys.stderr):
            value = self.human_value()  # drawn for every input row, so choices do not depend on what is skipped
            text = clean_text(text)
            if not isinstance(image, str) or not image:
                skipped["no image name"] += 1
            elif text is None:
                skipped["empty text"] += 1
            elif not folder.exists(image):
                skipped["missing image"] += 1
            else:
                out.append(
                    {
                        "conversations": [{"from": "human", "value": value}, {"from": "gpt", "value": text}],
                        "image": image,
                        "meta": meta,
                    }
                )
        if skipped:
            print(f"{source}: {len(out)} records, skipped " + ", ".join(f"{n} {k}" for k, n in skipped.items()), file=sys.stderr)
        return out


# ---------------------------------------------------------------------------- readers


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise MissingInput(f"{what} not found: {path}")
    return path


def read_json_list(path: Path) -> List[Any]:
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, list):
        raise ValueError(f"{path} must hold a JSON list, got {type(data).__name__}")
    return data


def read_jsonl(path: Path, invalid: Optional[Counter] = None) -> List[Any]:
    """The JSON values of ``path``'s non-blank lines; lines that are not JSON are skipped,
    counted under ``"invalid JSON line"`` in ``invalid`` and the first few named."""
    out = []
    bad = 0
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    bad += 1
                    if bad <= _NAMED_BAD_LINES:
                        print(f"WARNING: {path} line {n}: invalid JSON ({e}); skipped", file=sys.stderr)
    if bad > _NAMED_BAD_LINES:
        print(f"WARNING: {path}: {bad} invalid JSON lines in all; skipped", file=sys.stderr)
    if bad and invalid is not None:
        invalid["invalid JSON line"] += bad
    return out


def read_csv(path: Path, columns: Sequence[str]) -> List[Dict[str, str]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # case reports are long fields
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing columns {missing} (has {reader.fieldnames})")
        return list(reader)


def write_records(path: Path, records: List[Dict[str, Any]]) -> Path:
    """One JSON list, one record per line (readable, grep-able), written atomically."""
    from medcap._io import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("[\n")
            for k, r in enumerate(records):
                f.write(("," if k else "") + json.dumps(r, ensure_ascii=False) + "\n")
            f.write("]\n")

    atomic_write(path, write)
    print(f"wrote {path} ({len(records)} records)", file=sys.stderr)
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


# ---------------------------------------------------------------------------- datasets


def pmcoa_records(conv: Converter, pmcoa_dir: Path) -> List[Dict[str, Any]]:
    path = _need(pmcoa_dir / "train.jsonl", "PMC-OA index")
    items = read_jsonl(path, conv.skipped.setdefault("PMC-OA", Counter()))
    pairs = _pairs("PMC-OA", path, items, "image", "caption")
    return conv.records("PMC-OA", pairs, pmcoa_dir / PMCOA_IMAGES, len(items))


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
        recs = conv.records(f"VQA-RAD {split}", pairs, images, len(items))
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
    return conv.records("PubMedVision", ((f, by_name[f]) for f in present), image_dir, len(present))


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

    return conv.records("MedICaT", pairs(), root / "release" / "figures", len(items))


def _patients(conv: Converter, root: Path) -> List[Dict[str, Any]]:
    rows = read_csv(_need(root / "PMC-Patients.csv", "PMC-Patients table"), ["file_path", "patient"])
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
    recs = conv.records("PMC-Patients", pairs, image_dir, len(pairs))
    if no_summary:
        conv.skipped.setdefault("PMC-Patients", Counter())["image without case summary"] += no_summary
        print(f"PMC-Patients: {no_summary} images have no case summary in the table; skipped", file=sys.stderr)
    return recs


def convert_textplus(data_dir, save_dir, conv: Converter) -> Dict[str, int]:
    data_dir, save_dir = Path(data_dir), Path(save_dir)
    root = data_dir / "PMC-VQA-text"
    if not root.is_dir():
        raise MissingInput(f"textplus: folder not found: {root} (PMC-VQA-text and the other sources live there)")

    def pmcvqa():
        path = _need(root / "train_text.json", "PMC-VQA-text index")
        items = read_json_list(path)
        pairs = _pairs("PMC-VQA-text", path, items, "Figure_path", "text")
        return conv.records("PMC-VQA-text", pairs, root / "images", len(items))

    def rocov2():
        rows = read_csv(_need(root / "train_captions.csv", "ROCOv2 captions"), ["ID", "Caption"])
        pairs = ((f"{r['ID']}.jpg", r["Caption"]) for r in rows)
        return conv.records("ROCOv2", pairs, root / "train", len(rows))

    def med60k():
        path = _need(root / "train_text_med60k.json", "LLaVA-Med-60K-IM-text index")
        items = read_json_list(path)
        pairs = _pairs("LLaVA-Med-60K-IM-text", path, items, "image", "text")
        return conv.records("LLaVA-Med-60K-IM-text", pairs, root / "images_med60k" / "images", len(items))

    records: List[Dict[str, Any]] = []
    found = 0
    for name, fn in (
        ("PMC-VQA-text", pmcvqa),
        ("ROCOv2", rocov2),
        ("LLaVA-Med-60K-IM-text", med60k),
        ("PubMedVision", lambda: _pubmedvision(conv, root)),
    ):
        got = _optional(conv, name, fn)
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


def convert_slake(data_dir, save_dir, conv: Converter, q_lang: str = "en") -> Dict[str, int]:
    """SLAKE's train/validate questions (``_convert_vqa``)."""
    from medcap.data._convert_vqa import convert_slake as convert

    return convert(data_dir, save_dir, conv, q_lang=q_lang)


def convert_pathvqa(data_dir, save_dir, conv: Converter) -> Dict[str, int]:
    """PathVQA's train/validation parquet files (``_convert_vqa``)."""
    from medcap.data._convert_vqa import convert_pathvqa as convert

    return convert(data_dir, save_dir, conv)


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
