"""``python -m amorsize``: the same command line as the ``amorsize`` console script."""

from __future__ import annotations

import sys

from amorsize.cli import main

if __name__ == "__main__":
    sys.exit(main())
