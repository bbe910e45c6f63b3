"""Images as they come in practice, turned into what BiomedCLIP expects.

In order: to 8-bit RGB from any Pillow mode (``to_rgb``: transparency composited on
black, 16/32-bit grey stretched); DICOM (``load_dicom``: the first frame only, through
its modality LUT and window, with a clear reason when a decoder is missing);
``load_image`` (any Pillow format or DICOM, EXIF orientation applied, a
decompression-bomb guard); the geometry (``resize_center_crop``, ``pad_to_square``);
the transform (``ImageTransform``, ``image_transform``).

Every failure is a :class:`BadSample` whose reason says what is wrong with which
file. The conventions are documented once, on the function that applies them, and
relied on by tests.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path
from typing import Callable, Optional, Tuple, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from medcap.data._bad_samples import BadSample

# Pillow's own hard limit (2 x Image.MAX_IMAGE_PIXELS at its default): images it
# would merely warn about are accepted, the ones it refuses are refused here too.
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970
DICOM_SUFFIXES = (".dcm", ".dicom")
BACKGROUND = (0, 0, 0)

PathLike = Union[str, os.PathLike]


def _bomb_message(path: Path, w: int, h: int, max_pixels: int) -> str:
    return (
        f"image too large: {path} is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,} "
        "(decompression-bomb guard; raise max_image_pixels if the file is trusted)"
    )


# ---- To RGB

def _stretch_to_uint8(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    arr = arr.astype(np.float64)
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        # A constant image carries no contrast to keep: render it mid-grey-free black.
        return np.zeros(arr.shape, dtype=np.uint8)
    out = (np.clip(arr, lo, hi) - lo) * (255.0 / (hi - lo))
    return np.rint(out).astype(np.uint8)


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """I;16 / I / F grayscale -> 8-bit L by a min-max stretch over the finite values."""
    arr = np.asarray(img)
    finite = arr[np.isfinite(arr)] if arr.dtype.kind == "f" else arr
    if finite.size == 0:
        return Image.fromarray(np.zeros(arr.shape, np.uint8), "L")
    return Image.fromarray(_stretch_to_uint8(np.nan_to_num(arr), float(finite.min()), float(finite.max())), "L")


def _composite(img: Image.Image, background: Tuple[int, int, int]) -> Image.Image:
    rgba = img.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, background + (255,))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def to_rgb(img: Image.Image, background: Tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB.

    Transparency (RGBA, LA, P with a transparent colour) is composited on **black**,
    the background of radiology images and of the reference's padding, and what
    dropping alpha gives for the usual (0,0,0,0) pixels; 16-bit / 32-bit grayscale
    (``I;16``, ``I``, ``F``) is stretched min-max to 0..255, so that 12-bit data in a
    16-bit container is not rendered black.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _high_depth_to_l(img).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        return _composite(img, background)
    if mode == "1":
        return img.convert("L").convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise BadSample(f"unsupported image mode: {mode} cannot be converted to RGB ({e})") from e


# ---- DICOM

def _window(arr: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM linear VOI window (PS3.3 C.11.2.1.2.1) to 0..255."""
    width = max(float(width), 1.0)
    lo = center - 0.5 - (width - 1) / 2
    hi = center - 0.5 + (width - 1) / 2
    out = ((arr.astype(np.float64) - (center - 0.5)) / max(width - 1, 1e-6) + 0.5) * 255.0
    out = np.where(arr <= lo, 0.0, np.where(arr > hi, 255.0, out))
    return np.rint(np.clip(out, 0, 255)).astype(np.uint8)


def _first(value) -> Optional[float]:
    if value is None:
        return None
    try:
        if isinstance(value, (list, tuple)) or hasattr(value, "__getitem__") and not isinstance(value, (str, bytes)):
            value = value[0]
        return float(value)
    except (TypeError, ValueError, IndexError):
        return None


