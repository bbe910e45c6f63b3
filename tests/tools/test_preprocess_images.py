"""tools/preprocess_images.py: padding rule, geometry, mirrored paths, failures, re-runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medcap.data import preprocess_images

REPO = Path(__file__).resolve().parents[2]


def _save(path: Path, w: int, h: int, seed: int = 0, value=None, mode="RGB", smooth=False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if smooth:  # a gradient, so that JPEG re-encoding stays within a few levels
        y, x = np.mgrid[0:h, 0:w]
        arr = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], -1).astype(np.uint8)
    elif value is None:
        arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    else:
        arr = np.full((h, w, 3), value, dtype=np.uint8)
    Image.fromarray(arr, "RGB").convert(mode).save(path)
    return path


def _reference_geometry(img: Image.Image, size: int) -> np.ndarray:
    """torchvision's Resize(shorter side, bicubic) + CenterCrop, composed independently."""
    from torchvision import transforms as T

    return np.asarray(T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)])(img))


def test_tree_padding_geometry_failures_and_rerun(tmp_path):
    src, dst = tmp_path / "in", tmp_path / "out"
    normal = _save(src / "normal.jpg", 60, 40, smooth=True)
    _save(src / "sub" / "deep" / "wide.png", 100, 20, value=200)  # 5:1, padded
    _save(src / "sub" / "tall.PNG", 30, 60, seed=2)  # 2:1, padded; upper-case suffix
    _save(src / "sub" / "gray.png", 40, 40, seed=3, mode="L")
    (src / "sub" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (src / "notes.txt").write_text("not an image")

    rep = preprocess_images(src, dst, workers=1, size=32, progress=False)
    assert (rep["total"], rep["done"], rep["exists"]) == (5, 4, 0)
    assert len(rep["failed"]) == 1 and rep["failed"][0]["path"].endswith("broken.jpg")
    assert rep["failed"][0]["reason"].startswith("corrupt image")

    outs = sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file())
    assert outs == ["normal.jpg", "sub/deep/wide.png", "sub/gray.png", "sub/tall.PNG"]
    for p in outs:
        im = Image.open(dst / p)
        assert im.size == (32, 32) and im.mode == "RGB"

    # 1.5:1 is not padded: plain resize + centre crop, as torchvision composes it
    ref = _reference_geometry(Image.open(normal).convert("RGB"), 32).astype(int)
    got = np.asarray(Image.open(dst / "normal.jpg")).astype(int)
    assert np.abs(got - ref).mean() < 2  # JPEG re-encoding only

    # 5:1 is padded with black to a centred square: a band of image between black bands
    wide = np.asarray(Image.open(dst / "sub" / "deep" / "wide.png")).astype(int)
    padded = Image.new("RGB", (100, 100))
    padded.paste(Image.new("RGB", (100, 20), (200, 200, 200)), (0, 40))
    np.testing.assert_array_equal(wide, _reference_geometry(padded, 32).astype(int))
    assert wide[0].max() == 0 and wide[-1].max() == 0 and wide[16].min() >= 190

    # a re-run does nothing new; a deleted output is redone
    os.remove(dst / "sub" / "gray.png")
    rep2 = preprocess_images(src, dst, workers=1, size=32, progress=False)
    assert (rep2["done"], rep2["exists"], len(rep2["failed"])) == (1, 3, 1)


def test_result_dir_inside_input_dir_is_not_reprocessed(tmp_path):
    src = tmp_path / "in"
    _save(src / "a.png", 20, 20)
    preprocess_images(src, src / "processed", workers=1, size=16, progress=False)
    rep = preprocess_images(src, src / "processed", workers=1, size=16, progress=False)
    assert rep["total"] == 1 and rep["exists"] == 1
    assert not (src / "processed" / "processed").exists()


@pytest.mark.integration
def test_script_in_parallel(tmp_path):
    src, dst = tmp_path / "in", tmp_path / "out"
    for i in range(6):
        _save(src / f"d{i % 2}" / f"{i}.jpg", 30 + i, 20, seed=i)
    (src / "bad.png").write_bytes(b"")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_images.py"), "--input-dir", str(src),
                          "--result-dir", str(dst), "--workers", "2", "--size", "24"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1]) == {"total": 7, "done": 6, "exists": 0, "failed": 1}
    failures = json.loads((dst / "preprocess_failures.json").read_text())
    assert failures[0]["path"].endswith("bad.png") and "empty" in failures[0]["reason"]
    assert sorted(p.name for p in dst.rglob("*.jpg")) == [f"{i}.jpg" for i in range(6)]
    res = subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_images.py"), "--input_dir",
                          str(tmp_path / "absent"), "--result_dir", str(dst)], capture_output=True, text=True, env=env)
    assert res.returncode == 1 and "input folder not found" in res.stderr


@pytest.mark.integration
def test_a_run_into_a_log_file_writes_plain_lines_and_no_carriage_return(tmp_path):
    """Not a terminal: the progress is one plain line (medcap._io.progress), not a redrawn bar."""
    src, dst = tmp_path / "in", tmp_path / "out"
    for i in range(3):
        _save(src / f"{i}.jpg", 30, 20, seed=i)
    (src / "bad.png").write_bytes(b"")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log = tmp_path / "preprocess.log"
    with open(log, "w", encoding="utf-8") as out:
        res = subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_images.py"), "--input-dir", str(src),
                              "--result-dir", str(dst), "--workers", "1", "--size", "16"],
                             stdout=out, stderr=subprocess.STDOUT, env=env, timeout=120)  # fmt: skip
    text = log.read_text(encoding="utf-8")
    assert res.returncode == 0, text
    assert "\r" not in text
    assert "preprocess images: 4/4 img (100%)" in text and "skipped unreadable" in text
