"""``python -m medcap.data FILE ...`` = ``medcap validate-data FILE ...``."""

import sys

from medcap._cmdline import quiet_broken_pipe
from medcap.data import validate_main

if __name__ == "__main__":
    sys.exit(quiet_broken_pipe(validate_main))