# Element values longer than this stay on disk until used, so reading the header
# of a 400-frame file does not read its pixel data.
_DICOM_DEFER_BYTES = 4096
# Readers that decode whole files are preferred in this order in install hints:
# wheels on PyPI first.
_PLUGIN_PREFERENCE = ("pylibjpeg", "pyjpegls", "gdcm")


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    # DICOM Part 10 files carry 'DICM' after a 128-byte preamble, whatever their name.
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _dicom_header(path: Path):
    import pydicom

    try:
        return pydicom.dcmread(str(path), defer_size=_DICOM_DEFER_BYTES)
    except Exception as e:  # pydicom raises several types for unreadable files
        raise BadSample(f"corrupt image: {path} is not a readable DICOM file ({type(e).__name__}: {e})") from e


def _int(ds, name: str, default: int) -> int:
    try:
        return int(ds.get(name, default) or default)
    except (TypeError, ValueError):
        return default


def _declared_bytes(ds) -> Tuple[int, int]:
    """(bytes of one frame, bytes of all frames) as the header declares them."""
    frame = _int(ds, "Rows", 0) * _int(ds, "Columns", 0) * _int(ds, "SamplesPerPixel", 1)
    frame *= max(1, (_int(ds, "BitsAllocated", 8) + 7) // 8)
    return frame, frame * max(1, _int(ds, "NumberOfFrames", 1))


def _transfer_syntax(ds):
    return getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)


def _install_hint(decoder) -> str:
    options = [m.split(" - requires ", 1) for m in decoder.missing_dependencies if " - requires " in m]
    options.sort(key=lambda o: _PLUGIN_PREFERENCE.index(o[0]) if o[0] in _PLUGIN_PREFERENCE else 99)
    needs = [o[1] for o in options]
    if not needs:
        return "no installable decoder is known to pydicom"
    return f"install {needs[0]}" + (f" (or {', or '.join(needs[1:])})" if len(needs) > 1 else "")


def _codec_problem(ds) -> Optional[str]:
    """Why this file's pixel data cannot be decoded here (a missing package), or None."""
    from pydicom.pixels import get_decoder

    ts = _transfer_syntax(ds)
    if ts is None or not ts.is_compressed:
        return None
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        return f"unsupported transfer syntax {ts.name} ({ts}): pydicom has no decoder for it"
    if decoder.is_available:
        return None
    return f"unsupported transfer syntax {ts.name} ({ts}): {_install_hint(decoder)}"


def _decode_failure(path: Path, ds, e: Exception) -> BadSample:
    """An installed decoder gave up: a capability it lacks (12-bit JPEG in Pillow) or a damaged file."""
    from pydicom.pixels import get_decoder

    ts = _transfer_syntax(ds)
    first = str(e).strip().splitlines()
    detail = f"{type(e).__name__}: {' '.join(line.strip() for line in first[:3])}"
    if ts is not None and ts.is_compressed and "does not support" in str(e):
        with contextlib.suppress(NotImplementedError):
            hint = _install_hint(get_decoder(ts))
            return BadSample(f"unsupported transfer syntax {ts.name} ({ts}): {hint} ({detail})")
    return BadSample(f"corrupt image: cannot decode the pixel data of DICOM file {path} (transfer syntax {ts}): {detail}")


def _first_frame(path: Path, ds, max_pixels: int) -> np.ndarray:
    """Frame 0 only, read from the file: a 400-frame series costs one frame of memory."""
    import pydicom
    from pydicom.pixels import pixel_array

    ts = _transfer_syntax(ds)
    if ts is None or not ts.is_deflated:
        try:
            return pixel_array(str(path), index=0)
        except Exception as e:  # noqa: BLE001 - the in-memory reader below decides
            first_error = e
    else:
        first_error = None
    # Deflated files (and a few odd encapsulations the file reader rejects) are read
    # whole; a deflated file inflates to its declared size, so that is what is counted.
    frame_bytes, all_bytes = _declared_bytes(ds)
    budget = 4 * max_pixels
    if ts is not None and ts.is_deflated and all_bytes > budget:
        raise BadSample(
            f"image too large: {path} declares {_int(ds, 'NumberOfFrames', 1)} frame(s) of {frame_bytes:,} bytes "
            f"= {all_bytes:,} bytes once inflated, over the limit of {budget:,} (4 bytes x max_image_pixels)"
        )
    if first_error is not None and path.stat().st_size > budget:
        raise _decode_failure(path, ds, first_error)  # not worth reading a huge file whole to retry
    try:
        return pixel_array(pydicom.dcmread(str(path)), index=0)
    except Exception as e:
        raise _decode_failure(path, ds, first_error or e) from e


