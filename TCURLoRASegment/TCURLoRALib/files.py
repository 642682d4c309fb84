"""TCURLoRA files: safetensors files whose header metadata carries one JSON card.

A TCURLoRA file is a plain safetensors file (8-byte little-endian header length, a JSON header, then the raw tensor
bytes) whose ``__metadata__`` holds exactly these string entries:

- ``"format"``: ``"tcurlora-base"`` (frozen base model) or ``"tcurlora-adapter"`` (one adapter);
- ``"format_version"``: the container version as a decimal string (this module writes :data:`FORMAT_VERSION`);
- ``"card"``: the card as one JSON object (its schema belongs to :mod:`TCURLoRALib.cards`; this layer only needs it
  to be a JSON object).

This layer is generic over tensors (``dict[str, torch.Tensor]``): which tensors a base or an adapter holds is decided
elsewhere. Nothing here uses pickle.

Writes are atomic: the file is written to a hidden temporary file in the destination folder, flushed to disk, then
renamed over the destination, so a cancelled or crashed job leaves either the old file or the new one, never half of
one.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any, Mapping

import safetensors
import safetensors.torch
import torch

FORMAT_VERSION = 1
"""Container version written by :func:`save_atomic`; files with a higher version are refused."""

KINDS = ("base", "adapter")
FORMAT_KEY = "format"
VERSION_KEY = "format_version"
CARD_KEY = "card"
_FORMAT_PREFIX = "tcurlora-"

# safetensors itself refuses headers above 100 MB; a larger length field means a corrupt or foreign file.
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_FINGERPRINT_TAG = b"tcurlora-fingerprint-v1\n"

# Bytes per element of the safetensors dtype names, to check each tensor's byte range against its shape.
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}


class TCURLoRAFileError(ValueError):
    """A file is missing, damaged, foreign, of the wrong kind, or of an unsupported version."""


class TCURLoRAFileNotFoundError(TCURLoRAFileError, FileNotFoundError):
    """The file does not exist (caught by both ``except FileNotFoundError`` and ``except TCURLoRAFileError``)."""


def format_name(kind: str) -> str:
    """Returns the ``"format"`` metadata value for ``kind`` (``"base"`` -> ``"tcurlora-base"``).

    Raises:
        ValueError: ``kind`` is not one of :data:`KINDS`.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return _FORMAT_PREFIX + kind


