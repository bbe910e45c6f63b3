"""README's "Python API" block, run as written on a tiny model: only its settings
(the UPPER_CASE lines) are replaced, so the documented names and calls cannot rot."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def api_block() -> str:
    section = README.read_text(encoding="utf-8").split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1
    return blocks[0]


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
