"""TCURLoRA files with their tensors: written atomically with a digest, read from one open file and verified.

The container (header, card, digest rule) is :mod:`TCURLoRALib.files`, which needs no torch; this module adds the
tensors (``dict[str, torch.Tensor]``), generic over which tensors a base or an adapter holds. Nothing here uses
pickle.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import safetensors
import safetensors.torch
import torch

from . import files
from .outputs import atomic_write

__all__ = ["digest", "fingerprint", "load", "save_atomic"]

_FINGERPRINT_TAG = b"tcurlora-fingerprint-v1\n"
# torch dtypes by their safetensors names (what a file's header says), for the digest of tensors in memory.
_SAFETENSORS_DTYPES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32",
    torch.int64: "I64", torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
    **{getattr(torch, name): code for name, code in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"),
                                                     ("float8_e5m2", "F8_E5M2"), ("float8_e4m3fn", "F8_E4M3"))
       if hasattr(torch, name)},
}


def save_atomic(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], card: Mapping[str, Any],
                kind: str, *, overwrite: bool = True) -> Path:
    """Writes ``tensors`` and ``card`` to ``path`` atomically, with the digest of the tensors in its metadata.

    Args:
        path: destination file (``*.safetensors`` by convention); its folder must exist.
        tensors: name -> dense tensor, any shape and dtype, any device (copied to CPU for writing). Tensors sharing
            storage are written as separate copies.
        card: a JSON-serialisable mapping (no NaN or infinity: strict JSON), stored under the ``"card"`` key.
        kind: ``"base"`` or ``"adapter"``.
        overwrite: replace an existing file (default); False refuses one, also one that appears while writing.

    Returns:
        The destination path.

    Raises:
        ValueError: bad ``kind``, a tensor name that is not a non-empty string, a value that is not a dense tensor,
            or a card that is not a JSON object.
        FileNotFoundError: the destination folder does not exist.
        OutputError: a shipped destination, or an existing file with ``overwrite=False``.
        Anything raised while writing (OSError, KeyboardInterrupt, ...) propagates after the temporary file is
        removed; an existing file at ``path`` is then left untouched.
    """
    prepared = _prepare_tensors(tensors)
    metadata = files.metadata_for(kind, card, digest(prepared))
    return atomic_write(path, lambda temporary: _write_tensors(temporary, prepared, metadata), overwrite=overwrite,
                        what=f"{kind} file")


def load(path: str | os.PathLike, kind: str, device: str | torch.device = "cpu"
         ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Loads all tensors and the card of a TCURLoRA file, read from one open file, its digest verified.

    Args:
        path: a TCURLoRA file.
        kind: the kind required, ``"base"`` or ``"adapter"``.
        device: where to put the tensors.

    Returns:
        ``(tensors, card)``: name -> tensor (same shapes and dtypes as saved), and the card dict.

    Raises:
        TCURLoRAFileNotFoundError, TCURLoRAFileError: see :func:`TCURLoRALib.files.read_whole` (missing, damaged,
            foreign, wrong kind or version, tensors that do not match the digest), or the safetensors reader failed.
    """
    contents = files.read_whole(path, kind)
    try:
        tensors = safetensors.torch.load(contents.data)
    except safetensors.SafetensorError as error:
        raise files.TCURLoRAFileError(f"cannot read tensors of {str(path)!r}: {error}") from error
    if torch.device(device).type != "cpu":
        tensors = {name: value.to(device) for name, value in tensors.items()}
    return tensors, contents.card


def digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """The digest a file of these tensors carries (:func:`TCURLoRALib.files.tensors_digest`)."""
    items = []
    for name in _check_names(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors files do not hold")
        items.append((name, _SAFETENSORS_DTYPES[tensor.dtype], list(tensor.shape), _raw_bytes(tensor)))
    return files.tensors_digest(items)


def fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a set of tensors, independent of dict order, device and memory layout: a base model's identity.

    Each tensor contributes, in sorted name order, a JSON line ``[name, dtype, shape, nbytes]`` (dtype as torch
    names it) followed by its raw bytes in C order (little-endian, as on every platform torch and safetensors
    support); the byte count in the line keeps the stream unambiguous.

    Args:
        tensors: name -> dense tensor.

    Returns:
        64 lowercase hex digits.

    Raises:
        ValueError: a name that is not a non-empty string or a value that is not a dense tensor.
    """
    hasher = hashlib.sha256(_FINGERPRINT_TAG)
    for name in sorted(_check_names(tensors)):
        tensor = tensors[name].detach().to("cpu").contiguous()
        data = _raw_bytes(tensor)
        line = json.dumps([name, str(tensor.dtype), list(tensor.shape), int(data.nbytes)])
        hasher.update(line.encode("utf-8") + b"\n")
        hasher.update(data)
    return hasher.hexdigest()


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, in C order."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def _write_tensors(temporary: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Writes the safetensors file; a separate function so tests can make the write fail half way."""
    safetensors.torch.save_file(tensors, temporary, metadata=metadata)


def _check_names(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    if not isinstance(tensors, Mapping):
        raise ValueError(f"tensors must be a dict of name -> tensor, got {type(tensors).__name__}")
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(f"tensor names must be non-empty strings other than '__metadata__', got {name!r}")
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
            raise ValueError(f"tensor {name!r} must be a dense torch.Tensor, got {type(tensor).__name__}"
                             + (f" with layout {tensor.layout}" if isinstance(tensor, torch.Tensor) else ""))
    return list(tensors)


def _prepare_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, and no two tensors on one storage (safetensors refuses shared storage)."""
    prepared: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name in _check_names(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if tensor.numel() and pointer in storages:
            tensor = tensor.clone()
        elif tensor.numel():
            storages.add(pointer)
        prepared[name] = tensor
    return prepared
