"""The exported folder's model card (``README.md``): what the model is, how it was trained
(from the checkpoint's metadata), its scores (``medcap report`` over ``--results``), how to
use it, its intended use and limits, and the base LLM's licence.

    scores_table   the ``medcap report`` table of a results folder, as Markdown lines
    base_licence   the licence the base LLM's folder states (its card's ``license:``, its LICENSE file)
    model_card     the whole card, with the Hub's front matter
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

LICENCE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "USE_POLICY.md")


# ---- What goes in


def scores_table(results: Optional[Sequence[str]]) -> List[str]:
    """``medcap report``'s table over the results folders (each cell recomputed from the rows)."""
    if not results:
        return ["No results were given (`medcap export ... --results RESULTS_DIR` puts `medcap report`'s table here)."]
    from medcap.eval._report import HEADER, collect, table_lines

    rows, columns, scores = collect(list(results))
    if not rows:
        return [f"`medcap report` found no scored results in {', '.join(map(str, results))}."]
    return [f"From `medcap report {' '.join(map(str, results))}` ({HEADER}); rows are checkpoints:", "",
            *table_lines(rows, columns, scores, markdown=True)]


def base_licence(llm_dir: Optional[str]) -> Tuple[str, List[Path]]:
    """(the licence's name as the base LLM's card states it, the licence files in its folder)."""
    if not llm_dir or not Path(llm_dir).is_dir():
        return "unknown", []
    folder = Path(llm_dir)
    files = [folder / n for n in LICENCE_FILES if (folder / n).is_file()]
    name = "unknown"
    card = folder / "README.md"
    if card.is_file():
        m = re.search(r"^license:\s*(\S+)", card.read_text(encoding="utf-8", errors="replace"), flags=re.M)
        if m:
            name = m.group(1).strip("'\"")
    if name == "unknown" and files:
        first = files[0].read_text(encoding="utf-8", errors="replace").strip().splitlines()
        name = first[0].strip() if first else "unknown"
    return name, files


# ---- The card


def _training_lines(meta: Dict[str, Any]) -> List[str]:
    t = meta.get("training") or {}
    data = t.get("dataset") or {}
    opt = t.get("optimizer") or {}
    rows = [
        ("recipe", t.get("recipe") or meta.get("recipe")),
        ("training data", data.get("source") or data.get("data_files")),
        ("optimizer steps", meta.get("global_step")),
        ("epochs completed", meta.get("epoch")),
        ("batch", f"{t.get('batch_size')} x {t.get('processes', 1)} process(es) x "
                  f"{t.get('gradient_accumulation_steps', 1)} accumulation" if t.get("batch_size") else None),
        ("optimizer", f"{opt.get('_component_')} (lr {opt.get('lr')})" if opt else None),
        ("vision tower start", t.get("vision_start")),
        ("seed", t.get("seed")),
        ("dtype", meta.get("dtype")),
        ("written by", f"{meta.get('created_by')} at {meta.get('created_at')}"),
    ]
    kept = [(k, v) for k, v in rows if v not in (None, "", "None")]
    if not kept:
        return ["The checkpoint records nothing about its training (a reference .pt)."]
    return ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in kept]]


def model_card(meta: Dict[str, Any], *, name: str, base_llm: str, llm_included: bool, results: Optional[Sequence[str]],
               licence: str, folder: str) -> str:
    """The README.md of the exported folder (``folder``: how the code samples name it)."""
    model = meta.get("model") or {}
    t, n = meta.get("image_transform") or {}, meta.get("num_image_tokens")
    llm_note = "its weights are in this folder" if llm_included else f"its weights are not in this folder: they are " \
        f"loaded from `{base_llm}`"
    tower = meta.get("vision_tower") or {}
    sizes = ", ".join(f"{k} {v}" for k, v in (tower.get("timm_kwargs") or {}).items())
    tower_text = "an image tower"
    if tower:
        tower_text = f"a ViT (timm `{tower.get('timm_model')}`{': ' + sizes if sizes else ''})"
    lines = [
        "---", "license: other", f"license_name: {licence}", f"base_model: {base_llm}", "library_name: transformers",
        "pipeline_tag: image-text-to-text", "tags: [medcap, medical, vision-language, custom_code]", "---", "",
        f"# {name}", "",
        "## What it is", "",
        f"A frozen LLM (`{base_llm}`; {llm_note}) that reads medical images through a trained vision side: "
        f"{tower_text} and a projector turn each {t.get('size')} x {t.get('size')} image into {n} soft tokens, "
        f"which take the places of {n} image placeholders in the prompt. Only the vision side was trained, with "
        f"medcap's recipes; the LLM's weights are unchanged. medcap's model builder: `{model.get('_component_')}`.",
        "",
        "## How it was trained", "", *_training_lines(meta), "",
        "## Scores", "", *scores_table(results), "",
        "## Use it", "",
        "With `transformers` alone (`pip install torch transformers safetensors pillow timm`):", "",
        "```python", "from PIL import Image", "from transformers import AutoModelForCausalLM, AutoProcessor", "",
        'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER", trust_remote_code=True)',
        'processor = AutoProcessor.from_pretrained("THIS_FOLDER", trust_remote_code=True)',
        'inputs = processor(images=Image.open("scan.png"), text="Is there a fracture?", return_tensors="pt")',
        "out = model.generate(**inputs)  # greedy; leave text out for a caption",
        'print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))', "```", "",
        "With medcap (`medcap caption scan.dcm --checkpoint THIS_FOLDER`, or `medcap.load(\"THIS_FOLDER\")` in "
        "Python), DICOM files are read too; the processor here takes PIL images.", "",
        "## Intended use and limits", "",
        "For research on medical image captioning and visual question answering. **Not for diagnosis or any "
        "clinical decision**: the outputs are unverified text from a language model, may be wrong or invented, and "
        "have not been evaluated for clinical safety. Scores above are from the named benchmarks only; performance "
        "on other images, modalities, languages or populations is unknown.", "",
        "## Licence", "",
        f"The vision side is released with medcap; the LLM remains under its own licence: **{licence}** (see the "
        "base model's terms; licence files found in its folder are copied here). Using this model means accepting "
        "the base LLM's licence and use policy.", "",
        "## Upload", "",
        "```bash", "hf upload YOUR_ORG/YOUR_MODEL THIS_FOLDER .   # huggingface_hub >= 1.0", "# older: huggingface-cli "
        "upload YOUR_ORG/YOUR_MODEL THIS_FOLDER .", "```", "",
    ]
    return "\n".join(lines).replace("THIS_FOLDER", folder)
