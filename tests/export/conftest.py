"""A trained-model stand-in for the export tests: a tiny LLM in the layout the tiny configs
expect (``assets_dir/llm``), a vision checkpoint that describes its model as the training
recipe's does, images of several kinds, and the folders ``medcap export`` writes from it."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Dict

import numpy as np
import pytest
from PIL import Image

from hf_child import MAX_NEW, QUESTIONS


def _picture(w: int, h: int, seed: int) -> np.ndarray:
    """A smooth picture of its own (colour gradients and a bright disc) with some noise: images
    this different make even a random tower's soft tokens, and so the answers, differ."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.4)
    disc = ((x - cx) ** 2 + (y - cy) ** 2 < r * r) * rng.uniform(80, 200)
    base = [rng.uniform(0, 120) + rng.uniform(-120, 120) * (x if k % 2 else y) for k in range(3)]
    img = np.stack([b + disc for b in base], axis=-1) + rng.normal(0, 8, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _images(folder: Path) -> list:
    """Eight images that take every path of the transform: RGB of several shapes (resize and
    centre crop), one already square at the tower's size, grey, RGBA, palette, 16-bit grey."""
    folder.mkdir(parents=True)
    out = []

    def save(name, img):
        img.save(folder / name)
        out.append(str(folder / name))

    for i, (w, h) in enumerate([(40, 48), (61, 37), (32, 32), (90, 90)]):
        save(f"rgb{i}.png", Image.fromarray(_picture(w, h, i), "RGB"))
    save("grey.png", Image.fromarray(_picture(44, 50, 4)[..., 0], "L"))
    rgba = np.concatenate([_picture(52, 36, 5), np.random.default_rng(5).integers(0, 256, (36, 52, 1), dtype=np.uint8)], -1)
    save("alpha.png", Image.fromarray(rgba, "RGBA"))
    save("palette.png", Image.fromarray(_picture(45, 45, 6), "RGB").convert("P"))
    save("deep.png", Image.fromarray(_picture(40, 40, 7)[..., 1].astype(np.uint16) * 16 + 100))  # I;16, 12-bit data
    return out


def _make_images_matter(model, images) -> None:
    """A random tower gives every image nearly the same features: centre and scale them in the
    projector (as training would learn to), so that the answers differ from image to image and a
    transform that is off by a pixel changes tokens."""
    import torch

    from medcap.data import image_transform, load_image

    transform = image_transform(model.vision.visual.image_size)
    with torch.no_grad():
        feats = model.vision.visual(torch.stack([transform(load_image(p)) for p in images]))  # [n, d]
        first = model.vision.projector[0]
        first.weight.div_(feats.std(0).mean())
        first.bias.copy_(-first.weight @ feats.mean(0))
        model.vision.projector[2].weight.mul_(4.0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Dict[str, Any]:
    """``root`` (= ``assets_dir``), ``ckpt`` (a described .safetensors), ``pt`` (the same weights
    as the reference's .pt), ``images``, ``sections`` (what the description was made from)."""
    from medcap.models import save_vision_checkpoint
    from medcap.testing import make_described_checkpoint, make_tiny_llm

    root = tmp_path_factory.mktemp("trained")
    llm = make_tiny_llm(root / "llm")
    images = _images(root / "images")
    made = make_described_checkpoint(root / "run" / "checkpoint" / "meta_model_last.safetensors", llm, seed=3,
                                     tune=lambda model: _make_images_matter(model, images))
    model, ckpt = made["model"], made["path"]
    pt = root / "reference" / "meta_model_4.pt"
    pt.parent.mkdir()
    save_vision_checkpoint(model, pt)
    return {"root": root, "ckpt": ckpt, "pt": str(pt), "images": images, "llm": llm, "sections": made["sections"]}


@pytest.fixture(scope="module")
def exported(trained) -> Dict[str, str]:
    """The folder pointing at the base LLM, and the self-contained one (``--include-llm``)."""
    from medcap.export import export_model

    out = {}
    for name, include in (("pointer", False), ("with_llm", True)):
        out[name] = str(export_model(trained["ckpt"], str(trained["root"] / f"export_{name}"), include_llm=include,
                                     max_new_tokens=MAX_NEW))
    return out


@pytest.fixture(scope="module")
def reference(trained) -> Dict[str, Any]:
    """medcap's own greedy tokens and texts for every (image, prompt) pair, and its prompts."""
    import medcap
    from medcap.data import image_transform, load_image

    m = medcap.load(trained["ckpt"], device="cpu", max_new_tokens=MAX_NEW)
    transform = image_transform(m.engine.model.vision.visual.image_size)
    jobs = [(img, q) for q in QUESTIONS for img in trained["images"]]
    prompts = [m.engine.prompt(q) for _, q in jobs]
    tokens = m.engine.generate_tokens(prompts, [transform(load_image(i)) for i, _ in jobs], [MAX_NEW] * len(jobs),
                                      [str(k) for k in range(len(jobs))])
    texts = m.caption(trained["images"])
    pixels = {i: hashlib.sha256(transform(load_image(i))[None].contiguous().numpy().tobytes()).hexdigest()
              for i in trained["images"]}
    return {"pixels": pixels, "jobs": jobs, "prompts": prompts, "tokens": tokens, "captions": texts, "model": m,
            "stops": set(m.engine.tokenizer.stop_tokens)}
