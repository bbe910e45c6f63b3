"""Offline image preprocessing: ``tools/preprocess_images.py`` and what it does to each image.

In order: ``find_images`` (every ``.jpg``/``.jpeg``/``.png`` under the input folder,
recursively, never inside the result folder); ``preprocess_image`` (pad an extreme
aspect ratio, longer side over ``pad_ratio`` x the shorter, with black to a centred
square, then BiomedCLIP's resize-and-centre-crop to ``size``); ``preprocess_file`` (to
RGB as in training, the transform, written atomically at the same relative path);
``preprocess_images`` (every file, in parallel, reported through ``medcap._io.progress``);
``preprocess_main``, the command. Training then takes the 224x224 shortcut.

Differences from the reference, on purpose: the search is always recursive (the
reference looked at sub-folders only when the top level held no image), extensions
match case-insensitively and include ``.jpeg``; JPEGs are written at quality 95
(Pillow's default 75 visibly degrades small structures); a killed run leaves no half
file that a re-run would mistake for done.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from medcap._cmdline import accept_snake_case
from medcap._io import atomic_write
from medcap._io import progress as progress_bar
from medcap.data._bad_samples import BadSample
from medcap.data._image import DEFAULT_MAX_IMAGE_PIXELS, load_image, pad_to_square, resize_center_crop

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}


# ---- Files and images

def find_images(input_dir, exclude: Optional[Path] = None) -> List[Path]:
    """Every image file under ``input_dir`` (recursive, sorted), outside ``exclude``."""
    root = Path(input_dir)
    ex = Path(exclude).resolve() if exclude else None
    out: List[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        if ex is not None:
            dirnames[:] = [n for n in dirnames if (d / n).resolve() != ex]
        out.extend(d / f for f in filenames if Path(f).suffix.lower() in IMAGE_SUFFIXES)
    return sorted(out)


def preprocess_image(img, size: int = 224, pad_ratio: float = 1.8):
    """The transform alone, PIL RGB -> PIL RGB ``size`` x ``size``."""
    w, h = img.size
    if max(w, h) > pad_ratio * min(w, h):
        img = pad_to_square(img)
    return resize_center_crop(img, size)


def preprocess_file(
    src, dst, size: int = 224, pad_ratio: float = 1.8, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> Tuple[str, Optional[str]]:
    """Process one file; returns ``(status, reason)`` with status ``done``, ``exists`` or ``failed``."""
    src, dst = Path(src), Path(dst)
    if dst.is_file() and dst.stat().st_size > 0:
        return "exists", None
    try:
        img = preprocess_image(load_image(src, max_pixels=max_pixels), size, pad_ratio)
        dst.parent.mkdir(parents=True, exist_ok=True)
        fmt = _FORMATS.get(dst.suffix.lower(), "PNG")
        atomic_write(dst, lambda tmp: img.save(tmp, format=fmt, **({"quality": 95} if fmt == "JPEG" else {})))
    except BadSample as e:
        return "failed", e.reason
    except Exception as e:  # one bad file must not stop the batch
        return "failed", f"{src}: {type(e).__name__}: {e}"
    return "done", None


def _job(args):
    return args[0], preprocess_file(*args[1:])


def preprocess_images(
    input_dir,
    result_dir,
    *,
    workers: Optional[int] = None,
    size: int = 224,
    pad_ratio: float = 1.8,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    progress: bool = True,
) -> Dict[str, object]:
    """Process every image under ``input_dir`` into ``result_dir``; returns a report
    ``{"total", "done", "exists", "failed": [{"path", "reason"}]}``."""
    src_root, dst_root = Path(input_dir), Path(result_dir)
    if not src_root.is_dir():
        raise FileNotFoundError(f"input folder not found: {str(src_root)!r}")
    files = find_images(src_root, exclude=dst_root)
    jobs = [(str(f), f, dst_root / f.relative_to(src_root), size, pad_ratio, max_pixels) for f in files]
    counts = {"done": 0, "exists": 0}
    failed: List[Dict[str, str]] = []
    workers = min(workers or os.cpu_count() or 1, max(1, len(jobs)))

    def results() -> Iterator:
        if workers <= 1:
            yield from map(_job, jobs)
            return
        with ProcessPoolExecutor(max_workers=workers) as pool:
            yield from pool.map(_job, jobs, chunksize=max(1, min(64, len(jobs) // (workers * 8) or 1)))

    with progress_bar(len(jobs), "preprocess images", "img", enabled=progress) as bar:
        for path, (status, reason) in results():
            if status == "failed":
                failed.append({"path": path, "reason": reason})
                print(f"skipped unreadable {path}: {reason}", file=sys.stderr)
            else:
                counts[status] += 1
            bar.update(1)
    return {"total": len(jobs), "done": counts["done"], "exists": counts["exists"], "failed": failed}


# ---- The command

def preprocess_main(argv: Optional[Sequence[str]] = None) -> int:
    """``tools/preprocess_images.py``; exit 0 when it ran (even with unreadable files), 1 when the input is missing."""
    p = argparse.ArgumentParser(description="Pad extreme aspect ratios, resize and centre-crop every image to 224, "
                                "in parallel.")
    p.add_argument("--input-dir", required=True)
    p.add_argument("--result-dir", required=True)
    p.add_argument("--workers", type=int, default=None, help="processes (default: all CPUs)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--pad-ratio", type=float, default=1.8, help="pad to square when long/short side exceeds this")
    p.add_argument("--no-progress", action="store_true")
    args = accept_snake_case(p).parse_args(argv)
    try:
        rep = preprocess_images(
            args.input_dir, args.result_dir, workers=args.workers, size=args.size,
            pad_ratio=args.pad_ratio, progress=not args.no_progress,
        )
    except FileNotFoundError as e:
        print(f"preprocess_images: error: {e}", file=sys.stderr)
        return 1
    if rep["failed"]:
        out = Path(args.result_dir) / "preprocess_failures.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rep["failed"], indent=1, ensure_ascii=False))
        print(f"{len(rep['failed'])} unreadable files skipped; listed in {out}", file=sys.stderr)
    print(json.dumps({k: (len(v) if k == "failed" else v) for k, v in rep.items()}))
    return 0
