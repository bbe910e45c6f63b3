"""``python -m medcap.data FILE ...`` = ``medcap validate-data FILE ...``."""

import sys

from medcap.data import validate_main

if __name__ == "__main__":
    sys.exit(validate_main())
