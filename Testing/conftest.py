"""Puts ``TCURLoRASegment/`` on the import path, as Slicer and the background process do."""
from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "TCURLoRASegment"))
