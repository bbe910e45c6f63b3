"""load_image over every mode and every kind of broken file; the transform against open_clip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from medcap.data import BadSample, image_transform, load_image


def _arr(img):
    assert img.mode == "RGB"
    return np.asarray(img).astype(np.int32)


# ---- modes


def test_rgb_and_gray_roundtrip(tmp_path, dh):
    p = dh.save_rgb(tmp_path / "a.png", 37, 21, seed=3)
    np.testing.assert_array_equal(_arr(load_image(p)), dh.rgb_array(37, 21, 3))
    g = dh.rgb_array(30, 20, 4)[..., 0]
    Image.fromarray(g, "L").save(tmp_path / "g.png")
    out = _arr(load_image(tmp_path / "g.png"))
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], g)


def test_16bit_grayscale_is_stretched_min_max(tmp_path):
    # 12-bit data in a 16-bit PNG: a plain cast would render it almost black.
    raw = np.random.default_rng(0).integers(1000, 4096, size=(24, 32)).astype(np.uint16)
    img = Image.fromarray(raw)
    assert img.mode.startswith("I;16")
    img.save(tmp_path / "x16.png")
    assert Image.open(tmp_path / "x16.png").mode.startswith("I")
    expected = (raw.astype(float) - raw.min()) / (raw.max() - raw.min()) * 255
    out = _arr(load_image(tmp_path / "x16.png"))
    assert np.abs(out[..., 1] - expected).max() <= 0.51
    assert out[..., 0].min() == 0 and out[..., 0].max() == 255


def test_rgba_and_la_are_composited_on_black(tmp_path, dh):
    rgb = dh.rgb_array(20, 10, 1)
    alpha = np.random.default_rng(2).integers(0, 256, size=(10, 20), dtype=np.uint8)
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "a.png")
    expected = rgb.astype(float) * alpha[..., None] / 255.0
    assert np.abs(_arr(load_image(tmp_path / "a.png")) - expected).max() <= 1.0

    g = rgb[..., 0]
    Image.fromarray(np.dstack([g, alpha]), "LA").save(tmp_path / "la.png")
    out = _arr(load_image(tmp_path / "la.png"))
    assert np.abs(out[..., 2] - g.astype(float) * alpha / 255.0).max() <= 1.0


def test_palette_with_and_without_transparency(tmp_path, dh):
    rgb = Image.fromarray(dh.rgb_array(16, 12, 5), "RGB")
    p = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    p.save(tmp_path / "p.png")
    reference = np.asarray(p.convert("RGB")).astype(np.int32)
    np.testing.assert_array_equal(_arr(load_image(tmp_path / "p.png")), reference)

    idx = np.asarray(p)
    p.info["transparency"] = int(idx[0, 0])
    p.save(tmp_path / "pt.png", transparency=int(idx[0, 0]))
    out = _arr(load_image(tmp_path / "pt.png"))
    transparent = idx == idx[0, 0]
    assert (out[transparent] == 0).all()
    np.testing.assert_array_equal(out[~transparent], reference[~transparent])


def test_cmyk_matches_pillow_conversion(tmp_path):
    cmyk = np.random.default_rng(6).integers(0, 256, size=(10, 14, 4), dtype=np.uint8)
    img = Image.fromarray(cmyk, "CMYK")
    img.save(tmp_path / "c.tiff")
    img.save(tmp_path / "c.jpg", quality=95)
    np.testing.assert_array_equal(_arr(load_image(tmp_path / "c.tiff")), np.asarray(img.convert("RGB")))
    assert load_image(tmp_path / "c.jpg").size == (14, 10)


def test_exif_orientation_is_applied(tmp_path, dh):
    raw = dh.rgb_array(40, 20, 7)  # wide as stored
    img = Image.fromarray(raw, "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    img.save(tmp_path / "r.png", exif=exif)
    out = load_image(tmp_path / "r.png")
    assert out.size == (20, 40)  # tall when displayed
    np.testing.assert_array_equal(_arr(out), np.rot90(raw, k=-1))


# ---- DICOM


def test_dicom_modality_lut_and_window_match_pydicom(tmp_path, dh):
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    raw = (np.arange(48 * 64).reshape(48, 64) % 4000).astype(np.uint16)
    p = dh.make_dicom(tmp_path / "ct.dcm", raw, slope=2.0, intercept=-1000.0, center=1000.0, width=2000.0)
    ds = pydicom.dcmread(p)
    v = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)  # in pydicom's [y_min, y_max]
    expected = (v - v.min()) / (v.max() - v.min()) * 255
    out = _arr(load_image(p))
    assert out.shape == (48, 64, 3)
    assert np.abs(out[..., 0] - expected).max() <= 0.51


def test_dicom_without_window_uses_percentiles_and_monochrome1_inverts(tmp_path, dh):
    raw = np.random.default_rng(8).integers(0, 3000, size=(32, 32)).astype(np.uint16)
    raw[0, 0] = 60000  # one outlier must not flatten the picture
    m2 = _arr(load_image(dh.make_dicom(tmp_path / "a.dcm", raw)))[..., 0]
    lo, hi = np.percentile(raw.astype(float), [0.5, 99.5])
    expected = np.clip((raw - lo) / (hi - lo), 0, 1) * 255
    assert np.abs(m2 - expected).max() <= 0.51
    assert m2[0, 0] == 255 and m2.std() > 50
    m1 = _arr(load_image(dh.make_dicom(tmp_path / "b.dcm", raw, photometric="MONOCHROME1")))[..., 0]
    np.testing.assert_array_equal(m1, 255 - m2)


def test_dicom_detected_by_magic_without_suffix(tmp_path, dh):
    raw = np.arange(16 * 16, dtype=np.uint16).reshape(16, 16)
    p = dh.make_dicom(tmp_path / "scan.dcm", raw)
    q = tmp_path / "scan_no_suffix"
    q.write_bytes(p.read_bytes())
    np.testing.assert_array_equal(_arr(load_image(q)), _arr(load_image(p)))


# ---- broken files


@pytest.mark.parametrize(
    "kind, expect",
    [
        ("missing", "image not found"),
        ("directory", "image not found"),
        ("empty", "corrupt image"),
        ("garbage", "corrupt image"),
        ("truncated_jpeg", "corrupt image"),
        ("truncated_png", "corrupt image"),
        ("bad_dicom", "corrupt image"),
    ],
)
def test_broken_files_raise_bad_sample_with_reason(tmp_path, dh, kind, expect):
    p = tmp_path / f"{kind}.png"
    if kind == "directory":
        p.mkdir()
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "garbage":
        p.write_bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    elif kind == "truncated_jpeg":
        p = dh.truncated_jpeg(tmp_path / "t.jpg")
    elif kind == "truncated_png":
        full = dh.save_rgb(tmp_path / "full.png", 64, 64)
        p.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    elif kind == "bad_dicom":
        p = tmp_path / "x.dcm"
        p.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00garbage")
    with pytest.raises(BadSample) as e:
        load_image(p)
    assert e.value.reason.startswith(expect), e.value.reason
    assert str(p.name) in e.value.reason


def test_decompression_bomb_guard(tmp_path, dh, monkeypatch):
    p = dh.save_rgb(tmp_path / "big.png", 100, 100)
    with pytest.raises(BadSample, match=r"image too large: .*100x100 = 10,000 pixels.*decompression-bomb"):
        load_image(p, max_pixels=5000)
    # An explicit limit above Pillow's own wins over Pillow's refusal.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert load_image(p, max_pixels=20000).size == (100, 100)
    with pytest.raises(BadSample, match="image too large"):
        load_image(dh.make_dicom(tmp_path / "big.dcm", np.zeros((100, 100), np.uint16)), max_pixels=5000)


# ---- transform


@pytest.mark.parametrize("w, h", [(50, 30), (30, 71), (33, 33)])
def test_transform_matches_open_clip_eval_transform(dh, w, h):
    from open_clip.transform import image_transform as oc_transform

    from medcap.models import BIOMEDCLIP_MEAN, BIOMEDCLIP_STD

    img = Image.fromarray(dh.rgb_array(w, h, w * h), "RGB")
    ours = image_transform(24)(img)
    ref = oc_transform(24, is_train=False, mean=BIOMEDCLIP_MEAN, std=BIOMEDCLIP_STD)(img)
    assert ours.shape == (3, 24, 24) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_transform_shortcut_for_exact_size(dh):
    from medcap.models import BIOMEDCLIP_MEAN, BIOMEDCLIP_STD

    raw = dh.rgb_array(24, 24, 9)
    out = image_transform(24)(Image.fromarray(raw, "RGB"))
    mean = torch.tensor(BIOMEDCLIP_MEAN)[:, None, None]
    std = torch.tensor(BIOMEDCLIP_STD)[:, None, None]
    expected = (torch.from_numpy(raw).permute(2, 0, 1).float() / 255 - mean) / std
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("w, h", [(37, 23), (23, 37), (101, 25), (24, 25), (10, 10), (24, 24)])
def test_resize_center_crop_matches_torchvision_exactly(dh, w, h):
    from torchvision import transforms as T

    from medcap.data._image import resize_center_crop

    img = Image.fromarray(dh.rgb_array(w, h, w + h), "RGB")
    ref = T.Compose([T.Resize(24, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(24)])(img)
    np.testing.assert_array_equal(np.asarray(resize_center_crop(img, 24)), np.asarray(ref))


def test_dicom_color_and_multiframe(tmp_path, dh):
    def write(path, arr, photometric, samples, bits, frames=1):
        ds = dh.dicom_dataset()
        ds.Rows, ds.Columns = arr.shape[-3:-1] if samples == 3 else arr.shape[-2:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = samples, photometric
        ds.BitsAllocated = ds.BitsStored = bits
        ds.HighBit, ds.PixelRepresentation = bits - 1, 0
        if samples == 3:
            ds.PlanarConfiguration = 0
        if frames > 1:
            ds.NumberOfFrames = frames
        ds.PixelData = arr.tobytes()
        ds.save_as(str(path), enforce_file_format=True)
        return path

    rgb = dh.rgb_array(12, 10, 11)
    out = load_image(write(tmp_path / "c.dcm", rgb, "RGB", 3, 8))
    np.testing.assert_array_equal(_arr(out), rgb)

    frames = np.stack([np.full((8, 9), v, np.uint16) for v in (100, 900, 500)])
    frames[0, 0, 0] = 0  # frame 0: 0 at one pixel, 100 elsewhere
    got = _arr(load_image(write(tmp_path / "m.dcm", frames.astype("<u2"), "MONOCHROME2", 1, 16, frames=3)))
    assert got.shape == (8, 9, 3) and got[0, 0, 0] == 0 and got[1:, 1:, 0].min() == 255  # the first frame
