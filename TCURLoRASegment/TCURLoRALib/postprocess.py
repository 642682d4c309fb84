"""Clean a predicted label map: one piece per structure that is one piece, nothing outside a plausible region.

Few-shot adapters make the errors a reader notices first: small blobs far from the structure, which cost little
Dice but set the 95th-percentile Hausdorff distance (HD95) to the blob's distance. Two rules remove them:

- :func:`keep_largest_component`: for each label declared one connected piece (a hippocampus, a putamen), only its
  largest connected component is kept; the other voxels become background.
- :func:`suppress_outside`: each label has a plausible region, a box in coordinates relative to the brain's
  bounding box (0 at its first voxel, 1 at its last, per axis), learnt from the training labels by
  :func:`learn_regions` with a margin; predicted voxels outside it become background. Unlike the first rule it
  also removes a stray blob larger than the structure, and a left label on the right side of the brain.

Both work on label arrays of one grid (the model grid, where the axes follow the card's orientation, so a box means
the same thing for every image). The brain box is the bounding box of the image's non-zero voxels: the base models
here are trained on skull-stripped images with ``zscore_nonzero`` normalisation, where 0 is outside the brain.
Numpy and SciPy only, no torch.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

__all__ = ["CONNECTIVITY", "Region", "brain_box", "keep_largest_component", "learn_regions", "relative_grid",
           "suppress_outside"]

CONNECTIVITY = {6: 1, 18: 2, 26: 3}
"""Neighbourhood size -> ``ndimage.generate_binary_structure`` rank: 6 faces, 18 also edges, 26 also corners."""


def keep_largest_component(labels: np.ndarray, values: Sequence[int], connectivity: int = 26) -> np.ndarray:
    """A copy of `labels` where each label in `values` keeps only its largest connected component.

    Args:
        labels: integer label map, 3-D (z, y, x).
        values: the labels that are one piece; other labels are left as they are.
        connectivity: 6, 18 or 26 (default: voxels touching at a corner are one piece).

    Returns:
        Array of the same shape and dtype; removed voxels are 0 (background). Of two largest components of equal
        size, the one found first in array order stays.

    Raises:
        ValueError: a label map that is not 3-D, or an unknown connectivity.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be a 3-D array, got shape {labels.shape}")
    if connectivity not in CONNECTIVITY:
        raise ValueError(f"connectivity must be one of {sorted(CONNECTIVITY)}, got {connectivity!r}")
    structure = ndimage.generate_binary_structure(3, CONNECTIVITY[connectivity])
    out = labels.copy()
    for value in values:
        mask = labels == value
        components, count = ndimage.label(mask, structure=structure)
        if count <= 1:
            continue
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        out[mask & (components != int(np.argmax(sizes)))] = 0
    return out


@dataclasses.dataclass(frozen=True)
class Region:
    """Plausible box of one label, per array axis (z, y, x), in brain-box coordinates (0 first, 1 last voxel).

    Args:
        lower, upper: three numbers each, lower <= upper.
    """

    lower: tuple
    upper: tuple

    def __post_init__(self) -> None:
        lower, upper = (tuple(float(v) for v in np.ravel(getattr(self, key))) for key in ("lower", "upper"))
        if len(lower) != 3 or len(upper) != 3 or not all(math.isfinite(v) for v in lower + upper) \
                or any(lo > hi for lo, hi in zip(lower, upper)):
            raise ValueError(f"a region needs 3 finite lower <= upper bounds, got lower {self.lower!r}, "
                             f"upper {self.upper!r}")
        object.__setattr__(self, "lower", lower)
        object.__setattr__(self, "upper", upper)

    def to_json(self) -> dict[str, Any]:
        return {"lower": [round(v, 4) for v in self.lower], "upper": [round(v, 4) for v in self.upper]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Region:
        return cls(tuple(data["lower"]), tuple(data["upper"]))


def brain_box(image: np.ndarray) -> tuple:
    """(first, last) index of the non-zero voxels of `image` (z, y, x) along each axis, two int tuples.

    Raises:
        ValueError: an image without a non-zero voxel.
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"image must be a 3-D array, got shape {image.shape}")
    inside = image != 0
    if not inside.any():
        raise ValueError("the image has no non-zero voxel: no brain box")
    first, last = [], []
    for axis in range(3):
        hits = np.flatnonzero(inside.any(axis=tuple(a for a in range(3) if a != axis)))
        first.append(int(hits[0]))
        last.append(int(hits[-1]))
    return tuple(first), tuple(last)


def relative_grid(shape: Sequence[int], box: tuple) -> list:
    """Brain-box coordinate of every index along each axis: three 1-D float arrays ((i - first) / (last - first);
    an axis where the box is one voxel thick gets 0 there)."""
    first, last = box
    return [(np.arange(n) - f) / max(l - f, 1) for n, f, l in zip(shape, first, last)]


def learn_regions(cases: Sequence[tuple], values: Sequence[int], margin: float = 0.05) -> dict:
    """The plausible region of each label: the box of its voxels in brain-box coordinates over all cases, widened
    by `margin` on each side.

    Args:
        cases: (image, labels) pairs of arrays (z, y, x) on one kind of grid (the model grid of each training case).
            Label values other than `values` (background, not-annotated markers) are ignored.
        values: labels to learn a region for.
        margin: widening on each side, in brain-box units (default 0.05, i.e. 5 % of the brain's extent).

    Returns:
        ``{value: Region}`` for each value found in some case (a value found nowhere gets no region).

    Raises:
        ValueError: a negative or non-finite margin, or arrays of different shapes.
    """
    if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    lower = {value: np.full(3, np.inf) for value in values}
    upper = {value: np.full(3, -np.inf) for value in values}
    for image, labels in cases:
        image, labels = np.asarray(image), np.asarray(labels)
        if image.shape != labels.shape:
            raise ValueError(f"image {image.shape} and labels {labels.shape} differ in shape")
        coordinates = relative_grid(labels.shape, brain_box(image))
        for value in values:
            hits = np.argwhere(labels == value)
            if not len(hits):
                continue
            for axis in range(3):
                where = coordinates[axis][hits[:, axis]]
                lower[value][axis] = min(lower[value][axis], where.min())
                upper[value][axis] = max(upper[value][axis], where.max())
    return {value: Region(tuple(lower[value] - margin), tuple(upper[value] + margin))
            for value in values if np.isfinite(lower[value]).all()}


def suppress_outside(labels: np.ndarray, image: np.ndarray, regions: Mapping[int, Region]) -> np.ndarray:
    """A copy of `labels` where every voxel of a label with a region, outside that region, is background (0).

    Args:
        labels: integer label map (z, y, x).
        image: the image it was predicted from, same shape (its non-zero voxels give the brain box).
        regions: ``{label value: Region}``; labels without one are left as they are.

    Raises:
        ValueError: arrays of different shapes, or an image without a non-zero voxel.
    """
    labels, image = np.asarray(labels), np.asarray(image)
    if labels.shape != image.shape:
        raise ValueError(f"labels {labels.shape} and image {image.shape} differ in shape")
    coordinates = relative_grid(labels.shape, brain_box(image))
    out = labels.copy()
    for value, region in regions.items():
        inside = [(c >= lo) & (c <= hi) for c, lo, hi in zip(coordinates, region.lower, region.upper)]
        allowed = inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
        out[(labels == value) & ~allowed] = 0
    return out
