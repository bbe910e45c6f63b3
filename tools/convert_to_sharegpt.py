#!/usr/bin/env python
"""Convert public medical datasets to medcap's sharegpt JSON (the reference's output files).

    python tools/convert_to_sharegpt.py --dataset {pmcoa,vqarad,textplus} \
        --data_dir ./datasets --save_dir ./datasets/medcap [--instruction none|random|fixed]

Input layouts, outputs and the skip rules: see ``medcap/data/_convert.py``.
Prints one JSON summary line (files written, records skipped and why) on stdout;
exit status 1 when the required inputs are missing.
"""

import sys

from medcap.data import convert_main

if __name__ == "__main__":
    sys.exit(convert_main())
