"""Adapter files on a loaded base, and switching adapters without reloading the base.

An adapter file (see :mod:`TCURLoRALib.files`) holds, under these tensor names:

- ``tcur.<group>.rows``, ``.cols`` (``I`` and ``J``), ``.u_init`` (``U0``) and ``.u`` for each adapted group;
- the trained decoder blocks under their UNETR names (``decoder5.*`` .. ``decoder2.*``);
- the output head (``out.*``) when the adapter's labels differ from the base's.

``C`` and ``R`` are not stored: they are slices of the base weights, read again from the base on load.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch
from monai.networks.blocks import UnetOutBlock
from torch import nn

from . import files, tensorfiles
from .basemodel import BaseModel
from .cards import AdapterCard, Label, check_adapter_matches_base
from .store import resolve_adapter
from .tcur import DECODER_BLOCKS, HEAD, TCURLoRAConfig, TCURLoRAModel

__all__ = ["AdaptedUNETR", "adapter_file_bytes", "adapter_tensors", "attach_head", "read_adapter", "save_adapter"]

GROUP_PREFIX = "tcur."
GROUP_KEYS = ("rows", "cols", "u_init", "u")


def _is_decoder(name: str) -> bool:
    return name.split(".", 1)[0] in DECODER_BLOCKS


def _is_head(name: str) -> bool:
    return name.split(".", 1)[0] == HEAD


def attach_head(base: nn.Module, labels: list[Label]) -> nn.Module:
    """Give ``base`` a fresh output head for ``labels`` (one channel a label); returns the head it had."""
    previous = base.out
    in_channels = previous.conv.conv.in_channels
    base.out = UnetOutBlock(spatial_dims=3, in_channels=in_channels, out_channels=len(labels)).to(
        previous.conv.conv.weight.device
    )
    return previous


def adapter_tensors(model: TCURLoRAModel, include_head: bool) -> dict[str, torch.Tensor]:
    """The tensors an adapter file holds for ``model`` (see the module docstring for the names)."""
    tensors = {
        f"{GROUP_PREFIX}{group}.{key}": value.detach()
        for group, state in model.group_state().items()
        for key, value in state.items()
    }
    for name, value in model.base.state_dict().items():
        if _is_decoder(name) or (include_head and _is_head(name)):
            tensors[name] = value.detach()
    return tensors


def adapter_file_bytes(model: TCURLoRAModel, include_head: bool) -> int:
    """Bytes of the tensors an adapter file of ``model`` holds (the file adds a header of a few kB)."""
    return sum(value.numel() * value.element_size() for value in adapter_tensors(model, include_head).values())


def save_adapter(path: str | os.PathLike, model: TCURLoRAModel, card: AdapterCard, include_head: bool) -> Path:
    """Write the adapter of ``model`` with ``card`` atomically."""
    return tensorfiles.save_atomic(path, adapter_tensors(model, include_head), card.to_json(), kind="adapter")


def read_adapter(path: str | os.PathLike, base: BaseModel) -> tuple[dict[str, torch.Tensor], AdapterCard]:
    """Load an adapter file made for ``base`` and check it: fingerprint, tensor names and shapes.

    Raises:
        AdapterMismatchError: the adapter was trained on another base (both fingerprints and names are given).
        TCURLoRAFileError: a missing, truncated or foreign file, or tensors that do not fit its card or the base.
    """
    tensors, card_json = tensorfiles.load(path, kind="adapter")
    card = AdapterCard.from_json(card_json)
    check_adapter_matches_base(card, base.card)
    expected_groups = {f"{GROUP_PREFIX}{group}.{key}" for group in card.groups for key in GROUP_KEYS}
    stored_groups = {name for name in tensors if name.startswith(GROUP_PREFIX)}
    if stored_groups != expected_groups:
        raise files.TCURLoRAFileError(
            f"adapter {str(path)!r} declares groups {card.groups} but holds tensors {sorted(stored_groups)}"
        )
    base_state = base.model.state_dict()
    decoder_names = {name for name in base_state if _is_decoder(name)}
    missing = sorted(decoder_names - set(tensors))
    if missing:
        raise files.TCURLoRAFileError(f"adapter {str(path)!r} lacks decoder weights {missing[:3]}")
    has_head = any(_is_head(name) for name in tensors)
    base_labels = [label.to_json() for label in base.card.labels]
    if not has_head and [label.to_json() for label in card.labels] != base_labels:
        raise files.TCURLoRAFileError(
            f"adapter {str(path)!r} has labels other than its base's but no output head"
        )
    for name in decoder_names:
        if tuple(tensors[name].shape) != tuple(base_state[name].shape):
            raise files.TCURLoRAFileError(
                f"adapter {str(path)!r}: {name} has shape {tuple(tensors[name].shape)}, "
                f"the base needs {tuple(base_state[name].shape)}"
            )
    unknown = sorted(set(tensors) - expected_groups - decoder_names - {n for n in tensors if _is_head(n)})
    if unknown:
        raise files.TCURLoRAFileError(f"adapter {str(path)!r} holds unexpected tensors {unknown[:5]}")
    # A digest proves the file is as written, not that what was written is usable: NaN weights give an all-background
    # segmentation, so they are refused here, before anything is merged.
    for name, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            count = int((~torch.isfinite(value)).sum())
            raise files.TCURLoRAFileError(f"adapter {str(path)!r} holds {count} non-finite values (NaN or infinity) "
                                          f"in {name!r}: it cannot be used; retrain it")
    return tensors, card


def group_state_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{group: {"rows", "cols", "u_init", "u"}}`` out of an adapter's tensors."""
    state: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith(GROUP_PREFIX):
            group, key = name[len(GROUP_PREFIX):].rsplit(".", 1)
            state.setdefault(group, {})[key] = value
    return state


