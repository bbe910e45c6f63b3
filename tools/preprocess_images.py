#!/usr/bin/env python
"""Pad extreme aspect ratios, resize and centre-crop every image to 224, in parallel.

    python tools/preprocess_images.py --input-dir D --result-dir R [--workers N] [--size 224]

Every .jpg/.jpeg/.png under D (recursive) -> R at the same relative path.
Unreadable files are reported and skipped; files already in R are skipped, so
an interrupted run can be re-run. Prints one JSON summary line on stdout; the
failures are also written to R/preprocess_failures.json. Exit status 0 when it
ran (even with unreadable files), 1 when D does not exist.
The logic, and the deliberate differences from the reference: medcap/data/_preprocess.py.
The older ``--input_dir``/``--result_dir``/``--pad_ratio`` spellings still work.
"""

import sys

from medcap.cli import quiet_broken_pipe
from medcap.data import preprocess_main

if __name__ == "__main__":
    sys.exit(quiet_broken_pipe(preprocess_main))
