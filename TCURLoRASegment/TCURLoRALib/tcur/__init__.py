"""Core math of tCURLoRA (torch only): the t-product, tensor CUR, and the adapter on a UNETR's ViT.

Names are resolved on first use (PEP 562), so that ``tcur.names`` and ``tcur.config`` import without torch.
"""
from __future__ import annotations

import importlib
from typing import Any

from .config import TCURLoRAConfig
from .names import GROUP_NAMES, INITS, SELECTION_RULES

_LAZY = {
    "TensorCUR": "cur", "select_slices": "cur", "slice_scores": "cur", "tensor_cur": "cur",
    "LinearSite": "groups", "group_sites": "groups", "stack_group": "groups", "vit_blocks": "groups",
    "TCURGroup": "layer", "TCURLinear": "layer",
    "DECODER_BLOCKS": "model", "HEAD": "model", "ParameterCounts": "model", "TCURLoRAModel": "model",
    "ROUTES": "routes", "choose_route": "routes", "route_costs": "routes",
    "from_fourier": "tproduct", "t_identity": "tproduct", "t_pinv": "tproduct", "t_product": "tproduct",
    "t_transpose": "tproduct", "to_fourier": "tproduct",
}

__all__ = sorted(["GROUP_NAMES", "INITS", "SELECTION_RULES", "TCURLoRAConfig", *_LAZY])


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
