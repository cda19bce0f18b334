"""``python -m gfocalv2.convert``: see :mod:`gfocalv2.convert`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
