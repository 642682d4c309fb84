"""Core math of tCURLoRA (torch only): the t-product, tensor CUR, and the adapter on a UNETR's ViT."""
from __future__ import annotations

from .config import INITS, TCURLoRAConfig
from .cur import SELECTION_RULES, TensorCUR, select_slices, slice_scores, tensor_cur
from .groups import GROUP_NAMES, LinearSite, group_sites, stack_group, vit_blocks
from .layer import TCURGroup, TCURLinear
from .model import DECODER_BLOCKS, HEAD, ParameterCounts, TCURLoRAModel
from .tproduct import from_fourier, t_identity, t_pinv, t_product, t_transpose, to_fourier

__all__ = [
    "DECODER_BLOCKS", "GROUP_NAMES", "HEAD", "INITS", "SELECTION_RULES", "LinearSite", "ParameterCounts",
    "TCURGroup", "TCURLinear", "TCURLoRAConfig", "TCURLoRAModel", "TensorCUR", "from_fourier", "group_sites",
    "select_slices", "slice_scores", "stack_group", "t_identity", "t_pinv", "t_product", "t_transpose",
    "tensor_cur", "to_fourier", "vit_blocks",
]