def _palette_to_rgb(arr: np.ndarray, ds) -> Image.Image:
    from pydicom.pixels import apply_color_lut

    rgb = apply_color_lut(arr, ds)
    if rgb.dtype != np.uint8:  # 16-bit LUT entries span 0..65535; integer rounding keeps memory low
        rgb = ((rgb.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(rgb), "RGB")


def _grey_to_rgb(arr: np.ndarray, ds) -> Image.Image:
    from pydicom.pixels import apply_modality_lut

    values = apply_modality_lut(arr, ds).astype(np.float64)
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if center is not None and width is not None and width > 0:
        out = _window(values, center, width)
    else:
        lo, hi = np.percentile(values, [0.5, 99.5])
        if hi <= lo:
            lo, hi = float(values.min()), float(values.max())
        out = _stretch_to_uint8(values, float(lo), float(hi))
    if str(getattr(ds, "PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        out = 255 - out  # MONOCHROME1: the lowest value is displayed white
    return Image.fromarray(out, "L").convert("RGB")


def load_dicom(path: PathLike, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """A DICOM file -> 8-bit RGB ``PIL.Image`` of its first frame.

    The modality LUT (rescale slope/intercept), then the file's own window centre/width
    when present, else a 0.5-99.5 percentile window; MONOCHROME1 inverted; PALETTE
    COLOR through its colour table (in colour). Only the first frame is read and decoded
    (a 400-frame series costs one frame of memory); a deflated file, which must be
    inflated whole, is refused when its declared frames x rows x columns x samples x
    bytes exceed 4 bytes x ``max_pixels``; a compressed file whose decoder is not
    installed is "unsupported transfer syntax <name> (<UID>): install <package>", not
    "corrupt image".
    """
    path = Path(path)
    ds = _dicom_header(path)
    rows, cols = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    if rows * cols > max_pixels:
        raise BadSample(_bomb_message(path, cols, rows, max_pixels))
    if "PixelData" not in ds:
        raise BadSample(f"corrupt image: DICOM file {path} has no pixel data")
    problem = _codec_problem(ds)
    if problem:
        raise BadSample(problem)
    arr = _first_frame(path, ds, max_pixels)
    photometric = str(getattr(ds, "PhotometricInterpretation", "")).strip()
    try:
        if photometric == "PALETTE COLOR":
            return _palette_to_rgb(arr, ds)
        if _int(ds, "SamplesPerPixel", 1) == 3:
            if arr.dtype != np.uint8:
                arr = _stretch_to_uint8(arr, float(arr.min()), float(arr.max()))
            return Image.fromarray(np.ascontiguousarray(arr), "RGB")
        if arr.ndim != 2:
            raise BadSample(f"unsupported image mode: DICOM file {path} has pixel array shape {arr.shape}")
        return _grey_to_rgb(arr, ds)
    except BadSample:
        raise
    except Exception as e:  # a damaged colour table or LUT element read lazily from the file
        raise BadSample(f"corrupt image: DICOM file {path}: {type(e).__name__}: {e}") from e


# ---- Any image file

def decode_image_bytes(data: bytes, name: str):
    """Image bytes -> 8-bit RGB ``PIL.Image`` with ``load_image``'s conventions (EXIF
    orientation, CMYK/alpha/16-bit conversions); ``BadSample`` when unreadable."""
    if not data:
        raise BadSample(f"image not found: {name} holds no image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        if img.size[0] * img.size[1] > DEFAULT_MAX_IMAGE_PIXELS:
            raise BadSample(f"image too large: {name} is {img.size[0]}x{img.size[1]}")
        img.load()
        return to_rgb(ImageOps.exif_transpose(img))
    except BadSample:
        raise
    except Exception as e:  # Pillow raises many types for broken data
        raise BadSample(f"corrupt image: {name}: {type(e).__name__}: {e}") from e


def load_image(
    path: PathLike,
    *,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    background: Tuple[int, int, int] = BACKGROUND,
) -> Image.Image:
    """Open an image file (any Pillow format, or DICOM) as an 8-bit RGB ``PIL.Image``.

    Raises :class:`BadSample` with a reason for a missing, empty, unreadable,
    truncated or too large file: an image with more than ``max_pixels`` pixels is
    refused before decoding (decompression-bomb guard). EXIF orientation is applied;
    the conversions are ``to_rgb``'s and ``load_dicom``'s.
    """
    path = Path(path)
    if not path.is_file():
        raise BadSample(f"image not found: {path}" + (" (a directory)" if path.is_dir() else ""))
    if path.stat().st_size == 0:
        raise BadSample(f"corrupt image: {path} is empty (0 bytes)")
    if _is_dicom(path):
        return load_dicom(path, max_pixels=max_pixels)
    if max_pixels > Image.MAX_IMAGE_PIXELS * 2:
        # Pillow refuses above 2 x its limit inside open(); let a larger, explicit limit win.
        Image.MAX_IMAGE_PIXELS = max_pixels // 2 + 1
    try:
        with warnings.catch_warnings():
            # Our own limit below decides; Pillow's warning above its soft limit is noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        w, h = img.size
        if w * h > max_pixels:
            img.close()
            raise BadSample(_bomb_message(path, w, h, max_pixels))
        if w == 0 or h == 0:
            raise BadSample(f"corrupt image: {path} has size {w}x{h}")
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img, background)
    except BadSample:
        raise
    except Image.DecompressionBombError as e:
        raise BadSample(f"image too large: {path}: {e}") from e
    except UnidentifiedImageError as e:
        raise BadSample(f"corrupt image: {path} is not an image Pillow can identify") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # Truncated JPEGs/PNGs surface here ("image file is truncated", "broken data stream").
        raise BadSample(f"corrupt image: {path}: {type(e).__name__}: {e}") from e


# ---- Geometry and the transform

def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """BiomedCLIP's eval geometry: shorter side to ``size`` (bicubic), centre crop ``size`` x ``size``.

    Same arithmetic as torchvision's ``Resize(size)`` + ``CenterCrop(size)`` on PIL
    images (the longer side is truncated, the crop offset rounded), written on PIL
    alone so that the preprocessing tool does not import torch. An image already
    ``size`` x ``size`` is returned untouched (the reference's shortcut).
    """
    if img.size == (size, size):
        return img
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def pad_to_square(img: Image.Image, fill: Tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """Centre ``img`` on a square canvas of its longer side."""
    w, h = img.size
    side = max(w, h)
    if w == h:
        return img
    canvas = Image.new(img.mode, (side, side), fill if img.mode == "RGB" else 0)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


class ImageTransform:
    """PIL RGB image -> normalised ``FloatTensor[3, S, S]`` (BiomedCLIP's eval transform).

    A class rather than a closure so that datasets holding it pickle into
    spawn-started DataLoader workers.
    """

    def __init__(self, image_size: int = 224, mean=None, std=None):
        from medcap.models import BIOMEDCLIP_MEAN, BIOMEDCLIP_STD

        self.image_size = int(image_size)
        self.mean = tuple(mean or BIOMEDCLIP_MEAN)
        self.std = tuple(std or BIOMEDCLIP_STD)

    def __call__(self, img: Image.Image):
        import torch

        if img.mode != "RGB":
            img = to_rgb(img)
        img = resize_center_crop(img, self.image_size)
        # numpy rather than torch ops: single-threaded, so DataLoader workers do not
        # fight over intra-op threads; the same float32 operations as ToTensor+Normalize.
        a = np.asarray(img, dtype=np.uint8).astype(np.float32) / np.float32(255)  # [S, S, 3]
        a = (a - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))  # [3, S, S]

    def __repr__(self) -> str:
        return f"ImageTransform(image_size={self.image_size})"


def image_transform(image_size: int = 224) -> Callable[[Image.Image], "object"]:
    """BiomedCLIP's evaluation transform: resize the shorter side to ``image_size``
    (bicubic), centre crop, to tensor, normalise with BiomedCLIP's mean/std.
    An image already ``image_size`` x ``image_size`` skips resize and crop."""
    return ImageTransform(image_size)
