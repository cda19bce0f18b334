"""``python -m gfocalv2.analyze``: see :mod:`gfocalv2.analyze`."""

import sys

from .cli import main

if __name__ == "__main__":
    main(sys.argv[1:])
