#!/usr/bin/env python
"""Pad extreme aspect ratios, resize and centre-crop every image to 224, in parallel.

    python tools/preprocess_images.py --input-dir D --result-dir R [--workers N] [--size 224]

Every .jpg/.jpeg/.png under D (recursive) -> R at the same relative path.
Unreadable files are reported and skipped; files already in R are skipped, so
an interrupted run can be re-run. Prints one JSON summary line on stdout; the
failures are also written to R/preprocess_failures.json. Exit status 0 when it
ran (even with unreadable files), 1 when D does not exist.
Details and the deliberate differences from the reference: medcap/data/_preprocess.py.
The older ``--input_dir``/``--result_dir``/``--pad_ratio`` spellings still work.
"""

import argparse
import json
import sys
from pathlib import Path

from medcap.cli import accept_snake_case, quiet_broken_pipe
from medcap.data import preprocess_images


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
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


if __name__ == "__main__":
    sys.exit(quiet_broken_pipe(main))
