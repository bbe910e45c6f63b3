"""Fixtures for the data tests: a byte-level tokenizer, record writers and
image makers for every kind of good and broken file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pytest
from PIL import Image

PH = "\u2460"  # '①'


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    """A Llama 3 tokenizer over the 256 bytes: every text token is one UTF-8 byte,
    so expected token lists can be written down independently."""
    from medcap.models import llama3_tokenizer, write_tiktoken_tokenizer

    paths = write_tiktoken_tokenizer(tmp_path_factory.mktemp("bytetok"))
    t = llama3_tokenizer(str(paths["path"]), str(paths["special_tokens_path"]))
    t.paths = paths  # for the command-line tests
    return t


@pytest.fixture(scope="session")
def special(tok) -> Dict[str, int]:
    return dict(tok.special_tokens)


def rec(
    human: str = PH * 50,
    gpt: str = "a caption.",
    image: Optional[str] = "img.png",
    meta: Optional[str] = "__dir__",
    extra_turns: Optional[List[Dict[str, str]]] = None,
) -> Dict[str, Any]:
    """A sharegpt record; ``meta="__dir__"`` is replaced by ``write_records``."""
    conv = [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}] + (extra_turns or [])
    r: Dict[str, Any] = {"conversations": conv}
    if image is not None:
        r["image"] = image
    if meta is not None:
        r["meta"] = meta
    return r


def write_records(path: Path, records: List[Any], image_dir: Path, jsonl: bool = False) -> Path:
    def fix(r):
        if isinstance(r, dict) and r.get("meta") == "__dir__":
            r = {**r, "meta": f"dir={image_dir}"}
        return r

    path.parent.mkdir(parents=True, exist_ok=True)
    if jsonl:
        path.write_text("\n".join(json.dumps(fix(r), ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    else:
        path.write_text(json.dumps([fix(r) for r in records], ensure_ascii=False), encoding="utf-8")
    return path


def rgb_array(w: int, h: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def save_rgb(path: Path, w: int = 40, h: int = 30, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb_array(w, h, seed), "RGB").save(path)
    return path


def truncated_jpeg(path: Path) -> Path:
    save_rgb(path.with_suffix(".full.jpg"), 64, 64)
    data = path.with_suffix(".full.jpg").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def dicom_dataset():
    """An empty Secondary Capture pydicom ``Dataset`` (explicit VR LE file meta, fresh
    SOP instance UID): the caller sets the image attributes and pixel data."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    return ds


def make_dicom(
    path: Path,
    arr: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    slope: Optional[float] = None,
    intercept: Optional[float] = None,
    center: Optional[float] = None,
    width: Optional[float] = None,
) -> Path:
    """A DICOM file made with pydicom's public API (Secondary Capture, explicit VR LE)."""
    ds = dicom_dataset()
    ds.Modality = "OT"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept or 0
    if center is not None:
        ds.WindowCenter = center
        ds.WindowWidth = width
    ds.PixelData = arr.astype("<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return path


@pytest.fixture(scope="session")
def dh():
    """The helpers above as one namespace (test modules cannot import a conftest reliably)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        PH=PH,
        rec=rec,
        write_records=write_records,
        rgb_array=rgb_array,
        save_rgb=save_rgb,
        truncated_jpeg=truncated_jpeg,
        dicom_dataset=dicom_dataset,
        make_dicom=make_dicom,
    )
