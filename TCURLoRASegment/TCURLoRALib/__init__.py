"""TCURLoRA engine: a frozen UNETR with selectable tCURLoRA adapters (Slicer-free; run as ``python -m TCURLoRALib``)."""
from __future__ import annotations

__version__ = "0.1.0"
