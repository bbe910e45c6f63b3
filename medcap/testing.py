"""Locally made stand-ins for the real assets, for the tests and the benchmarks; no
production module imports this one (tests/test_architecture.py checks).

Everything is made on the spot, offline, in the real file formats: a tiktoken
``tokenizer.model`` with remapped special tokens, an HF folder of a
Llama-3.1-architecture model (``config.json`` + safetensors), a vision checkpoint that
describes its model as training's do (``make_described_checkpoint``), synthetic images,
sharegpt JSON in the reference's layout, and VQA-RAD / OmniMedVQA folder layouts
with the real sets' quirks, and small copies of the field's benchmarks' download
layouts (SLAKE, PathVQA / VQA-RAD parquet, PMC-VQA). It is also the command that makes the assets the tiny
configs (``recipes/configs/tiny/*.yaml``) run on, in seconds on a CPU:

    python -m medcap.testing /tmp/medcap-tiny [--samples 8] [--bad 0]

writes ``llm/`` (tokenizer and seeded tiny model) and ``data/train.json`` (``--bad N``
appends N broken records), for ``--config tiny/... assets_dir=/tmp/medcap-tiny``.

``make_omnimedvqa_layout`` reproduces the data set's quirks (its own modality spellings,
``modality`` instead of ``modality_type``, two- or three-option questions, missing images).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from PIL import Image

from medcap.data import PLACEHOLDER_CHAR
from medcap.models._model import hf_llama3_1_config
from medcap.models._tokenizer import model_vocab_size, write_tiktoken_tokenizer

# The sizes recipes/configs/tiny/*.yaml assume (medcap_tiny's defaults).
TINY_VOCAB_SIZE = 268  # 256 byte tokens + 12 special tokens; <|image|> = 268, outside the vocabulary
_WORDS = ["lesion", "mass", "nodule", "effusion", "fracture", "opacity", "normal", "edema", "cyst", "tumor"]

def make_tiny_llm(
    out_dir: str | Path,
    *,
    merges: Optional[List[bytes]] = None,
    seed: int = 0,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    embed_dim: int = 64,
    intermediate_dim: int = 128,
    max_seq_len: int = 512,
) -> Dict[str, Any]:
    """Write a tokenizer and an HF-format tiny Llama (random weights, fixed seed).

    Returns ``tokenizer_path``, ``special_tokens_path``, ``checkpoint_dir``,
    ``checkpoint_files``, ``image_token_id`` and ``model_kwargs`` (for
    :func:`medcap.models.medcap_tiny`: the decoder sizes and vocabulary).
    """
    import torch
    from transformers import LlamaForCausalLM

    out = Path(out_dir)
    tok = write_tiktoken_tokenizer(out / "original", merges or [])
    base = sum(1 for _ in open(tok["path"]))
    vocab = model_vocab_size(base)
    sizes = dict(
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        embed_dim=embed_dim,
        intermediate_dim=intermediate_dim,
        max_seq_len=max_seq_len,
    )
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(hf_llama3_1_config(vocab, **sizes))
    hf.save_pretrained(out, safe_serialization=True)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    return {
        "tokenizer_path": str(tok["path"]),
        "special_tokens_path": str(tok["special_tokens_path"]),
        "checkpoint_dir": str(out),
        "checkpoint_files": files,
        "image_token_id": vocab,
        "model_kwargs": dict(vocab_size=vocab, image_token_id=vocab, **sizes),
    }


def make_image(path: str | Path, size: int = 40, seed: int = 0, mode: str = "RGB") -> Path:
    """A random-but-fixed synthetic image (no patient data), saved by Pillow."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB").convert(mode)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def make_caption_dataset(
    out_dir: str | Path,
    n: int = 8,
    *,
    image_size: int = 40,
    num_placeholders: int = 50,
    seed: int = 0,
    name: str = "train.json",
) -> Path:
    """A sharegpt JSON file in the reference's layout (``①`` x ``num_placeholders``,
    ``meta: dir=...``) over ``n`` synthetic images with short captions."""
    out = Path(out_dir)
    img_dir = out / "images"
    words = ["lesion", "mass", "opacity", "nodule", "left", "right", "upper", "lower", "small", "large"]
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        rel = f"img_{i:04d}.png"
        make_image(img_dir / rel, image_size, seed=seed * 1000 + i)
        caption = " ".join(rng.choice(words, size=int(rng.integers(3, 9))))
        records.append(
            {
                "conversations": [
                    {"from": "human", "value": PLACEHOLDER_CHAR * num_placeholders},
                    {"from": "gpt", "value": f"A {caption}."},
                ],
                "image": rel,
                "meta": f"dir={img_dir}",
            }
        )
    path = out / name
    path.write_text(json.dumps(records, indent=1))
    return path


