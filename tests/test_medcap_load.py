"""``medcap.load``: one image or a list (paths, DICOM, PIL images), ``chat`` over turns, the
reference's .pt with a config, errors that say what is wrong, and ``import medcap`` without torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

MAX_NEW = 10


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    import medcap
    from medcap.models import save_vision_checkpoint
    from medcap.testing import make_described_checkpoint, make_image, make_tiny_llm

    root = tmp_path_factory.mktemp("api")
    llm = make_tiny_llm(root / "llm")
    made = make_described_checkpoint(root / "ckpt" / "meta_model_last.safetensors", llm, seed=4)
    pt = root / "ckpt" / "reference.pt"
    save_vision_checkpoint(made["model"], pt)
    images = [str(make_image(root / f"img{i}.png", size=30 + 4 * i, seed=10 + i)) for i in range(3)]
    return {"model": medcap.load(made["path"], device="cpu", max_new_tokens=MAX_NEW), "images": images, "root": root,
            "pt": str(pt), "ckpt": made["path"]}


def _engine_text(model, prompt, path):
    """The engine itself on one prompt and one image (the API's answers must be these)."""
    from medcap.data import image_transform, load_image

    image = image_transform(model.engine.model.vision.visual.image_size)(load_image(path))
    return model.engine.generate_texts([prompt], [image], MAX_NEW, ["ref"])[0]


def test_one_image_gives_a_string_and_a_list_gives_the_same_strings(loaded):
    m, images = loaded["model"], loaded["images"]
    singles = [m.caption(p) for p in images]
    assert all(isinstance(t, str) for t in singles)
    assert m.caption(images) == singles  # batched together: the same greedy texts
    assert singles == [_engine_text(m, m.engine.prompt(None), p) for p in images]
    assert m.ask(images[1], "Is there a fracture?") == _engine_text(m, m.engine.prompt("Is there a fracture?"), images[1])


def test_a_pil_image_and_a_dicom_file_are_taken_like_paths(loaded):
    import pydicom.data
    from PIL import Image

    from medcap.data import load_image

    m = loaded["model"]
    path = loaded["images"][2]
    assert m.caption(Image.open(path).convert("RGBA")) == m.caption(path)  # any mode: made RGB on black
    dicom = pydicom.data.get_testdata_file("CT_small.dcm")
    assert m.caption(dicom) == m.caption(load_image(dicom))


def test_chat_puts_the_image_in_the_first_user_turn(loaded):
    m, image = loaded["model"], loaded["images"][0]
    turns = [{"role": "user", "content": "What is shown?"}, {"role": "assistant", "content": "A scan."},
             {"role": "user", "content": "Where?"}]
    by_hand = [{"role": "user", "content": "<image>\n\nWhat is shown?"}, *turns[1:]]
    assert m.chat(image, turns) == _engine_text(m, m.engine.prompt(by_hand), image)
    assert m.chat(image, by_hand) == m.chat(image, turns)  # an image marker already there is kept
    with pytest.raises(ValueError, match="no user turn"):
        m.chat(image, [{"role": "system", "content": "Be brief."}])


def test_errors_say_what_is_wrong(loaded, tmp_path):
    import medcap

    m = loaded["model"]
    with pytest.raises(ValueError, match="image not found"):
        m.caption(str(tmp_path / "missing.png"))
    with pytest.raises(TypeError, match="file path or a PIL image"):
        m.caption(42)
    with pytest.raises(ValueError, match="--config custom_generation_config"):
        medcap.load(loaded["pt"], device="cpu")


def test_the_reference_pt_loads_with_a_config(loaded):
    import medcap

    ref = medcap.load(loaded["pt"], device="cpu", config="tiny/generate", overrides=[f"assets_dir={loaded['root']}"],
                      max_new_tokens=MAX_NEW)
    assert ref.caption(loaded["images"]) == loaded["model"].caption(loaded["images"])
    assert ref.config.dtype == "fp32" and "medcap_tiny" in repr(ref)


def test_import_medcap_stays_without_torch():
    code = "import sys, medcap; print('torch' in sys.modules, 'load' in dir(medcap), callable(medcap.load))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.stdout.split() == ["False", "True", "True"], res.stderr
