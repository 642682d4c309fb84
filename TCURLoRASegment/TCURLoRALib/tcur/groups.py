"""The weight groups of a ViT that tCURLoRA stacks into third-order tensors.

For a ViT of ``L`` transformer blocks, hidden size ``h`` and MLP size ``m`` (MONAI's ``ViT`` inside ``UNETR``):

- ``attention``: the q, k and v row blocks of each fused ``attn.qkv`` weight and each ``attn.out_proj`` weight,
  in the order q_0, k_0, v_0, out_0, q_1, ...: a tensor ``h x h x 4L``;
- ``mlp_up``: each ``mlp.linear1`` weight: ``m x h x L``;
- ``mlp_down``: each ``mlp.linear2`` weight: ``h x m x L``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .names import GROUP_NAMES

__all__ = ["GROUP_NAMES", "LinearSite", "group_sites", "stack_group", "vit_blocks"]


@dataclass(frozen=True)
class LinearSite:
    """Where one ``nn.Linear`` sits in a group: its weight is frontal slices ``start .. stop-1`` stacked on rows.

    Attributes:
        path: dotted module path inside the model, e.g. ``"vit.blocks.3.attn.qkv"``.
        start: first frontal slice of the group tensor that this Linear holds.
        stop: one past the last one (``stop - start`` is 3 for a fused qkv, 1 otherwise).
    """

    path: str
    start: int
    stop: int

    def take(self, frontal_slices: Sequence[torch.Tensor]) -> torch.Tensor:
        """This Linear's weight out of a group's frontal slices (``n3`` tensors ``n1 x n2``, e.g. ``W.unbind(-1)``).

        Returns:
            shape ``((stop - start) * n1) x n2``.
        """
        if self.stop - self.start == 1:
            return frontal_slices[self.start]
        return torch.cat(frontal_slices[self.start : self.stop], dim=0)


def vit_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a UNETR-like model (``model.vit.blocks``), checked for the layers tCURLoRA adapts."""
    vit = getattr(model, "vit", None)
    blocks = getattr(vit, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ValueError(
            f"{type(model).__name__} has no ViT blocks at 'vit.blocks': tCURLoRA expects a MONAI UNETR "
            "(monai.networks.nets.UNETR)."
        )
    for index, block in enumerate(blocks):
        for attribute in ("attn.qkv", "attn.out_proj", "mlp.linear1", "mlp.linear2"):
            if not _has_submodule(block, attribute):
                raise ValueError(f"ViT block {index} has no Linear layer '{attribute}'; expected a MONAI TransformerBlock.")
    return blocks


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def _linear_weight(model: nn.Module, path: str) -> torch.Tensor:
    layer = model.get_submodule(path)
    # An injected adapter wraps the original Linear as ``base_layer``.
    layer = getattr(layer, "base_layer", layer)
    if not isinstance(layer, nn.Linear):
        raise ValueError(f"'{path}' is a {type(layer).__name__}, expected torch.nn.Linear.")
    return layer.weight


def group_sites(model: nn.Module, group: str) -> list[LinearSite]:
    """The Linear layers of ``group`` in slice order.

    Raises:
        ValueError: for an unknown group name, a model without ViT blocks, or a fused qkv whose rows are not
            three times the hidden size.
    """
    if group not in GROUP_NAMES:
        raise ValueError(f"unknown weight group {group!r}; expected one of {GROUP_NAMES}.")
    blocks = vit_blocks(model)
    sites = []
    for layer_index in range(len(blocks)):
        prefix = f"vit.blocks.{layer_index}"
        if group == "attention":
            qkv_path = f"{prefix}.attn.qkv"
            qkv = _linear_weight(model, qkv_path)
            if qkv.shape[0] != 3 * qkv.shape[1]:
                raise ValueError(
                    f"'{qkv_path}' has weight shape {tuple(qkv.shape)}; a fused qkv of a square attention needs "
                    f"{3 * qkv.shape[1]} rows."
                )
            sites.append(LinearSite(qkv_path, 4 * layer_index, 4 * layer_index + 3))
            sites.append(LinearSite(f"{prefix}.attn.out_proj", 4 * layer_index + 3, 4 * layer_index + 4))
        elif group == "mlp_up":
            sites.append(LinearSite(f"{prefix}.mlp.linear1", layer_index, layer_index + 1))
        else:
            sites.append(LinearSite(f"{prefix}.mlp.linear2", layer_index, layer_index + 1))
    return sites


def stack_group(model: nn.Module, sites: list[LinearSite]) -> torch.Tensor:
    """Stack the weights of ``sites`` into the group tensor ``n1 x n2 x n3`` (a detached copy).

    Raises:
        ValueError: when the slices do not all have one shape (both shapes are named).
    """
    slices: list[torch.Tensor] = []
    for site in sites:
        weight = _linear_weight(model, site.path).detach()
        count = site.stop - site.start
        slices.extend(weight.reshape(count, weight.shape[0] // count, weight.shape[1]).unbind(0))
    first = slices[0].shape
    for site_slice in slices:
        if site_slice.shape != first:
            raise ValueError(f"weight slices of one group must share a shape, got {tuple(first)} and {tuple(site_slice.shape)}.")
    return torch.stack(slices, dim=-1)
