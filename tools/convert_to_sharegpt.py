#!/usr/bin/env python
"""Convert public medical datasets to medcap's sharegpt JSON (the reference's output files).

    python tools/convert_to_sharegpt.py --dataset {pmcoa,vqarad,textplus,slake,pathvqa} \
        --data-dir ./datasets --save-dir ./datasets/medcap [--instruction none|random|fixed]

Input layouts and the fields read from each source: datasets/README.md (and
``medcap/data/_convert.py``). Prints one JSON summary line (files written,
records skipped and why, invalid JSONL lines) on stdout; exit status 1 when the
required inputs are missing or a source lacks a field in every record.
The older ``--data_dir``/``--save_dir`` spellings still work.
"""

import sys

from medcap.cli import quiet_broken_pipe
from medcap.data import convert_main

if __name__ == "__main__":
    sys.exit(quiet_broken_pipe(convert_main))
