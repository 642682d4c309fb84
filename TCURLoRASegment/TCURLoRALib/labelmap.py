"""A label map and its segments: label values 1..65535 on a grid, each with a name and an RGB colour.

Segment colours are RGB integers 0-255, as in the model and adapter cards (``cards.Label``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from .geometry import Geometry

__all__ = ["MAX_LABEL", "PALETTE", "LabelMap", "Segment", "check_label_array", "compact_labels", "is_int"]

MAX_LABEL = int(np.iinfo(np.uint16).max)
# Colours of label maps that carry none (a plain NIfTI/NRRD label volume); cycled by label value.
PALETTE = (
    (230, 77, 61), (46, 140, 87), (51, 115, 204), (242, 196, 15),
    (143, 69, 173), (26, 189, 189), (237, 125, 33), (140, 140, 140),
)


@dataclass(frozen=True)
class Segment:
    """One labelled structure of a label map.

    Args:
        value: label value of the structure's voxels, 1..65535 (0 is background).
        name: display name, non-empty.
        color: RGB, three integers 0-255.
    """

    value: int
    name: str
    color: tuple = (128, 128, 128)

    def __post_init__(self) -> None:
        if not is_int(self.value):
            raise ValueError(f"segment value must be an integer, got {self.value!r}")
        if not 1 <= int(self.value) <= MAX_LABEL:
            raise ValueError(f"segment value must be in 1..{MAX_LABEL} (0 is background), got {self.value!r}")
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"segment name must be a non-empty string, got {self.name!r}")
        color = tuple(self.color)
        if len(color) != 3 or not all(is_int(c) and 0 <= c <= 255 for c in color):
            raise ValueError(f"segment colour must be 3 RGB integers in 0-255, got {self.color!r}")
        color = tuple(int(c) for c in color)
        object.__setattr__(self, "value", int(self.value))
        object.__setattr__(self, "color", color)

@dataclass(frozen=True)
class LabelMap:
    """A label map and the structures it holds.

    Args:
        image: 3-D SimpleITK image of pixel type UInt16, 0 = background.
        segments: the labelled structures, one per label value, in file order (may include empty ones).
    """

    image: sitk.Image
    segments: tuple

    @property
    def geometry(self) -> Geometry:
        return Geometry.from_image(self.image)

    def array(self) -> np.ndarray:
        """uint16 array of shape (z, y, x)."""
        return sitk.GetArrayFromImage(self.image)

def check_label_array(labels: np.ndarray, shape: tuple, name: str) -> np.ndarray:
    array = np.asarray(labels)
    if array.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (z, y, x), got {array.shape}")
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        raise ValueError(f"{name} must hold integers, got dtype {array.dtype}")
    if array.size and (int(array.min()) < 0 or int(array.max()) > MAX_LABEL):
        raise ValueError(f"{name} values must be in 0..{MAX_LABEL}, got {int(array.min())}..{int(array.max())}")
    return array

def compact_labels(array: np.ndarray) -> np.ndarray:
    top = int(array.max()) if array.size else 0
    return array.astype(np.uint8 if top < 256 else np.uint16, copy=False)

def is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