class AdaptedUNETR:
    """A loaded base with at most one adapter at a time, merged into the weights for inference.

    Switching adapters unmerges the previous one, restores the base's own decoder and head (kept in memory) and
    merges the next one: the base file is read once.

    Args:
        base: the loaded base model (its UNETR is modified in place while an adapter is active).
    """

    def __init__(self, base: BaseModel):
        self.base = base
        self.adapter: TCURLoRAModel | None = None
        self.adapter_card: AdapterCard | None = None
        self._base_head = base.model.out
        self._base_decoder = {
            name: value.detach().clone() for name, value in base.model.state_dict().items() if _is_decoder(name)
        }

    @property
    def model(self) -> nn.Module:
        """The network to run: ``B x in_channels x D x H x W`` -> logits ``B x len(labels) x D x H x W``."""
        return self.base.model

    @property
    def labels(self) -> list[Label]:
        return self.adapter_card.labels if self.adapter_card else self.base.card.labels

    @torch.no_grad()
    def set_adapter(self, adapter: str | os.PathLike | None) -> AdapterCard | None:
        """Activate an adapter (checked against the base first): its file, or its name in the store
        (:func:`TCURLoRALib.store.resolve_adapter`); ``None`` or ``"none"`` for the base alone.

        On an error the previous state is kept: the new file is read and checked before anything changes.
        """
        path = resolve_adapter(adapter)
        loaded = read_adapter(path, self.base) if path is not None else None
        self._clear()
        if loaded is None:
            return None
        tensors, card = loaded
        unetr = self.base.model
        device = next(unetr.parameters()).device
        tensors = {name: value.to(device) for name, value in tensors.items()}
        if any(_is_head(name) for name in tensors):
            attach_head(unetr, card.labels)
        unetr.load_state_dict({n: v for n, v in tensors.items() if _is_decoder(n) or _is_head(n)}, strict=False)
        if card.groups:
            config = TCURLoRAConfig(rank=card.rank, groups=tuple(card.groups), init=card.init)
            self.adapter = TCURLoRAModel(unetr, config, group_state=group_state_of(tensors))
            self.adapter.merge()
        unetr.eval().requires_grad_(False)
        self.adapter_card = card
        return card

    def _clear(self) -> None:
        unetr = self.base.model
        if self.adapter is not None:
            self.adapter.unload()
            self.adapter = None
        unetr.out = self._base_head
        unetr.load_state_dict(self._base_decoder, strict=False)
        self.adapter_card = None
