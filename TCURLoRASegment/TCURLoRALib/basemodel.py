"""Base models: a frozen MONAI UNETR in one safetensors file whose metadata holds its model card."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from monai.networks.nets import UNETR
from torch import nn

from . import files, tensorfiles
from .cards import ModelCard

__all__ = ["BaseModel", "build_unetr", "import_checkpoint", "load_base", "save_base"]


@dataclass
class BaseModel:
    """A loaded base: the frozen UNETR (eval mode, no gradients), its card and the file it came from."""

    model: UNETR
    card: ModelCard
    path: Path | None = None


def build_unetr(card: ModelCard) -> UNETR:
    """A UNETR with the card's constructor arguments and random weights."""
    return UNETR(**card.unetr_kwargs())


def weights_of(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's state dict as detached, contiguous CPU tensors: what a base file stores and fingerprints.

    Args:
        dtype: store floating-point tensors in this type (e.g. ``torch.float16`` halves the file); ``None`` keeps
            the model's.
    """
    weights = {}
    for name, value in model.state_dict().items():
        value = value.detach().to("cpu")
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        weights[name] = value.contiguous()
    return weights


def save_base(
    path: str | os.PathLike, model: nn.Module, card_fields: Mapping[str, Any], dtype: torch.dtype | None = None
) -> ModelCard:
    """Write ``model`` with a card made of ``card_fields`` plus the fingerprint of the weights (atomically).

    Args:
        path: destination ``.safetensors`` file.
        model: a plain MONAI UNETR (no adapter injected).
        card_fields: every :class:`ModelCard` field but ``fingerprint`` (a given one is replaced).
        dtype: storage type of floating-point weights (``torch.float16`` for shipped files); they load as float32.

    Returns:
        the card written.
    """
    weights = weights_of(model, dtype)
    card = ModelCard.from_json({**dict(card_fields), "fingerprint": tensorfiles.fingerprint(weights)})
    tensorfiles.save_atomic(path, weights, card.to_json(), kind="base")
    return card


def _frozen(model: UNETR) -> UNETR:
    model.eval()
    model.requires_grad_(False)
    return model


def load_base(path: str | os.PathLike, device: str | torch.device = "cpu") -> BaseModel:
    """Load a base-model file into a frozen UNETR on ``device``.

    Raises:
        TCURLoRAFileError: the file is missing, damaged, foreign, an adapter, or its weights do not match the
            fingerprint in its card.
        CardError: the card is invalid.
    """
    tensors, card_json = tensorfiles.load(path, kind="base")
    card = ModelCard.from_json(card_json)
    actual = tensorfiles.fingerprint(tensors)
    if actual != card.fingerprint:
        raise files.TCURLoRAFileError(
            f"the weights in {str(path)!r} do not match the fingerprint of its card (card {card.fingerprint}, "
            f"weights {actual}): the file is damaged or was edited"
        )
    model = build_unetr(card)
    _load_weights(model, tensors, str(path))
    return BaseModel(model=_frozen(model.to(device)), card=card, path=Path(path))


def _load_weights(model: nn.Module, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"weights of {source} do not fit the UNETR of its card: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    wrong = [(name, tuple(tensors[name].shape), tuple(value.shape)) for name, value in expected.items()
             if tuple(tensors[name].shape) != tuple(value.shape)]
    if wrong:
        name, got, want = wrong[0]
        raise ValueError(f"weight {name!r} of {source} has shape {got}, the card's UNETR needs {want}")
    model.load_state_dict(dict(tensors), strict=True)


def _unwrap_checkpoint(checkpoint: Any, source: str) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "model_state_dict", "network"):
        if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    if not isinstance(checkpoint, Mapping) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError(f"{source} holds no state dict of tensors (also looked under 'state_dict' and 'model')")
    prefix = "module."
    return {(name[len(prefix):] if name.startswith(prefix) else name): value for name, value in checkpoint.items()}


def import_checkpoint(
    checkpoint_path: str | os.PathLike, card_fields: Mapping[str, Any] | str | os.PathLike, out_path: str | os.PathLike
) -> ModelCard:
    """Convert a MONAI UNETR checkpoint (``.pt``/``.pth`` state dict) and a JSON card into a base-model file.

    The checkpoint is read with ``torch.load(weights_only=True)``: no pickled code runs. A ``state_dict``/``model``
    wrapper and ``module.`` prefixes (DataParallel) are taken off.

    Args:
        checkpoint_path: the checkpoint.
        card_fields: the card without fingerprint, as a mapping, a JSON string, or the path of a JSON file.
        out_path: the base-model file to write.
    """
    if not Path(checkpoint_path).is_file():
        raise FileNotFoundError(f"checkpoint {str(checkpoint_path)!r} does not exist")
    if isinstance(card_fields, (str, os.PathLike)) and Path(card_fields).is_file():
        card_fields = json.loads(Path(card_fields).read_text(encoding="utf-8"))
    elif isinstance(card_fields, str):
        card_fields = json.loads(card_fields)
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    weights = _unwrap_checkpoint(checkpoint, str(checkpoint_path))
    placeholder = {**dict(card_fields), "fingerprint": "0" * 64}
    model = build_unetr(ModelCard.from_json(placeholder))
    _load_weights(model, weights, str(checkpoint_path))
    return save_base(out_path, model, card_fields)
