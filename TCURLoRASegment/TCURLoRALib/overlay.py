"""Label overlays as PNG pictures: axial, coronal and sagittal slices of an image with its segmentation on top.

numpy and zlib only: the demo and reports need no plotting library.
"""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import Mapping

import numpy as np
import SimpleITK as sitk

__all__ = ["VIEWS", "encode_png", "overlay_views", "write_png"]

VIEWS = ("axial", "coronal", "sagittal")


def encode_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an RGB image, ``H x W x 3`` uint8 (8-bit truecolour, no interlace)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an H x W x 3 uint8 array, got shape {rgb.shape} and dtype {rgb.dtype}")
    height, width, _ = rgb.shape
    rows = np.concatenate([np.zeros((height, 1), np.uint8), rgb.reshape(height, width * 3)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
            + chunk(b"IEND", b""))


def write_png(path: str | os.PathLike, rgb: np.ndarray) -> Path:
    path = Path(path)
    path.write_bytes(encode_png(rgb))
    return path


def _grey(image: np.ndarray) -> np.ndarray:
    low, high = np.percentile(image, [1, 99.5])
    scaled = np.clip((image - low) / max(high - low, 1e-6), 0, 1)
    return (scaled * 255).astype(np.uint8)


def _upsample(rgb: np.ndarray, row_mm: float, col_mm: float, pixel_mm: float) -> np.ndarray:
    # Nearest-neighbour resampling to square pixels, so that anisotropic volumes are not shown squashed.
    rows = np.clip((np.arange(int(round(rgb.shape[0] * row_mm / pixel_mm))) * pixel_mm / row_mm).astype(int), 0,
                   rgb.shape[0] - 1)
    cols = np.clip((np.arange(int(round(rgb.shape[1] * col_mm / pixel_mm))) * pixel_mm / col_mm).astype(int), 0,
                   rgb.shape[1] - 1)
    return rgb[rows][:, cols]


def overlay_views(
    image: sitk.Image, labels: sitk.Image, colors: Mapping[int, tuple[int, int, int]], opacity: float = 0.5
) -> dict[str, np.ndarray]:
    """Axial, coronal and sagittal RGB slices through the centre of the labelled region.

    Both volumes are reoriented to LPS first (an axis permutation and flips only), then shown in radiological
    convention: the patient's right on the left of the picture, anterior and superior at the top.

    Args:
        image: the scalar image.
        labels: its label map on the same grid.
        colors: label value -> RGB 0-255; values without a colour are not drawn.
        opacity: of the label colours over the grey image.

    Returns:
        ``{"axial": H x W x 3 uint8, "coronal": ..., "sagittal": ...}``.
    """
    image_lps = sitk.DICOMOrient(image, "LPS")
    labels_lps = sitk.DICOMOrient(labels, "LPS")
    grey = _grey(sitk.GetArrayFromImage(image_lps).astype(np.float32))  # (z: I->S, y: A->P, x: R->L)
    values = sitk.GetArrayFromImage(labels_lps)
    if grey.shape != values.shape:
        raise ValueError(f"image and label map differ in size: {grey.shape} and {values.shape}")
    rgb = np.repeat(grey[..., None], 3, axis=-1).astype(np.float32)
    for value, color in colors.items():
        mask = values == value
        rgb[mask] = (1 - opacity) * rgb[mask] + opacity * np.asarray(color, np.float32)
    rgb = rgb.astype(np.uint8)
    foreground = np.argwhere(values > 0)
    centre = foreground.mean(axis=0).astype(int) if len(foreground) else np.array(values.shape) // 2
    spacing_x, spacing_y, spacing_z = image_lps.GetSpacing()
    pixel = min(spacing_x, spacing_y, spacing_z) / 2  # twice the finest voxel: pictures big enough to read
    return {
        "axial": _upsample(rgb[centre[0]], spacing_y, spacing_x, pixel),
        "coronal": _upsample(rgb[::-1, centre[1], :], spacing_z, spacing_x, pixel),
        "sagittal": _upsample(rgb[::-1, :, centre[2]], spacing_z, spacing_y, pixel),
    }
