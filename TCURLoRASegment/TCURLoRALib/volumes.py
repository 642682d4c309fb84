"""Volumes: read images and label maps, write label maps; the one module callers import for volumes.

Reading keeps a file's grid exactly as stored (see :mod:`TCURLoRALib.geometry` for the conventions: LPS, index
order (x, y, z), arrays (z, y, x)). The pieces live in their own modules and are importable from here too:
:mod:`~TCURLoRALib.geometry` (grids), :mod:`~TCURLoRALib.labelmap` (label maps and segments),
:mod:`~TCURLoRALib.modelgrid` (a model's view of an image and the way back), :mod:`~TCURLoRALib.segnrrd`
(Slicer segmentations).

Every write is atomic (:func:`TCURLoRALib.outputs.atomic_write`): a crash or a cancelled job never leaves half a file
behind.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import SimpleITK as sitk

from .geometry import GRID_TOLERANCE, Geometry, as_scalar_3d, offset_on_lattice
from .labelmap import MAX_LABEL, PALETTE, LabelMap, Segment, check_label_array, compact_labels
from .modelgrid import (MAX_MODEL_VOXELS, MIN_AXIS_VOXELS, NORMALIZATION_KINDS, GridMapping, PreparedVolume,
                        check_normalization, model_grid_for, normalize_intensity, prepare_for_model)
from .outputs import atomic_write
from .segnrrd import SEGMENTATION_EXTENSION, is_slicer_segmentation, read_slicer_segmentation, write_segmentation

__all__ = [
    "GRID_TOLERANCE", "IMAGE_EXTENSIONS", "LABEL_MAP_EXTENSIONS", "LABEL_WRITE_EXTENSIONS", "MAX_MODEL_VOXELS",
    "MIN_AXIS_VOXELS", "NORMALIZATION_KINDS", "SEGMENTATION_EXTENSION", "Geometry", "GridMapping", "LabelMap",
    "PreparedVolume", "Segment", "align_label_map", "check_normalization", "model_grid_for", "normalize_intensity",
    "prepare_for_model", "read_case", "read_image", "read_label_map", "write_label_map", "write_segmentation",
]

PathLike = Union[str, "os.PathLike[str]"]

IMAGE_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
LABEL_MAP_EXTENSIONS = IMAGE_EXTENSIONS + (SEGMENTATION_EXTENSION,)
# Single-file formats only: a detached header (.nhdr, .mhd) is two files, which one os.replace cannot make atomic.
LABEL_WRITE_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".mha")


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
    image = as_scalar_3d(_sitk_read(path), str(path))
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
    if is_slicer_segmentation(path):
        label_map = read_slicer_segmentation(path)
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
                              allow_cropped=is_slicer_segmentation(Path(label_path)))
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
    index = offset_on_lattice(label_grid, image_grid) if allow_cropped else None
    if index is None:
        raise ValueError(f"{label_name} does not lie on the grid of {image_name}: the label map has "
                         f"{label_grid.describe()}; the image has {image_grid.describe()}")
    padded = np.zeros(image_grid.shape, dtype=np.uint16)
    x, y, z = index
    nx, ny, nz = label_grid.size
    padded[z:z + nz, y:y + ny, x:x + nx] = label_map.array()
    return LabelMap(image_grid.image_from_array(padded), label_map.segments)

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
    array = compact_labels(check_label_array(labels, geometry.shape, "label map to write"))
    image = geometry.image_from_array(array)
    atomic_write(path, lambda tmp: sitk.WriteImage(image, tmp, True), what="label map")
    return path


# ---------------------------------------------------------------- helpers


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

def _read_label_volume(path: Path) -> LabelMap:
    image = as_scalar_3d(_sitk_read(path), f"label map {str(path)!r}")
    _require_finite(image, path, f"label map {str(path)!r}")
    array = sitk.GetArrayFromImage(image)
    if np.issubdtype(array.dtype, np.floating) and not np.array_equal(array, np.rint(array)):
        raise ValueError(f"label map {str(path)!r} has non-integer values (e.g. {array[array != np.rint(array)][0]!r})")
    if array.size and (array.min() < 0 or array.max() > MAX_LABEL):
        raise ValueError(f"label map {str(path)!r} values must be in 0..{MAX_LABEL}, "
                         f"got {array.min()!r}..{array.max()!r}")
    values = [int(v) for v in np.unique(array) if v != 0]
    segments = tuple(Segment(v, f"Segment_{v}", PALETTE[(v - 1) % len(PALETTE)]) for v in values)
    labels = Geometry.from_image(image).image_from_array(array.astype(np.uint16))
    return LabelMap(labels, segments)