# ---- the tiny configs' assets


def add_bad_records(train_json: Path, n_bad: int) -> None:
    """Append ``n_bad`` records that cannot become samples (alternating: image file
    missing, image file not an image)."""
    records = json.loads(train_json.read_text())
    img_dir = train_json.parent / "images"
    for k in range(n_bad):
        if k % 2 == 0:
            rel = f"missing_{k:03d}.png"
        else:
            rel = f"corrupt_{k:03d}.png"
            (img_dir / rel).write_bytes(b"this is not a PNG file")
        records.append(
            {
                "conversations": [
                    {"from": "human", "value": PLACEHOLDER_CHAR * 50},
                    {"from": "gpt", "value": "A broken record."},
                ],
                "image": rel,
                "meta": f"dir={img_dir}",
            }
        )
    train_json.write_text(json.dumps(records, indent=1))


def make_tiny_training_assets(
    out_dir: str | Path, *, samples: int = 8, bad: int = 0, seed: int = 0, name: str = "train.json"
) -> Dict[str, Any]:
    """Write the tiny LLM, tokenizer and a sharegpt dataset; returns their paths and
    ``overrides`` (``key=value`` strings naming them for a tiny config)."""
    out = Path(out_dir)
    llm = make_tiny_llm(out / "llm", seed=seed)
    if llm["model_kwargs"]["vocab_size"] != TINY_VOCAB_SIZE:  # the configs hard-code it
        raise RuntimeError(f"tiny vocabulary is {llm['model_kwargs']['vocab_size']}, configs expect {TINY_VOCAB_SIZE}")
    train_json = make_caption_dataset(out / "data", samples, seed=seed, name=name)
    if bad:
        add_bad_records(train_json, bad)
    return {
        "assets_dir": str(out),
        "tokenizer_path": llm["tokenizer_path"],
        "special_tokens_path": llm["special_tokens_path"],
        "checkpoint_dir": llm["checkpoint_dir"],
        "checkpoint_files": llm["checkpoint_files"],
        "train_json": str(train_json),
        "model_kwargs": llm["model_kwargs"],
        "overrides": [f"assets_dir={out}"],
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m medcap.testing", description="Make the assets the tiny configs run on.")
    p.add_argument("out_dir")
    p.add_argument("--samples", type=int, default=8, help="good samples (default 8)")
    p.add_argument("--bad", type=int, default=0, help="broken records to append (default 0)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    info = make_tiny_training_assets(args.out_dir, samples=args.samples, bad=args.bad, seed=args.seed)
    print(f"tiny assets in {info['assets_dir']}; pass: {' '.join(info['overrides'])}")
    return 0


def make_described_checkpoint(path: str | Path, llm: Dict[str, Any], *, seed: int = 0, num_image_tokens: int = 4,
                              tune: Optional[Any] = None) -> Dict[str, Any]:
    """A ``.safetensors`` vision checkpoint of a tiny model on ``llm`` (what :func:`make_tiny_llm`
    returns) that records its model as the training recipe's checkpoints do; ``tune(model)``
    may change the weights first. Returns ``path`` and the config ``sections`` it records."""
    import torch

    from medcap.models import load_llama_weights, medcap_tiny, save_vision_checkpoint
    from medcap.training import describe_model

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model_cfg = {"_component_": "medcap.models.medcap_tiny", **llm["model_kwargs"],
                 "num_image_tokens": num_image_tokens}
    torch.manual_seed(seed)
    model = medcap_tiny(**{k: v for k, v in model_cfg.items() if k != "_component_"})
    load_llama_weights(model, llm["checkpoint_dir"], llm["checkpoint_files"])
    if tune is not None:
        tune(model)
    checkpointer = {"checkpoint_dir": llm["checkpoint_dir"], "checkpoint_files": llm["checkpoint_files"],
                    "model_type": "LLAMA3"}
    tokenizer = {"_component_": "medcap.models.llama3_tokenizer", "path": llm["tokenizer_path"],
                 "special_tokens_path": llm["special_tokens_path"], "max_seq_len": None}
    training = {"recipe": "full_finetune_single_device", "dataset": {"source": "train.json"}, "epochs": 1,
                "batch_size": 2, "seed": seed}
    desc = describe_model(model, model_cfg=model_cfg, checkpointer=checkpointer, tokenizer=tokenizer, dtype="fp32",
                          checkpoint_dir=path.parent, training=training)
    save_vision_checkpoint(model, path, metadata={**desc, "recipe": "full_finetune_single_device", "global_step": 7})
    return {"path": str(path), "model": model,
            "sections": {"model": model_cfg, "checkpointer": checkpointer, "tokenizer": tokenizer}}


# ---- evaluation set layouts


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
    # imported here: medcap.eval loads torch, which the tiny-assets command does not need
    from medcap.eval import OMNIMEDVQA_MODALITIES

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
        odd = _other_spellings(base, image_size, seed, n)
        files["Dataset-B.json"] += odd
        counts["excluded"] += len(odd)
    for name, recs in files.items():
        (qa_dir / name).write_text(json.dumps(recs, indent=1))
    return {"root": str(root), **counts}


def _other_spellings(base: Path, image_size: int, seed: int, n: int) -> List[Dict[str, Any]]:
    """Questions ``n + 1, ...`` whose modality is spelled otherwise than the 8 kept ones (left out)."""
    records = []
    for j, odd in enumerate(("MR (Magnetic Resonance Imaging)", "OCT (Optical Coherence Tomography)", "Ultrasound")):
        n += 1
        rel = f"Images/odd/img_{j}.png"
        make_image(base / rel, image_size, seed=seed * 1000 + n)
        records.append({"question_id": f"q{n:04d}", "dataset": "Dataset-B", "question_type": "x", "question": "Which one?",
                        "gt_answer": "a", "image_path": rel, "option_A": "a", "option_B": "b", "modality_type": odd})
    return records


# ---- the field's benchmark layouts
# SLAKE, PathVQA / VQA-RAD parquet, PMC-VQA, a questions file: each builder returns what
# a reader must find, so tests check against it.


def _jpeg_bytes(seed: int, size: int, mode: str) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    img = Image.fromarray(rgb, "RGB").convert(mode)  # CMYK stays CMYK inside the JPEG
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def make_slake_layout(root: str | Path, *, image_size: int = 36) -> Dict[str, Any]:
    """``Slake1.0/test.json`` + ``imgs/``: per image an English closed and open question
    and a Chinese one; plus an empty answer, a malformed record and a missing image."""
    base = Path(root) / "Slake1.0"
    records: List[Dict[str, Any]] = []
    english = []
    for i in range(2):
        name = f"xmlab{i}/source.jpg"
        make_image(base / "imgs" / name, image_size, seed=40 + i)
        rows = [("en", "CLOSED", "Is this a CT image?", "Yes" if i == 0 else "No"),
                ("en", "OPEN", "Which organ is abnormal?", "left lung"),
                ("zh", "CLOSED", "这是CT图像吗?", "是")]
        for lang, kind, q, a in rows:
            qid = len(records)
            records.append({"img_id": i, "img_name": name, "question": q, "answer": a, "q_lang": lang,
                            "answer_type": kind, "modality": "CT", "qid": qid, "location": "Lung"})
            if lang == "en":
                english.append((name, q, a, kind.lower()))
    records.append({"img_name": "xmlab0/source.jpg", "question": "What is empty?", "answer": "", "q_lang": "en",
                    "answer_type": "OPEN", "qid": 100})
    records.append({"question": "no image named", "answer": "yes", "q_lang": "en", "qid": 101})
    records.append({"img_name": "xmlab9/source.jpg", "question": "Is it there?", "answer": "no", "q_lang": "en",
                    "answer_type": "CLOSED", "qid": 102})
    base.mkdir(parents=True, exist_ok=True)
    (base / "test.json").write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return {"root": str(root), "english": english, "chinese": 2, "empty_answers": 1, "malformed": 1, "missing_images": 1}


def make_hf_parquet_layout(root: str | Path, folder: str, *, image_size: int = 36) -> Dict[str, Any]:
    """``{folder}/data/test-0000{0,1}-of-00002.parquet`` (columns image{bytes, path},
    question, answer) with CMYK and RGB JPEGs, rows with and without ``path``; plus a
    row with no image bytes, one with an empty answer and one whose bytes are no image."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = Path(root) / folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    shards = [
        [({"bytes": _jpeg_bytes(1, image_size, "CMYK"), "path": "img_a.jpg"}, "is there a tumor?", "yes"),
         ({"bytes": _jpeg_bytes(2, image_size, "RGB"), "path": None}, "what organ is shown?", "liver"),
         ({"bytes": None, "path": "gone.jpg"}, "is it gone?", "no")],
        [({"bytes": _jpeg_bytes(3, image_size, "CMYK"), "path": None}, "is the image normal?", "no"),
         ({"bytes": _jpeg_bytes(4, image_size, "RGB"), "path": "img_e.jpg"}, "what is empty?", ""),
         ({"bytes": b"not an image at all", "path": "broken.jpg"}, "is it broken?", "yes")],
    ]
    for k, rows in enumerate(shards):
        table = pa.table({"image": [r[0] for r in rows], "question": [r[1] for r in rows], "answer": [r[2] for r in rows]})
        pq.write_table(table, data / f"test-{k:05d}-of-00002.parquet")
    kept = [("img_a.jpg", "is there a tumor?", "yes", "closed"), ("row1.png", "what organ is shown?", "liver", "open"),
            ("row3.png", "is the image normal?", "no", "closed"), ("broken.jpg", "is it broken?", "yes", "closed")]
    return {"root": str(root), "kept": kept, "unreadable": ["broken.jpg"], "missing_images": 1, "empty_answers": 1,
            "cmyk": ["img_a.jpg", "row3.png"]}


def make_pmcvqa_layout(root: str | Path, *, image_size: int = 36, clean: bool = True) -> Dict[str, Any]:
    """``PMC-VQA/test_clean.csv`` (or ``test.csv``) + ``images/``: choices with ``A:`` prefixes
    and without, answers as ``Answer_label`` or as text; plus a malformed row."""
    base = Path(root) / "PMC-VQA"
    for i in range(3):
        make_image(base / "images" / f"PMC{i}_fig.jpg", image_size, seed=60 + i)
    header = ["index", "Figure_path", "Question", "Answer", "Choice A", "Choice B", "Choice C", "Choice D", "Answer_label"]
    rows = [
        ["0", "PMC0_fig.jpg", "Which modality is used?", "CT", "A:MRI", "B:CT", "C:X-ray", "D:PET", "B"],
        ["1", "PMC1_fig.jpg", "Where is the lesion?", "Liver", " A: Kidney", " B: Spleen", " C: Liver", " D: Lung", ""],
        ["2", "PMC2_fig.jpg", "What color is the stain?", "B", "Blue", "Red", "", "", ""],
        ["3", "", "No figure here?", "A", "x", "y", "z", "w", "A"],
    ]
    base.mkdir(parents=True, exist_ok=True)
    with open(base / ("test_clean.csv" if clean else "test.csv"), "w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows([header] + rows)
    expected = [("PMC0_fig.jpg", {"A": "MRI", "B": "CT", "C": "X-ray", "D": "PET"}, "CT"),
                ("PMC1_fig.jpg", {"A": "Kidney", "B": "Spleen", "C": "Liver", "D": "Lung"}, "Liver"),
                ("PMC2_fig.jpg", {"A": "Blue", "B": "Red", "C": "", "D": ""}, "Red")]
    return {"root": str(root), "expected": expected, "malformed": 1}


def make_questions_file(root: str | Path, *, image_size: int = 36) -> Dict[str, Any]:
    """``questions.jsonl`` beside ``pics/``: a closed, an open, a choice question, one with
    no answer, a malformed line."""
    root = Path(root)
    for i in range(2):
        make_image(root / "pics" / f"q{i}.png", image_size, seed=80 + i)
    lines = [
        {"image": "pics/q0.png", "question": "Is there an effusion?", "answer": "no"},
        {"image": "pics/q0.png", "question": "What is the finding?", "answer": "pleural effusion"},
        {"image": "pics/q1.png", "question": "Which side?", "options": ["left", "right"], "answer": "B"},
        {"image": "pics/q1.png", "question": "Describe it."},
    ]
    path = root / "questions.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n", encoding="utf-8")
    return {"path": str(path), "kinds": ["closed", "open", "choice", ""], "malformed": 1}


if __name__ == "__main__":
    sys.exit(main())
