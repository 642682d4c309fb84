"""Names of the tCURLoRA settings, importable without torch (cards and the Slicer panels read them)."""
from __future__ import annotations

__all__ = ["GROUP_NAMES", "INITS", "SELECTION_RULES"]

GROUP_NAMES = ("attention", "mlp_up", "mlp_down")
"""The ViT weight groups, see :mod:`.groups`."""
INITS = ("pinv", "zero")
"""Initialisations of U, see :class:`.config.TCURLoRAConfig`."""
SELECTION_RULES = ("topk", "inverse_sampling")
"""Slice selection rules, see :mod:`.cur`."""
