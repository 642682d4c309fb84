"""The model's view of an image: reoriented, resampled and normalised onto the model's grid, and the exact way back.

A model consumes the prepared array as a ``(1, 1, D, H, W)`` tensor with (D, H, W) = (z, y, x) of the model grid:
``torch.from_numpy(prepared.array)[None, None]``. Predictions come back onto the very grid the image was read on
(:class:`GridMapping`).

Resampling and reorientation are SimpleITK's: the library that reads and writes the files, so that a result comes
back on the input's grid exactly (Testing/test_volumes.py), on any direction, where MONAI's Orientation/Spacing
transforms work on RAS affines of torch tensors. The two intensity normalisations give what MONAI's
NormalizeIntensity(nonzero=True) and ScaleIntensityRangePercentiles(clip=True) give (tested against them), written
out here so that the volume modules import no torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence, Union

import numpy as np
import SimpleITK as sitk

from .geometry import (Geometry, as_scalar_3d, check_orientation, check_spacing, reoriented, require_same_grid,
                       resample)
from .labelmap import check_label_array

__all__ = ["MAX_MODEL_VOXELS", "MIN_AXIS_VOXELS", "NORMALIZATION_KINDS", "GridMapping", "PreparedVolume",
           "check_normalization", "model_grid_for", "normalize_intensity", "prepare_for_model"]

NORMALIZATION_KINDS = ("zscore_nonzero", "percentile")
MIN_AXIS_VOXELS = 8
"""Fewest voxels along every axis, in the image and on the model grid, of an image prepared for a model: below it
there is no 3-D context to segment (a point, a line, a slice)."""
MAX_MODEL_VOXELS = 1 << 28
"""Most voxels of a model grid (1 GiB as float32): more means a header with a wrong spacing (100 mm for 1 mm)."""


@dataclass(frozen=True)
class GridMapping:
    """How an input grid maps onto a model grid, and back. Both are physical grids in LPS space, so either way is
    one resampling (identity transform); with unchanged spacing the model grid's voxel centres coincide with the
    input's, and a label map survives the round trip unchanged.

    Args:
        input_grid: the grid of the image as read (results are returned on exactly this grid).
        model_grid: reoriented, resampled grid the model sees.
    """

    input_grid: Geometry
    model_grid: Geometry

    def labels_to_model(self, labels: Union[np.ndarray, sitk.Image]) -> np.ndarray:
        """A label map on the input grid resampled (nearest neighbour) onto the model grid.

        Args:
            labels: integer array (z, y, x) of the input grid's shape, or a SimpleITK image on the input grid.

        Returns:
            Array of the same dtype, shape (D, H, W) = model_grid.shape.

        Raises:
            ValueError: labels of another shape or grid, or not integers in 0..65535.
        """
        if isinstance(labels, sitk.Image):
            require_same_grid(Geometry.from_image(labels), self.input_grid, "label map", "the input grid")
            labels = sitk.GetArrayFromImage(labels)
        array = check_label_array(labels, self.input_grid.shape, "label map on the input grid")
        return self._resample_labels(array, self.input_grid, self.model_grid)

    def labels_to_input(self, labels: np.ndarray) -> np.ndarray:
        """A predicted label map on the model grid resampled (nearest neighbour) onto the exact input grid.

        Args:
            labels: integer array (D, H, W) = model_grid.shape, values 0..65535.

        Returns:
            Array of the same dtype, shape (z, y, x) = input_grid.shape.
        """
        array = check_label_array(labels, self.model_grid.shape, "prediction on the model grid")
        return self._resample_labels(array, self.model_grid, self.input_grid)

    def probabilities_to_input(self, probabilities: np.ndarray) -> np.ndarray:
        """Per-class probabilities on the model grid resampled (linearly) onto the exact input grid.

        Args:
            probabilities: float array (C, D, H, W) with (D, H, W) = model_grid.shape.

        Returns:
            float32 array (C, z, y, x), (z, y, x) = input_grid.shape. Linear interpolation keeps each voxel's
            values a convex combination of model-grid voxels, so they stay in [0, 1] and sum to 1 if they did.
        """
        probabilities = np.asarray(probabilities)
        if probabilities.ndim != 4 or probabilities.shape[1:] != self.model_grid.shape:
            raise ValueError(f"probabilities must have shape (C, *{self.model_grid.shape}) on the model grid, "
                             f"got {probabilities.shape}")
        channels_last = np.moveaxis(probabilities.astype(np.float32, copy=False), 0, -1)
        image = self.model_grid.image_from_array(channels_last, is_vector=True)
        resampled = resample(image, self.input_grid, sitk.sitkLinear)
        result = sitk.GetArrayFromImage(resampled).reshape(self.input_grid.shape + (probabilities.shape[0],))
        return np.ascontiguousarray(np.moveaxis(result, -1, 0))

    @staticmethod
    def _resample_labels(array: np.ndarray, source: Geometry, target: Geometry) -> np.ndarray:
        image = source.image_from_array(array.astype(np.uint16, copy=False))
        resampled = resample(image, target, sitk.sitkNearestNeighbor)
        return sitk.GetArrayFromImage(resampled).astype(array.dtype, copy=False)

@dataclass(frozen=True)
class PreparedVolume:
    """An image ready for a model.

    Args:
        array: float32 (D, H, W) = (z, y, x) of the model grid, intensity-normalised.
        mapping: maps label maps and predictions between the input grid and the model grid.
    """

    array: np.ndarray
    mapping: GridMapping

def prepare_for_model(image: sitk.Image, spacing: Sequence[float], orientation: str,
                      normalization: Mapping[str, object]) -> PreparedVolume:
    """Reorient, resample and normalise an image for a model.

    The model grid has the orientation `orientation` (axes permuted and flipped, never rotated: an oblique image
    stays oblique, so nothing is interpolated for a reorientation alone), voxel size `spacing`, and covers the
    same physical box as the input, centred on it. Intensities are resampled linearly, then normalised.

    Args:
        image: 3-D scalar SimpleITK image (from read_image).
        spacing: target voxel size in mm along the model grid's x, y, z axes (the reverse of the array's axes).
        orientation: three-letter code such as "RAS" (see the module docstring).
        normalization: ``{"kind": "zscore_nonzero"}`` or ``{"kind": "percentile", "lower": 0.5,
            "upper": 99.5}``; see normalize_intensity.

    Returns:
        PreparedVolume: float32 array (D, H, W) = (z, y, x) of the model grid, and the grid mapping.

    Raises:
        ValueError: bad spacing, orientation code or normalisation spec, an image that is not 3-D scalar, or one
            too small (fewer than :data:`MIN_AXIS_VOXELS` voxels along an axis, in the image or on the model grid)
            or too large (more than :data:`MAX_MODEL_VOXELS` on the model grid) to segment.
    """
    target_spacing = check_spacing(spacing)
    code = check_orientation(orientation)
    spec = check_normalization(normalization)
    image = as_scalar_3d(image, "image")
    input_grid = Geometry.from_image(image)
    model_grid = model_grid_for(input_grid, target_spacing, code)
    _check_model_grid_size(input_grid, model_grid)
    resampled = resample(sitk.Cast(image, sitk.sitkFloat32), model_grid, sitk.sitkLinear)
    array = normalize_intensity(sitk.GetArrayFromImage(resampled), spec)
    return PreparedVolume(array=array, mapping=GridMapping(input_grid, model_grid))

def model_grid_for(input_grid: Geometry, spacing: Sequence[float], orientation: str) -> Geometry:
    """The model grid of an input grid: reoriented to `orientation`, voxel size `spacing`, same centre.

    Size along each axis is round(extent / spacing), at least 1, so the physical extent is kept to within half a
    voxel on each side.
    """
    target_spacing = np.array(check_spacing(spacing))
    oriented = reoriented(input_grid, check_orientation(orientation))
    direction = oriented.direction_matrix()
    extent = np.array(oriented.size) * np.array(oriented.spacing)
    size = np.maximum(1, np.rint(extent / target_spacing)).astype(int)
    centre = np.array(oriented.origin) + direction @ ((np.array(oriented.size) - 1) * np.array(oriented.spacing) / 2)
    origin = centre - direction @ ((size - 1) * target_spacing / 2)
    return Geometry(tuple(size), tuple(target_spacing), tuple(origin), oriented.direction)

def _check_model_grid_size(input_grid: Geometry, model_grid: Geometry) -> None:
    """Refuses an image too small to hold 3-D context, or too large to resample (a wrong spacing, usually)."""
    extent = " x ".join(f"{n * s:.4g}" for n, s in zip(input_grid.size, input_grid.spacing))
    spacing = " x ".join(f"{s:g}" for s in model_grid.spacing)
    if min(input_grid.size) < MIN_AXIS_VOXELS or min(model_grid.size) < MIN_AXIS_VOXELS:
        raise ValueError(f"the image is too small to segment: {input_grid.size} voxels covering {extent} mm, which "
                         f"is {model_grid.size} voxels at the model's {spacing} mm; at least {MIN_AXIS_VOXELS} voxels "
                         f"along every axis are needed, in the image and at the model's spacing")
    voxels = int(np.prod(np.array(model_grid.size, dtype=np.int64)))
    if voxels > MAX_MODEL_VOXELS:
        raise ValueError(f"the image is too large to resample: it covers {extent} mm, which at the model's {spacing} "
                         f"mm is {model_grid.size} = {voxels:,} voxels, more than the {MAX_MODEL_VOXELS:,} allowed; "
                         f"check the voxel spacing in its header (e.g. 100 mm where 1 mm was meant), or crop it")

def check_normalization(spec: Mapping[str, object]) -> dict:
    """Validate an intensity normalisation spec; returns a normalised copy (floats for the percentiles).

    Raises:
        ValueError: unknown kind, missing or unexpected keys, or percentiles outside 0 <= lower < upper <= 100.
    """
    if not isinstance(spec, Mapping) or "kind" not in spec:
        raise ValueError(f"normalization must be a dict with a 'kind' of {NORMALIZATION_KINDS}, got {spec!r}")
    kind = spec["kind"]
    expected = {"zscore_nonzero": {"kind"}, "percentile": {"kind", "lower", "upper"}}.get(kind)
    if expected is None:
        raise ValueError(f"unknown normalization kind {kind!r}: supported kinds are {NORMALIZATION_KINDS}")
    if set(spec) != expected:
        raise ValueError(f"normalization {kind!r} needs exactly the keys {sorted(expected)}, got {sorted(spec)}")
    if kind == "zscore_nonzero":
        return {"kind": kind}
    try:
        lower, upper = float(spec["lower"]), float(spec["upper"])
    except (TypeError, ValueError):
        raise ValueError(f"percentile bounds must be numbers, got lower={spec['lower']!r}, "
                         f"upper={spec['upper']!r}") from None
    if not 0.0 <= lower < upper <= 100.0:
        raise ValueError(f"percentile bounds must satisfy 0 <= lower < upper <= 100, got lower={lower}, "
                         f"upper={upper}")
    return {"kind": kind, "lower": lower, "upper": upper}

def normalize_intensity(array: np.ndarray, spec: Mapping[str, object]) -> np.ndarray:
    """Normalise intensities.

    - ``zscore_nonzero``: (x - mean) / std over the non-zero voxels, applied to them only; zero voxels (the usual
      background of skull-stripped or masked images) stay 0, as MONAI's NormalizeIntensity(nonzero=True). A
      constant foreground (std 0) is only shifted.
    - ``percentile``: clip to the `lower` and `upper` percentiles of all voxels, then scale to [0, 1]; a constant
      image becomes all zeros.

    Args:
        array: any shape, real.
        spec: see check_normalization.

    Returns:
        float32 array of the same shape.

    Raises:
        ValueError: bad spec; zscore_nonzero on an image without a non-zero voxel.
    """
    spec = check_normalization(spec)
    values = np.asarray(array, dtype=np.float32)
    if spec["kind"] == "zscore_nonzero":
        foreground = values != 0
        if not foreground.any():
            raise ValueError("zscore_nonzero normalization needs non-zero voxels, but the image is all zeros")
        selected = values[foreground].astype(np.float64)
        std = selected.std()
        result = np.zeros_like(values)
        result[foreground] = (selected - selected.mean()) / (std if std > 0 else 1.0)
        return result
    low, high = np.percentile(values, [spec["lower"], spec["upper"]])
    if high <= low:
        return np.zeros_like(values)
    return ((np.clip(values, low, high) - low) / (high - low)).astype(np.float32)
