"""Volumes: read images and label maps, bring them onto a model's grid and back, write results.

Slicer-free (SimpleITK, numpy, slicerio). Conventions used throughout:

- Physical space is LPS (ITK's and DICOM's): +x = Left, +y = Posterior, +z = Superior, in millimetres.
- A grid (:class:`Geometry`) is given in ITK index order (i, j, k) = (x, y, z): ``size``, ``spacing`` and
  ``origin`` have 3 entries, ``direction`` is the row-major 3x3 matrix whose column k is the unit vector of
  image axis k in LPS.
- Arrays are in SimpleITK's ``GetArrayFromImage`` order, **(z, y, x)** = (k, j, i): ``array.shape ==
  tuple(reversed(geometry.size))``. A model consumes the prepared array as a ``(1, 1, D, H, W)`` tensor with
  (D, H, W) = (z, y, x) of the model grid: ``torch.from_numpy(prepared.array)[None, None]``.
- Orientation codes are three letters, one of each pair R/L, A/P, S/I; letter k names the anatomical direction
  toward which image axis k (x, y, z) *increases*. "RAS" is therefore x toward the patient's right, y anterior,
  z superior: the meaning of nibabel's and Slicer's "RAS", and exactly what SimpleITK's ``DICOMOrient`` does
  (an identity direction in LPS space is "LPS").
- Segment colours are RGB integers 0-255, as in the model and adapter cards (``cards.Label``); .seg.nrrd files
  store floats in [0, 1], converted on reading (rounded to the nearest 1/255) and writing.

Every write is atomic: the file is written under a temporary name in the destination folder and then moved onto
the final name with ``os.replace``, so a crash or a cancelled job never leaves half a file behind.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence, Union

import numpy as np
import SimpleITK as sitk

from .outputs import atomic_write

PathLike = Union[str, "os.PathLike[str]"]

IMAGE_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
SEGMENTATION_EXTENSION = ".seg.nrrd"
LABEL_MAP_EXTENSIONS = IMAGE_EXTENSIONS + (SEGMENTATION_EXTENSION,)
# Single-file formats only: a detached header (.nhdr, .mhd) is two files, which one os.replace cannot make atomic.
LABEL_WRITE_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".mha")
NORMALIZATION_KINDS = ("zscore_nonzero", "percentile")
MIN_AXIS_VOXELS = 8
"""Fewest voxels along every axis, in the image and on the model grid, of an image prepared for a model: below it
there is no 3-D context to segment (a point, a line, a slice)."""
MAX_MODEL_VOXELS = 1 << 28
"""Most voxels of a model grid (1 GiB as float32): more means a header with a wrong spacing (100 mm for 1 mm)."""

# Relative tolerance of grid comparisons. NIfTI stores its affine in float32, so a grid written and read back
# differs by ~1e-7 relative; 1e-4 (of a voxel for positions) separates that from a genuinely different grid.
GRID_TOLERANCE = 1e-4
_MAX_LABEL = int(np.iinfo(np.uint16).max)
# Colours of label maps that carry none (a plain NIfTI/NRRD label volume); cycled by label value.
_PALETTE = (
    (230, 77, 61), (46, 140, 87), (51, 115, 204), (242, 196, 15),
    (143, 69, 173), (26, 189, 189), (237, 125, 33), (140, 140, 140),
)
_LPS_AXIS_OF_LETTER = {"L": (0, 1.0), "R": (0, -1.0), "P": (1, 1.0), "A": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


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
        if not _is_int(self.value):
            raise ValueError(f"segment value must be an integer, got {self.value!r}")
        if not 1 <= int(self.value) <= _MAX_LABEL:
            raise ValueError(f"segment value must be in 1..{_MAX_LABEL} (0 is background), got {self.value!r}")
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"segment name must be a non-empty string, got {self.name!r}")
        color = tuple(self.color)
        if len(color) != 3 or not all(_is_int(c) and 0 <= c <= 255 for c in color):
            raise ValueError(f"segment colour must be 3 RGB integers in 0-255, got {self.color!r}")
        color = tuple(int(c) for c in color)
        object.__setattr__(self, "value", int(self.value))
        object.__setattr__(self, "color", color)


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
            _require_same_grid(Geometry.from_image(labels), self.input_grid, "label map", "the input grid")
            labels = sitk.GetArrayFromImage(labels)
        array = _check_label_array(labels, self.input_grid.shape, "label map on the input grid")
        return self._resample_labels(array, self.input_grid, self.model_grid)

    def labels_to_input(self, labels: np.ndarray) -> np.ndarray:
        """A predicted label map on the model grid resampled (nearest neighbour) onto the exact input grid.

        Args:
            labels: integer array (D, H, W) = model_grid.shape, values 0..65535.

        Returns:
            Array of the same dtype, shape (z, y, x) = input_grid.shape.
        """
        array = _check_label_array(labels, self.model_grid.shape, "prediction on the model grid")
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
        resampled = _resample(image, self.input_grid, sitk.sitkLinear)
        result = sitk.GetArrayFromImage(resampled).reshape(self.input_grid.shape + (probabilities.shape[0],))
        return np.ascontiguousarray(np.moveaxis(result, -1, 0))

    @staticmethod
    def _resample_labels(array: np.ndarray, source: Geometry, target: Geometry) -> np.ndarray:
        image = source.image_from_array(array.astype(np.uint16, copy=False))
        resampled = _resample(image, target, sitk.sitkNearestNeighbor)
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


# ---------------------------------------------------------------- reading


def read_image(path: PathLike) -> sitk.Image:
    """Read a 3-D scalar image, keeping its grid exactly as stored.

    A 4-D image whose 4th axis has size 1 and a vector image with one component are squeezed to 3-D.

    Args:
        path: a .nii, .nii.gz, .nrrd, .nhdr, .mha or .mhd file.

    Returns:
        3-D scalar SimpleITK image in the file's pixel type.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unsupported extension, unreadable file, not a 3-D scalar volume, or NaN/inf voxels.
    """
    path = _existing_file(path)
    if _extension(path, IMAGE_EXTENSIONS) is None:
        raise ValueError(f"unsupported image file {str(path)!r}: supported extensions are "
                         f"{', '.join(IMAGE_EXTENSIONS)}")
    image = _as_scalar_3d(_sitk_read(path), str(path))
    _require_finite(image, path, f"image {str(path)!r}")
    return image


def read_label_map(path: PathLike, allow_empty: bool = False) -> LabelMap:
    """Read a label map: a plain label volume or a Slicer segmentation (.seg.nrrd).

    A Slicer segmentation keeps its segment names, colours and label values. A multi-layer segmentation (segments
    that Slicer stored in separate layers because they may overlap) is flattened into one label map; label values
    are kept where they are unique across layers, else segments are renumbered 1..N in file order. Where segments
    really overlap there is no right answer, so this refuses with an error naming the two segments.
    A plain label volume gets one segment per value present, named "Segment_<value>", with palette colours.

    Args:
        path: a .seg.nrrd file (or a .nrrd holding Slicer segment fields) or a label volume with any of
            IMAGE_EXTENSIONS.
        allow_empty: accept a label map without any labelled voxel (refused by default: nothing to learn from).

    Returns:
        The label map (UInt16 image on the file's grid) and its segments.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unsupported extension, not 3-D, non-integer or negative values, overlapping segments, voxels
            that belong to no segment, or an empty label map.
    """
    path = _existing_file(path)
    if _extension(path, LABEL_MAP_EXTENSIONS) is None:
        raise ValueError(f"unsupported label map file {str(path)!r}: supported extensions are "
                         f"{', '.join(LABEL_MAP_EXTENSIONS)}")
    if _is_slicer_segmentation(path):
        label_map = _read_slicer_segmentation(path)
    else:
        label_map = _read_label_volume(path)
    if not allow_empty and not np.any(sitk.GetArrayViewFromImage(label_map.image)):
        raise ValueError(f"label map {str(path)!r} is empty: it has no labelled (non-zero) voxel")
    return label_map


def read_case(image_path: PathLike, label_path: PathLike,
              allow_empty: bool = False) -> tuple[sitk.Image, LabelMap]:
    """Read an image and its label map, and put the label map on the image's grid.

    Returns:
        (image, label_map) with ``label_map.geometry`` equal to the image's grid.

    Raises:
        The errors of read_image and read_label_map, and ValueError naming both files where the label map does not
        lie on the image's grid (see align_label_map).
    """
    image = read_image(image_path)
    label_map = read_label_map(label_path, allow_empty=allow_empty)
    aligned = align_label_map(label_map, image, label_name=f"label map {str(label_path)!r}",
                              image_name=f"image {str(image_path)!r}",
                              allow_cropped=_is_slicer_segmentation(Path(label_path)))
    return image, aligned


def align_label_map(label_map: LabelMap, image: sitk.Image, label_name: str = "label map",
                    image_name: str = "image", allow_cropped: bool = False) -> LabelMap:
    """The label map on the image's grid.

    A label map on the same grid is returned with the image's exact grid values. Slicer saves a segmentation
    cropped to the extent of its segments; with `allow_cropped` (read_case sets it for Slicer segmentations only),
    such a label map, on the image's voxel lattice (same spacing and direction, origin a whole number of voxels
    away) and inside the image, is padded with background to the image's grid. Anything else is refused: guessing
    a registration would silently move the labels.

    Args:
        label_map: the label map to align.
        image: the 3-D image whose grid the result takes.
        label_name, image_name: how the error message names the two (e.g. with their file paths).
        allow_cropped: accept a sub-box of the image's lattice.

    Raises:
        ValueError: naming both and giving both grids.
    """
    label_grid, image_grid = label_map.geometry, Geometry.from_image(image)
    if label_grid.matches(image_grid):
        # Exactly the image's grid, also numerically, so later array pairs line up without tolerance checks.
        relabelled = sitk.Image(label_map.image)
        relabelled.CopyInformation(image)
        return LabelMap(relabelled, label_map.segments)
    index = _offset_on_lattice(label_grid, image_grid) if allow_cropped else None
    if index is None:
        raise ValueError(f"{label_name} does not lie on the grid of {image_name}: the label map has "
                         f"{label_grid.describe()}; the image has {image_grid.describe()}")
    padded = np.zeros(image_grid.shape, dtype=np.uint16)
    x, y, z = index
    nx, ny, nz = label_grid.size
    padded[z:z + nz, y:y + ny, x:x + nx] = label_map.array()
    return LabelMap(image_grid.image_from_array(padded), label_map.segments)


# ---------------------------------------------------------------- model grid


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
    target_spacing = _check_spacing(spacing)
    code = _check_orientation(orientation)
    spec = check_normalization(normalization)
    image = _as_scalar_3d(image, "image")
    input_grid = Geometry.from_image(image)
    model_grid = model_grid_for(input_grid, target_spacing, code)
    _check_model_grid_size(input_grid, model_grid)
    resampled = _resample(sitk.Cast(image, sitk.sitkFloat32), model_grid, sitk.sitkLinear)
    array = normalize_intensity(sitk.GetArrayFromImage(resampled), spec)
    return PreparedVolume(array=array, mapping=GridMapping(input_grid, model_grid))


def model_grid_for(input_grid: Geometry, spacing: Sequence[float], orientation: str) -> Geometry:
    """The model grid of an input grid: reoriented to `orientation`, voxel size `spacing`, same centre.

    Size along each axis is round(extent / spacing), at least 1, so the physical extent is kept to within half a
    voxel on each side.
    """
    target_spacing = np.array(_check_spacing(spacing))
    oriented = _reoriented(input_grid, _check_orientation(orientation))
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


# ---------------------------------------------------------------- writing


def write_label_map(path: PathLike, labels: np.ndarray, geometry: Geometry) -> Path:
    """Write a label map on a given grid (normally the input image's), atomically.

    Args:
        path: destination; .nii or .nii.gz writes NIfTI, .nrrd NRRD, .mha MetaImage (gzip-compressed).
        labels: integer array (z, y, x) of shape geometry.shape, values 0..65535 (written as uint8 when all are
            below 256, else uint16).
        geometry: the grid to write.

    Returns:
        The written path.

    Raises:
        ValueError: unsupported extension, or labels of another shape or not integers in range.
        FileNotFoundError: the destination folder does not exist.
    """
    path = Path(path)
    extension = _extension(path, LABEL_WRITE_EXTENSIONS)
    if extension is None or path.name.lower().endswith(SEGMENTATION_EXTENSION):
        raise ValueError(f"cannot write label map {str(path)!r}: supported extensions are "
                         f"{', '.join(LABEL_WRITE_EXTENSIONS)} (use write_segmentation for {SEGMENTATION_EXTENSION})")
    array = _compact_labels(_check_label_array(labels, geometry.shape, "label map to write"))
    image = geometry.image_from_array(array)
    atomic_write(path, lambda tmp: sitk.WriteImage(image, tmp, True), what="label map")
    return path


def write_segmentation(path: PathLike, labels: np.ndarray, geometry: Geometry,
                       segments: Sequence[Segment]) -> Path:
    """Write a Slicer segmentation (.seg.nrrd) with segment names, colours and label values, atomically.

    Args:
        path: destination ending in .seg.nrrd.
        labels: integer array (z, y, x) of shape geometry.shape; every non-zero value must have a segment.
        geometry: the grid to write (normally the input image's).
        segments: one per label value (values unique); segments without voxels are written as empty segments.

    Returns:
        The written path.

    Raises:
        ValueError: wrong extension, duplicate segment values, or label values without a segment.
        FileNotFoundError: the destination folder does not exist.
    """
    import slicerio

    path = Path(path)
    if not path.name.lower().endswith(SEGMENTATION_EXTENSION):
        raise ValueError(f"a Slicer segmentation file must end with {SEGMENTATION_EXTENSION!r}, got {str(path)!r}")
    array = _compact_labels(_check_label_array(labels, geometry.shape, "label map to write"))
    segments = tuple(segments)
    values = [s.value for s in segments]
    if len(set(values)) != len(values):
        raise ValueError(f"segment values must be unique, got {values}")
    missing = sorted(set(np.unique(array).tolist()) - {0} - set(values))
    if missing:
        raise ValueError(f"label values {missing} in the label map have no segment (segments have values {values})")
    segmentation = {
        # slicerio (pynrrd) writes Fortran order: its voxel array is indexed (i, j, k) = (x, y, z).
        "voxels": np.ascontiguousarray(array.transpose(2, 1, 0)),
        "ijkToLPS": geometry.ijk_to_lps(),
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "segments": [
            {"id": f"Segment_{s.value}", "name": s.name, "color": [c / 255.0 for c in s.color], "labelValue": s.value,
             "layer": 0, "nameAutoGenerated": False, "colorAutoGenerated": False}
            for s in segments
        ],
    }
    atomic_write(path, lambda tmp: slicerio.write_segmentation(tmp, segmentation), what="Slicer segmentation")
    return path


# ---------------------------------------------------------------- helpers


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _existing_file(path: PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {str(path)!r}")
    return path


def _extension(path: Path, allowed: Sequence[str]) -> Union[str, None]:
    """The longest extension of `allowed` that the file name ends with (case-insensitive), or None."""
    name = path.name.lower()
    matches = [ext for ext in allowed if name.endswith(ext)]
    return max(matches, key=len) if matches else None


def _sitk_read(path: Path) -> sitk.Image:
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        # ITK's message is many lines of C++ context; its last non-empty line says what went wrong.
        detail = [line for line in str(error).splitlines() if line.strip()]
        raise ValueError(f"cannot read {str(path)!r} as an image: {detail[-1] if detail else error}") from None


def _as_scalar_3d(image: sitk.Image, name: str) -> sitk.Image:
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


def _require_finite(image: sitk.Image, path: Path, name: str) -> None:
    """Refuse NaN or inf voxels, counting them."""
    if image.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64):
        return
    if _extension(path, (".nii", ".nii.gz")):
        # ITK 5's NIfTI reader silently turns NaN and inf into 0 (fixed in ITK 6, InsightSoftwareConsortium/ITK
        # PR 6683), so the voxels read no longer show them: count them in the file itself.
        nan, inf, total = _count_non_finite_nifti(path)
    else:
        array = sitk.GetArrayViewFromImage(image)
        nan, inf, total = int(np.count_nonzero(np.isnan(array))), int(np.count_nonzero(np.isinf(array))), array.size
    if nan or inf:
        raise ValueError(f"{name} has {nan + inf} non-finite voxels ({nan} NaN, {inf} inf) of {total}")


def _count_non_finite_nifti(path: Path) -> tuple:
    """(NaN count, inf count, voxel count) of a float32/float64 NIfTI-1 or NIfTI-2 file, read in chunks."""
    import gzip

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as stream:
        header = stream.read(540)
        endian = "<" if int.from_bytes(header[:4], "little") in (348, 540) else ">"
        if int.from_bytes(header[:4], "little" if endian == "<" else "big") == 348:  # NIfTI-1
            datatype = int(np.frombuffer(header, endian + "i2", 1, 70)[0])
            dims = np.frombuffer(header, endian + "i2", 8, 40).astype(np.int64)
            offset = int(np.frombuffer(header, endian + "f4", 1, 108)[0])
        else:  # NIfTI-2
            datatype = int(np.frombuffer(header, endian + "i2", 1, 12)[0])
            dims = np.frombuffer(header, endian + "i8", 8, 16)
            offset = int(np.frombuffer(header, endian + "i8", 1, 168)[0])
        dtype = {16: np.dtype(endian + "f4"), 64: np.dtype(endian + "f8")}.get(datatype)
        total = int(np.prod(dims[1:1 + int(dims[0])]))
        if dtype is None:
            return 0, 0, total
        stream.seek(offset)
        nan = inf = 0
        remaining = total
        chunk = (1 << 24) // dtype.itemsize
        while remaining > 0:
            values = np.frombuffer(stream.read(min(chunk, remaining) * dtype.itemsize), dtype)
            if values.size == 0:
                break  # truncated file: ITK has already read what there is
            nan += int(np.count_nonzero(np.isnan(values)))
            inf += int(np.count_nonzero(np.isinf(values)))
            remaining -= values.size
    return nan, inf, total


def _check_label_array(labels: np.ndarray, shape: tuple, name: str) -> np.ndarray:
    array = np.asarray(labels)
    if array.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (z, y, x), got {array.shape}")
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        raise ValueError(f"{name} must hold integers, got dtype {array.dtype}")
    if array.size and (int(array.min()) < 0 or int(array.max()) > _MAX_LABEL):
        raise ValueError(f"{name} values must be in 0..{_MAX_LABEL}, got {int(array.min())}..{int(array.max())}")
    return array


def _compact_labels(array: np.ndarray) -> np.ndarray:
    top = int(array.max()) if array.size else 0
    return array.astype(np.uint8 if top < 256 else np.uint16, copy=False)


def _check_spacing(spacing: Sequence[float]) -> tuple:
    try:
        values = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise ValueError(f"spacing must be 3 positive numbers (mm, x y z), got {spacing!r}") from None
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing must be 3 positive numbers (mm, x y z), got {spacing!r}")
    return values


def _check_orientation(code: str) -> str:
    if not isinstance(code, str) or len(code) != 3:
        raise ValueError(f"orientation must be a 3-letter code such as 'RAS', got {code!r}")
    code = code.upper()
    if sorted(_LPS_AXIS_OF_LETTER[c][0] for c in code if c in _LPS_AXIS_OF_LETTER) != [0, 1, 2]:
        raise ValueError(f"orientation {code!r} must use one letter of each pair R/L, A/P, S/I")
    return code


def _reoriented(grid: Geometry, code: str) -> Geometry:
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


def _resample(image: sitk.Image, grid: Geometry, interpolator: int) -> sitk.Image:
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


def _offset_on_lattice(inner: Geometry, outer: Geometry) -> Union[tuple, None]:
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


def _require_same_grid(grid: Geometry, expected: Geometry, name: str, expected_name: str) -> None:
    if not grid.matches(expected):
        raise ValueError(f"{name} is not on {expected_name}: it has {grid.describe()}; "
                         f"{expected_name} has {expected.describe()}")


def _read_label_volume(path: Path) -> LabelMap:
    image = _as_scalar_3d(_sitk_read(path), f"label map {str(path)!r}")
    _require_finite(image, path, f"label map {str(path)!r}")
    array = sitk.GetArrayFromImage(image)
    if np.issubdtype(array.dtype, np.floating) and not np.array_equal(array, np.rint(array)):
        raise ValueError(f"label map {str(path)!r} has non-integer values (e.g. {array[array != np.rint(array)][0]!r})")
    if array.size and (array.min() < 0 or array.max() > _MAX_LABEL):
        raise ValueError(f"label map {str(path)!r} values must be in 0..{_MAX_LABEL}, "
                         f"got {array.min()!r}..{array.max()!r}")
    values = [int(v) for v in np.unique(array) if v != 0]
    segments = tuple(Segment(v, f"Segment_{v}", _PALETTE[(v - 1) % len(_PALETTE)]) for v in values)
    labels = Geometry.from_image(image).image_from_array(array.astype(np.uint16))
    return LabelMap(labels, segments)


def _is_slicer_segmentation(path: Path) -> bool:
    """A .seg.nrrd, or a .nrrd whose header has Slicer's Segment<N>_ fields (a segmentation saved as .nrrd)."""
    name = path.name.lower()
    if name.endswith(SEGMENTATION_EXTENSION):
        return True
    if not name.endswith(".nrrd"):
        return False
    import nrrd

    try:
        header = nrrd.read_header(str(path))
    except Exception:  # noqa: BLE001 - an unreadable header is reported by the SimpleITK reader instead
        return False
    return any(re.match(r"^Segment\d+_", key) for key in header)


def _read_slicer_segmentation(path: Path) -> LabelMap:
    import slicerio

    try:
        segmentation = slicerio.read_segmentation(str(path))
    except Exception as error:  # noqa: BLE001 - slicerio raises bare IOError/NRRDError; name the file instead
        raise ValueError(f"cannot read Slicer segmentation {str(path)!r}: {error}") from None
    voxels = np.asarray(segmentation["voxels"])
    if voxels.ndim not in (3, 4):
        raise ValueError(f"Slicer segmentation {str(path)!r} is {voxels.ndim}-D; 3-D (or layered 4-D) is needed")
    layers = voxels if voxels.ndim == 4 else voxels[np.newaxis]  # (layer, i, j, k)
    entries = segmentation.get("segments", [])
    value_of = _flattened_values(entries)
    flat = np.zeros(layers.shape[1:], dtype=np.uint16)
    owner: dict = {}
    segments = []
    for entry, value in zip(entries, value_of):
        name = entry.get("name") or entry.get("id") or f"Segment_{value}"
        layer, source_value = int(entry.get("layer", 0)), int(entry.get("labelValue", 1))
        if not 0 <= layer < layers.shape[0]:
            raise ValueError(f"segment {name!r} of {str(path)!r} is in layer {layer}, but the file has "
                             f"{layers.shape[0]} layer(s)")
        mask = layers[layer] == source_value
        taken = flat[mask]
        if np.any(taken):
            other = owner[int(taken[taken != 0][0])]
            raise ValueError(f"segments {other!r} and {name!r} of {str(path)!r} overlap in "
                             f"{int(np.count_nonzero(taken))} voxels; overlapping segments cannot be flattened into "
                             f"one label map")
        flat[mask] = value
        owner[value] = name
        if "color" in entry:
            color = tuple(int(round(min(1.0, max(0.0, float(c))) * 255)) for c in entry["color"])
        else:
            color = _PALETTE[(value - 1) % len(_PALETTE)]
        segments.append(Segment(value, name, color))
    for layer_index in range(layers.shape[0]):
        known = {int(e.get("labelValue", 1)) for e in entries if int(e.get("layer", 0)) == layer_index}
        stray = sorted(set(np.unique(layers[layer_index]).tolist()) - {0} - known)
        if stray:
            raise ValueError(f"Slicer segmentation {str(path)!r} has voxel values {stray} in layer {layer_index} "
                             f"that belong to no segment")
    ijk_to_lps = np.asarray(segmentation["ijkToLPS"], dtype=np.float64)
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    grid = Geometry(flat.shape, spacing, ijk_to_lps[:3, 3], (ijk_to_lps[:3, :3] / spacing).reshape(-1))
    return LabelMap(grid.image_from_array(flat.transpose(2, 1, 0)), tuple(segments))


def _flattened_values(entries: Sequence[dict]) -> list:
    """Label value of each segment in the flattened map: its own if unique across layers, else 1..N in order."""
    values = [int(e.get("labelValue", 1)) for e in entries]
    if len(set(values)) == len(values) and all(1 <= v <= _MAX_LABEL for v in values):
        return values
    return list(range(1, len(entries) + 1))
