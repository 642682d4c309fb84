"""Grids in LPS space: a 3-D image's voxel lattice, reorienting it, resampling between grids, comparing grids.

Conventions used by every volume module:

- Physical space is LPS (ITK's and DICOM's): +x = Left, +y = Posterior, +z = Superior, in millimetres.
- A grid (:class:`Geometry`) is given in ITK index order (i, j, k) = (x, y, z): ``size``, ``spacing`` and
  ``origin`` have 3 entries, ``direction`` is the row-major 3x3 matrix whose column k is the unit vector of
  image axis k in LPS.
- Arrays are in SimpleITK's ``GetArrayFromImage`` order, **(z, y, x)** = (k, j, i): ``array.shape ==
  tuple(reversed(geometry.size))``.
- Orientation codes are three letters, one of each pair R/L, A/P, S/I; letter k names the anatomical direction
  toward which image axis k (x, y, z) *increases*. "RAS" is therefore x toward the patient's right, y anterior,
  z superior: the meaning of nibabel's and Slicer's "RAS", and exactly what SimpleITK's ``DICOMOrient`` does
  (an identity direction in LPS space is "LPS").
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import SimpleITK as sitk

__all__ = ["GRID_TOLERANCE", "Geometry", "as_scalar_3d", "check_orientation", "check_spacing", "offset_on_lattice",
           "reoriented", "require_same_grid", "resample"]

# Relative tolerance of grid comparisons. NIfTI stores its affine in float32, so a grid written and read back
# differs by ~1e-7 relative; 1e-4 (of a voxel for positions) separates that from a genuinely different grid.
GRID_TOLERANCE = 1e-4
_LPS_AXIS_OF_LETTER = {"L": (0, 1.0), "R": (0, -1.0), "P": (1, 1.0), "A": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


@dataclass(frozen=True)
class Geometry:
    """The grid of a 3-D image in LPS space, in ITK index order (x, y, z); see the module docstring.

    Args:
        size: voxels along x, y, z.
        spacing: voxel size along x, y, z in mm.
        origin: LPS position (mm) of the centre of voxel (0, 0, 0).
        direction: row-major 3x3 matrix, column k = unit vector of axis k in LPS.
    """

    size: tuple
    spacing: tuple
    origin: tuple
    direction: tuple

    def __post_init__(self) -> None:
        # Accept numpy arrays (a 3x3 direction too); store plain tuples so grids compare and print simply.
        object.__setattr__(self, "size", tuple(int(s) for s in np.ravel(self.size)))
        for field in ("spacing", "origin", "direction"):
            object.__setattr__(self, field, tuple(float(s) for s in np.ravel(getattr(self, field))))
        if len(self.size) != 3 or len(self.spacing) != 3 or len(self.origin) != 3 or len(self.direction) != 9:
            raise ValueError(f"a 3-D geometry needs 3 sizes, spacings, origins and 9 direction values, got {self}")

    @classmethod
    def from_image(cls, image: sitk.Image) -> "Geometry":
        """The grid of a 3-D SimpleITK image."""
        return cls(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())

    @property
    def shape(self) -> tuple:
        """Array shape (z, y, x) of an image on this grid."""
        return tuple(reversed(self.size))

    def direction_matrix(self) -> np.ndarray:
        """3x3 float64 matrix, column k = unit vector of axis k in LPS."""
        return np.array(self.direction, dtype=np.float64).reshape(3, 3)

    def ijk_to_lps(self) -> np.ndarray:
        """4x4 float64 matrix mapping a voxel index (i, j, k, 1) = (x, y, z, 1) to its LPS position."""
        matrix = np.eye(4)
        matrix[:3, :3] = self.direction_matrix() * np.array(self.spacing)
        matrix[:3, 3] = self.origin
        return matrix

    def image_from_array(self, array: np.ndarray, is_vector: bool = False) -> sitk.Image:
        """A SimpleITK image on this grid from an array of shape (z, y, x) (or (z, y, x, C) with is_vector)."""
        image = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=is_vector)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def matches(self, other: "Geometry", tolerance: float = GRID_TOLERANCE) -> bool:
        """Whether both grids are the same: equal sizes, and spacing, origin (in voxels) and direction within
        `tolerance` (relative)."""
        if self.size != other.size:
            return False
        spacing = np.array(self.spacing)
        if np.any(np.abs(spacing - np.array(other.spacing)) > tolerance * spacing):
            return False
        if np.any(np.abs(np.array(self.origin) - np.array(other.origin)) > tolerance * spacing.min()):
            return False
        return bool(np.all(np.abs(self.direction_matrix() - other.direction_matrix()) <= tolerance))

    def describe(self) -> str:
        """One line: size, spacing, origin and direction, for error messages."""
        def fmt(values: Sequence[float]) -> str:
            return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"
        return (f"size {self.size}, spacing {fmt(self.spacing)}, origin {fmt(self.origin)}, "
                f"direction {fmt(self.direction)}")


def check_spacing(spacing: Sequence[float]) -> tuple:
    try:
        values = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise ValueError(f"spacing must be 3 positive numbers (mm, x y z), got {spacing!r}") from None
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing must be 3 positive numbers (mm, x y z), got {spacing!r}")
    return values

def check_orientation(code: str) -> str:
    if not isinstance(code, str) or len(code) != 3:
        raise ValueError(f"orientation must be a 3-letter code such as 'RAS', got {code!r}")
    code = code.upper()
    if sorted(_LPS_AXIS_OF_LETTER[c][0] for c in code if c in _LPS_AXIS_OF_LETTER) != [0, 1, 2]:
        raise ValueError(f"orientation {code!r} must use one letter of each pair R/L, A/P, S/I")
    return code

def reoriented(grid: Geometry, code: str) -> Geometry:
    """The grid permuted and flipped to orientation `code`, as SimpleITK's DICOMOrient does, without the voxels."""
    # DICOMOrient on a one-voxel image with this direction gives the oriented direction; size and origin follow
    # from the signed permutation between the two directions.
    probe = sitk.Image([1, 1, 1], sitk.sitkUInt8)
    probe.SetDirection(grid.direction)
    new_direction = np.array(sitk.DICOMOrient(probe, code).GetDirection()).reshape(3, 3)
    old_direction = grid.direction_matrix()
    signed_permutation = np.rint(old_direction.T @ new_direction).astype(int)  # new axis k = sign * old axis p[k]
    source_axis = np.abs(signed_permutation).argmax(axis=0)
    sign = signed_permutation[source_axis, np.arange(3)]
    old_size, old_spacing = np.array(grid.size), np.array(grid.spacing)
    # The new first voxel is the old voxel at the far end of every flipped axis.
    corner = np.where(np.isin(np.arange(3), source_axis[sign < 0]), old_size - 1, 0)
    origin = np.array(grid.origin) + old_direction @ (corner * old_spacing)
    return Geometry(tuple(old_size[source_axis]), tuple(old_spacing[source_axis]), tuple(origin),
                    tuple(old_direction[:, source_axis] * sign))

