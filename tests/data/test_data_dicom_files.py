"""DICOM files as pydicom ships them: multi-frame series, palette colour, missing codecs."""

from __future__ import annotations

import tracemalloc
import warnings

import numpy as np
import pytest

from medcap.data import BadSample, load_image

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.pixels import get_decoder  # noqa: E402
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEGExtended12Bit, JPEGLSLossless  # noqa: E402


def _test_file(name: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} not available")
    return path


def _peak_bytes(fn) -> int:
    fn()  # imports and caches first, so that only the load itself is measured
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _series(path, frames: int, syntax=None):
    """CT_small's header with ``frames`` frames (frame k = CT_small + k)."""
    ds = pydicom.dcmread(_test_file("CT_small.dcm"))
    base = ds.pixel_array
    ds.PixelData = np.stack([base + k for k in range(frames)]).astype(base.dtype).tobytes()
    ds.NumberOfFrames = frames
    if syntax is not None:
        ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(path, enforce_file_format=True)
    return path


def test_shipped_multiframe_decodes_only_the_first_frame():
    path = _test_file("examples_ybr_color.dcm")  # 30 frames of 240x320 RGB, JPEG baseline
    full = pydicom.dcmread(path).pixel_array
    assert full.shape == (30, 240, 320, 3) and full.nbytes > 6_900_000
    got = np.asarray(load_image(path))
    np.testing.assert_array_equal(got, full[0])
    assert _peak_bytes(lambda: load_image(path)) < 3_000_000  # all frames would be 6.9 MB


def test_shipped_rgb_two_frame_file_gives_frame_zero():
    path = _test_file("SC_rgb_rle_2frame.dcm")
    full = pydicom.dcmread(path).pixel_array
    assert full.shape == (2, 100, 100, 3) and not np.array_equal(full[0], full[1])
    np.testing.assert_array_equal(np.asarray(load_image(path)), full[0])


def test_400_frame_series_costs_one_frame_of_memory(tmp_path):
    """13 MB on disk: decoding every frame (as pixel_array does) peaks at about 26 MB."""
    series = _series(tmp_path / "series.dcm", 400)
    single = _series(tmp_path / "single.dcm", 1)
    assert series.stat().st_size > 13_000_000
    np.testing.assert_array_equal(np.asarray(load_image(series)), np.asarray(load_image(single)))
    assert _peak_bytes(lambda: load_image(series)) < 4_000_000


def test_deflated_series_is_counted_whole_before_inflating(tmp_path):
    """A deflated file has to be inflated whole: 40 frames x 128 x 128 x 2 bytes = 1,310,720."""
    path = _series(tmp_path / "dfl.dcm", 40, DeflatedExplicitVRLittleEndian)
    single = _series(tmp_path / "single.dcm", 1)
    np.testing.assert_array_equal(np.asarray(load_image(path)), np.asarray(load_image(single)))
    with pytest.raises(BadSample, match=r"image too large: .* 1,310,720 bytes once inflated, over the limit of 262,144"):
        load_image(path, max_pixels=65_536)  # one 128x128 frame is within the pixel limit


def test_palette_colour_is_rendered_in_colour():
    path = _test_file("examples_palette.dcm")
    ds = pydicom.dcmread(path)
    n, first, bits = (int(v) for v in ds.RedPaletteColorLookupTableDescriptor)
    assert bits == 16
    idx = np.clip(ds.pixel_array.astype(np.int64) - first, 0, n - 1)
    channels = []
    for c in ("Red", "Green", "Blue"):
        lut = np.frombuffer(getattr(ds, f"{c}PaletteColorLookupTableData"), dtype="<u2")
        channels.append(np.rint(lut[idx] / 257.0))  # 16-bit entry -> 8 bits
    expected = np.stack(channels, axis=-1).astype(np.uint8)
    got = np.asarray(load_image(path))
    np.testing.assert_array_equal(got, expected)
    assert (got[..., 0] != got[..., 2]).mean() > 0.1  # colour, not grey


def _missing(uid) -> bool:
    return not get_decoder(uid).is_available


@pytest.mark.skipif(not _missing(JPEGLSLossless), reason="a JPEG-LS decoder is installed")
def test_missing_codec_names_the_syntax_and_the_package():
    path = _test_file("MR_small_jpeg_ls_lossless.dcm")
    with pytest.raises(BadSample) as err:
        load_image(path)
    reason = err.value.reason
    assert reason.startswith(
        "unsupported transfer syntax JPEG-LS Lossless Image Compression (1.2.840.10008.1.2.4.80): "
        "install pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1"
    ), reason
    assert "corrupt" not in reason


@pytest.mark.skipif(
    get_decoder(JPEGExtended12Bit).missing_dependencies == [], reason="every JPEG Extended decoder is installed"
)
def test_codec_lacking_a_feature_is_unsupported_not_corrupt():
    """Pillow decodes JPEG Extended, but not its 12-bit variant."""
    with pytest.raises(BadSample, match=r"^unsupported transfer syntax JPEG Extended \(Process 2 and 4\) .*: install "):
        load_image(_test_file("JPGExtended.dcm"))


def test_truncated_file_is_still_corrupt():
    with pytest.raises(BadSample, match="^corrupt image: cannot decode the pixel data"):
        load_image(_test_file("MR_truncated.dcm"))