def save_atomic(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], card: Mapping[str, Any],
                kind: str) -> Path:
    """Writes ``tensors`` and ``card`` to ``path`` atomically, replacing any existing file.

    Args:
        path: destination file (``*.safetensors`` by convention); its folder must exist.
        tensors: name -> dense tensor, any shape and dtype, any device (copied to CPU for writing). Tensors sharing
            storage are written as separate copies.
        card: a JSON-serialisable mapping (no NaN or infinity: strict JSON), stored under the ``"card"`` key.
        kind: ``"base"`` or ``"adapter"``.

    Returns:
        The destination path.

    Raises:
        ValueError: bad ``kind``, a tensor name that is not a non-empty string, a value that is not a dense tensor,
            or a card that is not a JSON object.
        FileNotFoundError: the destination folder does not exist.
        Anything raised while writing (OSError, KeyboardInterrupt, ...) propagates after the temporary file is
        removed; an existing file at ``path`` is then left untouched.
    """
    metadata = {FORMAT_KEY: format_name(kind), VERSION_KEY: str(FORMAT_VERSION), CARD_KEY: _card_to_text(card)}
    prepared = _prepare_tensors(tensors)
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write {str(path)!r}: folder {str(folder)!r} does not exist")
    # A hidden name in the same folder: os.replace is only atomic within one file system, and listings skip it.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        _write_tensors(tmp_name, prepared, metadata)
        _fsync_file(tmp_name)
        # mkstemp creates the file as 0600; keep the permissions of the file we replace, else the usual 0644.
        os.chmod(tmp_name, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(folder)
    return path


def read_card(path: str | os.PathLike, kind: str | None = None) -> dict[str, Any]:
    """Reads the card of a TCURLoRA file from its header only (tensor bytes are not read).

    Args:
        path: a file written by :func:`save_atomic`.
        kind: ``"base"`` or ``"adapter"`` to require that kind, or None to accept either.

    Returns:
        The card as a dict.

    Raises:
        TCURLoRAFileNotFoundError: no such file.
        TCURLoRAFileError: a truncated or corrupt file, a safetensors file without TCURLoRA metadata, the wrong
            kind, or a format version newer than :data:`FORMAT_VERSION`.
    """
    return read_info(path, kind)[1]


def read_info(path: str | os.PathLike, kind: str | None = None) -> tuple[str, dict[str, Any]]:
    """Like :func:`read_card`, but returns ``(kind, card)``: for listings that hold both kinds of file."""
    path = Path(path)
    if kind is not None:
        format_name(kind)
    _entries, metadata = _read_header(path)
    return _check_metadata(path, metadata, kind)


def load(path: str | os.PathLike, kind: str, device: str | torch.device = "cpu"
         ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Loads all tensors and the card of a TCURLoRA file.

    The header is validated first (see :func:`read_card`), so a damaged or foreign file fails with a message naming
    the problem before any tensor is read.

    Args:
        path: a file written by :func:`save_atomic`.
        kind: the kind required, ``"base"`` or ``"adapter"``.
        device: where to put the tensors.

    Returns:
        ``(tensors, card)``: name -> tensor (same shapes and dtypes as saved), and the card dict.

    Raises:
        TCURLoRAFileNotFoundError, TCURLoRAFileError: as :func:`read_card`, or the safetensors reader failed.
    """
    path = Path(path)
    format_name(kind)
    _entries, metadata = _read_header(path)
    _kind, card = _check_metadata(path, metadata, kind)
    try:
        with safetensors.safe_open(str(path), framework="pt", device=str(device)) as reader:
            tensors = {name: reader.get_tensor(name) for name in reader.keys()}
    except safetensors.SafetensorError as error:
        raise TCURLoRAFileError(f"cannot read tensors of {str(path)!r}: {error}") from error
    return tensors, card


def fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a set of tensors, independent of dict order, device and memory layout.

    Each tensor contributes, in sorted name order, a JSON line ``[name, dtype, shape, nbytes]`` followed by its raw
    bytes in C order (little-endian, as on every platform torch and safetensors support); the byte count in the line
    keeps the stream unambiguous.

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
        data = tensor.reshape(-1).view(torch.uint8).numpy()
        line = json.dumps([name, str(tensor.dtype), list(tensor.shape), int(data.nbytes)])
        hasher.update(line.encode("utf-8") + b"\n")
        hasher.update(memoryview(data))
    return hasher.hexdigest()


def _write_tensors(tmp_name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Writes the safetensors file; a separate function so tests can make the write fail half way."""
    safetensors.torch.save_file(tensors, tmp_name, metadata=metadata)


def _fsync_file(name: str) -> None:
    with open(name, "rb+") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    """Makes the rename durable; folders cannot be opened on Windows, where there is nothing to do."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _card_to_text(card: Mapping[str, Any]) -> str:
    if not isinstance(card, Mapping):
        raise ValueError(f"card must be a dict, got {type(card).__name__}: {card!r:.200}")
    try:
        return json.dumps(dict(card), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"card is not strict JSON (NaN and infinity not allowed, use null): {error}") from error


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


def _read_header(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Reads and checks a safetensors header: returns (tensor entries, ``__metadata__``)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise TCURLoRAFileError(f"{str(path)!r} is truncated or not a safetensors file: "
                                        f"{size} bytes, shorter than the 8-byte header length")
            (length,) = struct.unpack("<Q", head)
            if length > _MAX_HEADER_BYTES or 8 + length > size:
                raise TCURLoRAFileError(f"{str(path)!r} is truncated or not a safetensors file: its header claims "
                                        f"{length} bytes but the file holds only {size} bytes")
            raw = handle.read(length)
    except FileNotFoundError as error:
        raise TCURLoRAFileNotFoundError(f"no such file: {str(path)!r}") from error
    except IsADirectoryError as error:
        raise TCURLoRAFileError(f"{str(path)!r} is a folder, not a file") from error
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TCURLoRAFileError(f"{str(path)!r} is corrupt or not a safetensors file: "
                                f"its header is not JSON ({error})") from error
    if not isinstance(header, dict):
        raise TCURLoRAFileError(f"{str(path)!r} is corrupt: its header is a {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise TCURLoRAFileError(f"{str(path)!r} is corrupt: '__metadata__' is not an object")
    _check_data_region(path, header, size - 8 - length)
    return header, metadata


def _check_data_region(path: Path, entries: dict[str, Any], data_bytes: int) -> None:
    """Checks that the tensors' byte ranges tile the data region exactly (a cut file ends early)."""
    spans = []
    for name, entry in entries.items():
        try:
            begin, end = (int(x) for x in entry["data_offsets"])
            shape = [int(x) for x in entry["shape"]]
            dtype = str(entry["dtype"])
        except (KeyError, TypeError, ValueError) as error:
            raise TCURLoRAFileError(f"{str(path)!r} is corrupt: bad header entry for tensor {name!r}: "
                                    f"{entry!r:.200}") from error
        if end > data_bytes:
            raise TCURLoRAFileError(f"{str(path)!r} is truncated: tensor {name!r} ends at data byte {end}, but only "
                                    f"{data_bytes} data bytes are in the file")
        count = 1
        for extent in shape:
            count *= extent
        if dtype in _DTYPE_BYTES and (begin > end or end - begin != count * _DTYPE_BYTES[dtype]):
            raise TCURLoRAFileError(f"{str(path)!r} is corrupt: tensor {name!r} ({dtype}, shape {shape}) has byte "
                                    f"range [{begin}, {end})")
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise TCURLoRAFileError(f"{str(path)!r} is corrupt: tensor {name!r} starts at data byte {begin}, "
                                    f"expected {position}")
        position = end
    if position != data_bytes:
        raise TCURLoRAFileError(f"{str(path)!r} is corrupt: tensors cover {position} data bytes but the file holds "
                                f"{data_bytes}")


def _check_metadata(path: Path, metadata: Mapping[str, str], kind: str | None) -> tuple[str, dict[str, Any]]:
    """Checks our three metadata entries; returns ``(kind, card)``."""
    fmt = metadata.get(FORMAT_KEY)
    if fmt is None:
        raise TCURLoRAFileError(f"{str(path)!r} is a safetensors file but not a TCURLoRA file: its metadata has no "
                                f"{FORMAT_KEY!r} entry (metadata keys: {sorted(metadata)})")
    found = fmt[len(_FORMAT_PREFIX):] if fmt.startswith(_FORMAT_PREFIX) else None
    if found not in KINDS:
        raise TCURLoRAFileError(f"{str(path)!r} is not a TCURLoRA file: unknown format {fmt!r}, expected one of "
                                f"{[format_name(k) for k in KINDS]}")
    if kind is not None and found != kind:
        raise TCURLoRAFileError(f"{str(path)!r} is a TCURLoRA {found} file, but a TCURLoRA {kind} file was expected")
    version_text = metadata.get(VERSION_KEY)
    try:
        version = int(version_text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        version = None
    if version is None or version < 1:
        raise TCURLoRAFileError(f"{str(path)!r} has an invalid {VERSION_KEY} {version_text!r}")
    if version > FORMAT_VERSION:
        raise TCURLoRAFileError(f"{str(path)!r} has {VERSION_KEY} {version}, newer than the {FORMAT_VERSION} this "
                                f"version of TCURLoRA reads: update the extension")
    text = metadata.get(CARD_KEY)
    if text is None:
        raise TCURLoRAFileError(f"{str(path)!r} has no {CARD_KEY!r} entry in its metadata")
    try:
        card = json.loads(text)
    except json.JSONDecodeError as error:
        raise TCURLoRAFileError(f"{str(path)!r} has a card that is not JSON: {error}") from error
    if not isinstance(card, dict):
        raise TCURLoRAFileError(f"{str(path)!r} has a card that is a {type(card).__name__}, not a JSON object")
    return found, card
