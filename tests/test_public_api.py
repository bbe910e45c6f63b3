"""README's "Python API" blocks, run as written on a tiny model: the three lines of
``medcap.load`` (only the file names replaced) and the long block (only its settings, the
UPPER_CASE lines, replaced), so the documented names and calls cannot rot."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def api_blocks() -> list:
    section = README.read_text(encoding="utf-8").split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2  # the three lines, then the parts themselves
    return blocks


def api_block() -> str:
    return api_blocks()[1]


def with_files(block: str, files: dict) -> str:
    for literal, path in files.items():
        assert block.count(f'"{literal}"') == 1, f"README's three lines do not name {literal!r} once"
        block = block.replace(f'"{literal}"', repr(path))
    return block


def with_settings(block: str, settings: dict) -> str:
    for name, value in settings.items():
        block, n = re.subn(rf"^{name} = .*$", lambda _: f"{name} = {value!r}", block, count=1, flags=re.M)
        assert n == 1, f"README's block has no {name} setting"
    return block


@pytest.mark.slow
@pytest.mark.integration
def test_the_readme_python_api_runs_on_a_tiny_model(tmp_path):
    import torch

    from medcap.models import medcap_tiny, save_vision_checkpoint
    from medcap.testing import make_tiny_training_assets, make_vqarad_layout

    assets = make_tiny_training_assets(tmp_path / "assets", samples=1)
    torch.manual_seed(0)
    ckpt = tmp_path / "ckpt" / "meta_model_last.pt"
    ckpt.parent.mkdir()
    save_vision_checkpoint(medcap_tiny(**assets["model_kwargs"], num_image_tokens=4), ckpt)
    layout = make_vqarad_layout(tmp_path / "datasets", n_images=1, image_size=36)
    results = tmp_path / "results"
    settings = {
        "CONFIG": "tiny/generate", "OVERRIDES": [f"assets_dir={assets['assets_dir']}"], "VISION_CKPT": str(ckpt),
        "IMAGE": str(Path(assets["train_json"]).parent / "images" / "img_0000.png"), "DEVICE": "cpu",
        "DATASETS": str(tmp_path / "datasets"), "RESULTS": str(results),
    }  # fmt: skip
    scope: dict = {}
    exec(compile(with_settings(api_block(), settings), "README.md (Python API)", "exec"), scope)

    assert isinstance(scope["caption"], str) and isinstance(scope["answer"], str)
    assert not any(p.requires_grad for p in scope["model"].parameters())
    with open(results / "vqarad-no_cond_desc-raw-meta_model_last.csv", encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == [name for name, _, _ in layout["expected"]]  # one row per closed question


@pytest.mark.slow
@pytest.mark.integration
def test_the_readme_three_lines_run_on_a_tiny_model(tmp_path):
    """The three lines, on a checkpoint that records its model, a real DICOM and two PNGs; the texts
    are the engine's own for the same prompts (greedy)."""
    import pydicom.data

    from medcap.data import image_transform, load_image
    from medcap.testing import make_described_checkpoint, make_image, make_tiny_llm

    llm = make_tiny_llm(tmp_path / "llm")
    made = make_described_checkpoint(tmp_path / "run" / "meta_model_last.safetensors", llm, seed=2)
    dicom = pydicom.data.get_testdata_file("CT_small.dcm")
    pngs = [str(make_image(tmp_path / f"case{i}.png", size=36 + i, seed=i)) for i in (1, 2)]
    block = with_files(api_blocks()[0], {"results/run1/checkpoint/meta_model_last.safetensors": made["path"],
                                         "scan.dcm": dicom, "case1.png": pngs[0], "case2.png": pngs[1]})
    assert len([line for line in block.splitlines() if line.strip() and not line.startswith("import")]) == 3
    scope: dict = {}
    exec(compile(block, "README.md (three lines)", "exec"), scope)

    engine = scope["model"].engine
    transform = image_transform(engine.model.vision.visual.image_size)
    budget = 300  # checkpoint/generate's max_new_tokens, cut by the tiny model's context of 512

    def expected(question, path):
        prompt = engine.prompt(question)
        return engine.generate_texts([prompt], [transform(load_image(path))], [min(budget, 512 - len(prompt))], ["x"])[0]

    assert scope["caption"] == expected(None, dicom)
    assert scope["answers"] == [expected("Is there a fracture?", p) for p in pngs]
