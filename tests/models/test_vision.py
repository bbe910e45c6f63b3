"""The image tower: loading BiomedCLIP's open_clip weights file (its key names)."""

from __future__ import annotations

import pytest
import torch

from medcap.models._model import load_open_clip_visual, tiny_tower


def _images(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(3))


def _open_clip_file(path, tower, wrap: bool = False):
    """An ``open_clip_pytorch_model.bin`` as open_clip saves CLIP models: the image tower
    under ``visual.*`` beside a text tower and the logit scale."""
    state = {f"visual.{k}": v.clone() for k, v in tower.state_dict().items()}
    g = torch.Generator().manual_seed(5)
    state["text.transformer.embeddings.word_embeddings.weight"] = torch.randn(30, 8, generator=g)
    state["text.proj.0.weight"] = torch.randn(8, 8, generator=g)
    state["logit_scale"] = torch.tensor(4.6)
    torch.save({"state_dict": state} if wrap else state, path)
    return path


@pytest.mark.parametrize("wrap", [False, True], ids=["flat", "state_dict"])
@pytest.mark.parametrize("as_dir", [False, True], ids=["file", "folder"])
def test_open_clip_checkpoint_loads_into_the_tower(tmp_path, wrap, as_dir):
    torch.manual_seed(0)
    source = tiny_tower().eval()
    path = _open_clip_file(tmp_path / "open_clip_pytorch_model.bin", source, wrap=wrap)
    torch.manual_seed(1)
    target = tiny_tower().eval()
    images = _images()
    with torch.no_grad():
        assert not torch.allclose(target(images), source(images))
        load_open_clip_visual(target, str(tmp_path if as_dir else path))
        torch.testing.assert_close(target(images), source(images), rtol=0, atol=0)


def test_open_clip_checkpoint_errors(tmp_path):
    no_visual = tmp_path / "text_only.bin"
    torch.save({"text.proj.weight": torch.zeros(2, 2)}, no_visual)
    with pytest.raises(ValueError, match="no 'visual"):
        load_open_clip_visual(tiny_tower(), str(no_visual))

    wrong_size = _open_clip_file(tmp_path / "wide.bin", tiny_tower(width=48))
    # torch's own "size mismatch for ..." (a RuntimeError) names the tensors; either is clear.
    with pytest.raises((ValueError, RuntimeError), match="does not fit|size mismatch"):
        load_open_clip_visual(tiny_tower(width=32), str(wrong_size))

    with pytest.raises(FileNotFoundError, match="BiomedCLIP weights not found"):
        load_open_clip_visual(tiny_tower(), str(tmp_path / "missing"))