def resample(image: sitk.Image, grid: Geometry, interpolator: int) -> sitk.Image:
    """The image on `grid` (identity transform); voxels past the source's edge take the nearest edge value, since
    the two grids cover the same box only to within half a voxel."""
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize(grid.size)
    resampler.SetOutputSpacing(grid.spacing)
    resampler.SetOutputOrigin(grid.origin)
    resampler.SetOutputDirection(grid.direction)
    resampler.SetInterpolator(interpolator)
    resampler.SetDefaultPixelValue(0)
    resampler.SetUseNearestNeighborExtrapolator(True)
    return resampler.Execute(image)

def offset_on_lattice(inner: Geometry, outer: Geometry) -> Union[tuple, None]:
    """Index (x, y, z) in `outer` of `inner`'s first voxel if `inner` is a sub-box of `outer`'s lattice, else
    None."""
    if not np.allclose(inner.spacing, outer.spacing, rtol=GRID_TOLERANCE, atol=0):
        return None
    if not np.allclose(inner.direction_matrix(), outer.direction_matrix(), rtol=0, atol=GRID_TOLERANCE):
        return None
    offset = outer.direction_matrix().T @ (np.array(inner.origin) - np.array(outer.origin)) / np.array(outer.spacing)
    index = np.rint(offset)
    if np.any(np.abs(offset - index) > GRID_TOLERANCE * 10):
        return None
    if np.any(index < 0) or np.any(index + np.array(inner.size) > np.array(outer.size)):
        return None
    return tuple(int(i) for i in index)

def require_same_grid(grid: Geometry, expected: Geometry, name: str, expected_name: str) -> None:
    if not grid.matches(expected):
        raise ValueError(f"{name} is not on {expected_name}: it has {grid.describe()}; "
                         f"{expected_name} has {expected.describe()}")


def as_scalar_3d(image: sitk.Image, name: str) -> sitk.Image:
    """The image as a 3-D scalar image; squeezes a size-1 4th axis and a single vector component."""
    components = image.GetNumberOfComponentsPerPixel()
    if components > 1:
        raise ValueError(f"{name} has {components} components per voxel; a 3-D scalar volume is needed")
    if components == 1 and image.GetPixelID() in _VECTOR_PIXEL_TYPES:
        image = sitk.VectorIndexSelectionCast(image, 0)
    dimension = image.GetDimension()
    if dimension == 4 and image.GetSize()[3] == 1:
        image = sitk.Extract(image, list(image.GetSize()[:3]) + [0], [0, 0, 0, 0],
                             sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX)
    elif dimension != 3:
        extra = f" with {image.GetSize()[3]} volumes along the 4th axis" if dimension == 4 else ""
        raise ValueError(f"{name} is {dimension}-D (size {image.GetSize()}){extra}; a 3-D scalar volume is needed")
    return image


_VECTOR_PIXEL_TYPES = {
    getattr(sitk, name) for name in dir(sitk) if name.startswith("sitkVector") and isinstance(getattr(sitk, name), int)
}
