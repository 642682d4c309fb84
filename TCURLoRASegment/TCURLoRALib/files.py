"""TCURLoRA files, torch-free: the header, the card, and the digest of the tensors, read from the file's bytes.

A TCURLoRA file is a plain safetensors file (8-byte little-endian header length, a JSON header, then the raw tensor
bytes) whose ``__metadata__`` holds exactly these string entries:

- ``"format"``: ``"tcurlora-base"`` (frozen base model) or ``"tcurlora-adapter"`` (one adapter);
- ``"format_version"``: the container version as a decimal string (:data:`FORMAT_VERSION` is written);
- ``"card"``: the card as one JSON object (its schema belongs to :mod:`TCURLoRALib.cards`; this layer only needs it
  to be a JSON object);
- ``"tensors_sha256"`` (format version 2 and later): the digest of the file's own tensors (:func:`tensors_digest`),
  checked whenever the tensors are read, so that a damaged file is refused instead of giving wrong results.

Format version 1 files carry no digest. A version 1 base model is checked by the fingerprint in its card, as every
base is; a version 1 adapter is read as a legacy file whose tensors cannot be checked (a warning says so).

Reading a card or listing files needs only this module (no torch): :mod:`TCURLoRALib.tensorfiles` writes files and
reads their tensors. Nothing here uses pickle.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

FORMAT_VERSION = 2
"""Container version written by :func:`TCURLoRALib.tensorfiles.save_atomic`; higher versions are refused."""
DIGEST_SINCE = 2
"""First container version whose files must carry :data:`DIGEST_KEY`."""

KINDS = ("base", "adapter")
FORMAT_KEY = "format"
VERSION_KEY = "format_version"
CARD_KEY = "card"
DIGEST_KEY = "tensors_sha256"
_FORMAT_PREFIX = "tcurlora-"

# safetensors itself refuses headers above 100 MB; a larger length field means a corrupt or foreign file.
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_DIGEST_TAG = b"tcurlora-tensors-v1\n"

# Bytes per element of the safetensors dtype names, to check each tensor's byte range against its shape.
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
_log = logging.getLogger(__name__)


class TCURLoRAFileError(ValueError):
    """A file is missing, damaged, foreign, of the wrong kind, or of an unsupported version."""


class TCURLoRAFileNotFoundError(TCURLoRAFileError, FileNotFoundError):
    """The file does not exist (caught by both ``except FileNotFoundError`` and ``except TCURLoRAFileError``)."""


@dataclass(frozen=True)
class FileContents:
    """A whole TCURLoRA file read from one open file, its header checked and its digest verified.

    Attributes:
        path: the file read.
        kind: ``"base"`` or ``"adapter"``.
        card: the card.
        version: its ``format_version``.
        data: the whole file's bytes (a valid safetensors buffer: ``safetensors.torch.load(data)``).
        checked: whether a digest was verified (False only for format version 1 files).
    """

    path: Path
    kind: str
    card: dict
    version: int
    data: bytes
    checked: bool


def format_name(kind: str) -> str:
    """Returns the ``"format"`` metadata value for ``kind`` (``"base"`` -> ``"tcurlora-base"``).

    Raises:
        ValueError: ``kind`` is not one of :data:`KINDS`.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return _FORMAT_PREFIX + kind


def metadata_for(kind: str, card: Mapping[str, Any], digest: str) -> dict[str, str]:
    """The ``__metadata__`` of a new file: format, :data:`FORMAT_VERSION`, the card as strict JSON, the digest.

    Raises:
        ValueError: bad ``kind``, or a card that is not a JSON object of strict JSON (no NaN or infinity).
    """
    return {FORMAT_KEY: format_name(kind), VERSION_KEY: str(FORMAT_VERSION), CARD_KEY: _card_to_text(card),
            DIGEST_KEY: digest}


