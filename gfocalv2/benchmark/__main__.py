"""``python -m gfocalv2.benchmark``: see :mod:`gfocalv2.benchmark`."""

import sys

from .cli import main

if __name__ == "__main__":
    main(sys.argv[1:])
