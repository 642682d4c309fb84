"""``python -m TCURLoRALib``: the command-line program that the Slicer panels run in the background."""
from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