def read_card(path: str | os.PathLike, kind: str | None = None) -> dict[str, Any]:
    """Reads the card of a TCURLoRA file from its header only (tensor bytes are not read).

    Args:
        path: a TCURLoRA file.
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
    with _open(path) as handle:
        _entries, metadata, _length = _read_header(path, handle, os.fstat(handle.fileno()).st_size)
    return _check_metadata(path, metadata, kind)[:2]


def read_whole(path: str | os.PathLike, kind: str) -> FileContents:
    """Reads a whole TCURLoRA file from one open file and verifies the digest of its tensors.

    One open file, so a file replaced meanwhile (an atomic rename) gives the old version or the new one, never one's
    card with the other's tensors.

    Raises:
        TCURLoRAFileNotFoundError, TCURLoRAFileError: as :func:`read_card`; and a file whose tensors do not match
            its digest (damaged: the message says to copy it again or retrain), or a version 2 file without one.
    """
    path = Path(path)
    format_name(kind)
    with _open(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        entries, metadata, length = _read_header(path, handle, size)
        handle.seek(0)
        data = handle.read()
    if len(data) != size:
        raise TCURLoRAFileError(f"{str(path)!r} changed size while it was read ({size} -> {len(data)} bytes)")
    found, card, version = _check_metadata(path, metadata, kind)
    stored = metadata.get(DIGEST_KEY)
    if stored is None and version >= DIGEST_SINCE:
        raise TCURLoRAFileError(f"{str(path)!r} has no {DIGEST_KEY!r} entry, which format_version {version} files "
                                f"carry: the file is damaged or was edited; copy it again or retrain it")
    if stored is None:
        if found == "adapter":
            _log.warning("%s is a format_version %d adapter, written without a tensor digest: its tensors cannot be "
                         "checked for damage (re-save it with one by `adapters rename`, or retrain it)", path, version)
        return FileContents(path, found, card, version, data, checked=False)
    actual = tensors_digest(_raw_tensors(entries, memoryview(data)[8 + length:]))
    if actual != stored:
        raise TCURLoRAFileError(f"{str(path)!r} is damaged: its tensors do not match the digest it was written with "
                                f"(stored {stored}, now {actual}); copy the file again from where it came from, or "
                                f"retrain it")
    return FileContents(path, found, card, version, data, checked=True)


def tensors_digest(tensors: Iterable[tuple[str, str, Sequence[int], Any]]) -> str:
    """SHA-256 of a set of tensors given as ``(name, dtype, shape, raw bytes)``, independent of their order.

    ``dtype`` is the safetensors name (``"F32"``, ``"BF16"``, ``"BOOL"``, ...); the raw bytes are in C order,
    little-endian, as a safetensors file holds them (any bytes-like object). Each tensor contributes, in sorted
    name order, a JSON line ``[name, dtype, shape, nbytes]`` and its bytes (the byte count keeps the stream
    unambiguous). The same rule serves the writer, which has tensors, and the reader, which has the file's bytes.

    Returns:
        64 lowercase hex digits.
    """
    hasher = hashlib.sha256(_DIGEST_TAG)
    for name, dtype, shape, raw in sorted(tensors, key=lambda item: item[0]):
        view = memoryview(raw).cast("B")
        line = json.dumps([name, dtype, [int(n) for n in shape], view.nbytes])
        hasher.update(line.encode("utf-8") + b"\n")
        hasher.update(view)
    return hasher.hexdigest()


def _raw_tensors(entries: Mapping[str, Any], data: memoryview) -> list[tuple[str, str, list, memoryview]]:
    return [(name, str(entry["dtype"]), list(entry["shape"]),
             data[int(entry["data_offsets"][0]):int(entry["data_offsets"][1])])
            for name, entry in entries.items()]


def _card_to_text(card: Mapping[str, Any]) -> str:
    if not isinstance(card, Mapping):
        raise ValueError(f"card must be a dict, got {type(card).__name__}: {card!r:.200}")
    try:
        return json.dumps(dict(card), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"card is not strict JSON (NaN and infinity not allowed, use null): {error}") from error


def _open(path: Path):
    try:
        return open(path, "rb")
    except FileNotFoundError as error:
        raise TCURLoRAFileNotFoundError(f"no such file: {str(path)!r}") from error
    except IsADirectoryError as error:
        raise TCURLoRAFileError(f"{str(path)!r} is a folder, not a file") from error


def _read_header(path: Path, handle, size: int) -> tuple[dict[str, Any], dict[str, str], int]:
    """Reads and checks a safetensors header from the start of ``handle``: returns (tensor entries,
    ``__metadata__``, header length)."""
    head = handle.read(8)
    if len(head) < 8:
        raise TCURLoRAFileError(f"{str(path)!r} is truncated or not a safetensors file: "
                                f"{size} bytes, shorter than the 8-byte header length")
    (length,) = struct.unpack("<Q", head)
    if length > _MAX_HEADER_BYTES or 8 + length > size:
        raise TCURLoRAFileError(f"{str(path)!r} is truncated or not a safetensors file: its header claims "
                                f"{length} bytes but the file holds only {size} bytes")
    raw = handle.read(length)
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
    return header, metadata, length


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


def _check_metadata(path: Path, metadata: Mapping[str, str], kind: str | None) -> tuple[str, dict[str, Any], int]:
    """Checks the format, version and card entries; returns ``(kind, card, version)``."""
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
    return found, card, version
