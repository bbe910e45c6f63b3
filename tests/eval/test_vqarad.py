"""VQA-RAD's reader: the closed test questions, in the reference's layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from medcap.eval import read_omnimedvqa, read_vqarad
from medcap.testing import make_vqarad_layout


def test_vqarad_reader_keeps_closed_test_questions(tmp_path):
    info = make_vqarad_layout(tmp_path, n_images=3)
    items, report = read_vqarad(tmp_path)
    assert [(it.image, it.question, it.answer) for it in items] == info["expected"]  # image_name as written
    assert report["records"] == 12 and report["kept"] == 6
    assert all(Path(it.file).parent.name == "VQA_RAD Image Folder" and Path(it.file).name == it.image for it in items)
    with pytest.raises(FileNotFoundError, match="VQA_RAD Dataset Public.json"):
        read_vqarad(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="Open-access"):
        read_omnimedvqa(tmp_path / "nowhere")
