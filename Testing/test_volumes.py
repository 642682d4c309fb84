"""Tests of the volume modules (volumes, geometry, labelmap, modelgrid, segnrrd): reading, model grid round trips,
writing, and the error messages."""
from __future__ import annotations

import math
import re
import struct

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from TCURLoRALib import volumes
from TCURLoRALib.volumes import Geometry, Segment

SPACING = (0.8, 1.0, 2.5)
SIZE = (40, 36, 16)  # x, y, z
ORIGIN = (-14.2, 31.7, -52.9)
BLOB_RADIUS_MM = 7.0
ZSCORE = {"kind": "zscore_nonzero"}
PERCENTILE = {"kind": "percentile", "lower": 0.5, "upper": 99.5}


def _rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    a, b = [i for i in range(3) if i != axis]
    matrix = np.eye(3)
    matrix[a, a], matrix[a, b], matrix[b, a], matrix[b, b] = c, -s, s, c
    return matrix


# Oblique: 20 degrees about x, then 20 degrees about z.
DIRECTION = tuple((_rotation(2, 20) @ _rotation(0, 20)).reshape(-1))
GRID = Geometry(SIZE, SPACING, ORIGIN, DIRECTION)


def _physical_points(grid: Geometry) -> np.ndarray:
    """LPS position of every voxel centre, array (z, y, x, 3)."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij")
    ijk = np.stack([i, j, k], axis=-1).astype(np.float64)
    return ijk @ (grid.direction_matrix() * np.array(grid.spacing)).T + np.array(grid.origin)


def _blob_centre(grid: Geometry) -> np.ndarray:
    """A point inside the grid, away from its centre so that a wrong flip would move the blob."""
    return np.array(grid.origin) + grid.direction_matrix() @ (np.array([12, 11, 6]) * np.array(grid.spacing))


def _blob(grid: Geometry) -> np.ndarray:
    """uint8 (z, y, x): 1 inside a sphere of BLOB_RADIUS_MM around _blob_centre."""
    distance = np.linalg.norm(_physical_points(grid) - _blob_centre(grid), axis=-1)
    return (distance <= BLOB_RADIUS_MM).astype(np.uint8)


def _image(grid: Geometry = GRID) -> sitk.Image:
    """float32 image: a ramp along x plus a bright blob, so flips and shifts change the voxels."""
    ramp = np.broadcast_to(np.arange(grid.size[0], dtype=np.float32), grid.shape)
    return grid.image_from_array(ramp + 50.0 * _blob(grid) + 1.0)


def _centroid_mm(labels: np.ndarray, grid: Geometry) -> np.ndarray:
    return _physical_points(grid)[labels > 0].mean(axis=0)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def _assert_same_grid(grid: Geometry, expected: Geometry) -> None:
    assert grid.size == expected.size
    np.testing.assert_allclose(grid.spacing, expected.spacing, rtol=1e-6)
    np.testing.assert_allclose(grid.origin, expected.origin, atol=1e-5)
    np.testing.assert_allclose(grid.direction, expected.direction, atol=1e-6)


def _write(image: sitk.Image, path) -> str:
    sitk.WriteImage(image, str(path))
    return str(path)


# ---------------------------------------------------------------- geometry round trips


@pytest.mark.parametrize("extension", [".nii.gz", ".nrrd"])
def test_label_blob_survives_model_grid_round_trip_on_oblique_anisotropic_grid(tmp_path, extension):
    image_path = _write(_image(), tmp_path / f"image{extension}")
    image = volumes.read_image(image_path)
    input_grid = Geometry.from_image(image)  # the file's own grid, as stored (NIfTI rounds to float32)
    label_path = volumes.write_label_map(tmp_path / f"labels{extension}", _blob(input_grid), input_grid)
    image, label_map = volumes.read_case(image_path, label_path)

    prepared = volumes.prepare_for_model(image, (1.5, 1.5, 1.5), "RAS", ZSCORE)
    model_grid = prepared.mapping.model_grid
    assert prepared.array.dtype == np.float32 and prepared.array.shape == model_grid.shape
    assert sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(model_grid.direction) == "RAS"
    model_labels = prepared.mapping.labels_to_model(label_map.image)
    np.testing.assert_allclose(_centroid_mm(model_labels, model_grid), _blob_centre(GRID), atol=0.75)
    # The bright blob of the image is where the labels are on the model grid too.
    assert prepared.array[model_labels > 0].mean() > prepared.array[model_labels == 0].mean() + 1.0

    back = prepared.mapping.labels_to_input(model_labels)
    out_path = volumes.write_label_map(tmp_path / f"prediction{extension}", back, input_grid)
    written = sitk.ReadImage(str(out_path))
    _assert_same_grid(Geometry.from_image(written), input_grid)
    written_labels = sitk.GetArrayFromImage(written)
    assert _dice(written_labels, label_map.array()) > 0.9
    np.testing.assert_allclose(_centroid_mm(written_labels, input_grid), _blob_centre(GRID), atol=0.5)


def test_reorientation_alone_flips_axes_and_round_trips_exactly():
    image = _image()
    # Close to LPS, so "RAS" flips x and y and keeps the spacing per axis.
    prepared = volumes.prepare_for_model(image, SPACING, "RAS", PERCENTILE)
    mapping = prepared.mapping
    assert mapping.model_grid.size == GRID.size
    flipped = GRID.direction_matrix() * np.array([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(mapping.model_grid.direction_matrix(), flipped, atol=1e-12)
    expected = volumes.normalize_intensity(sitk.GetArrayFromImage(image)[:, ::-1, ::-1], PERCENTILE)
    np.testing.assert_allclose(prepared.array, expected, atol=1e-5)
    labels = _blob(GRID).astype(np.int64) * 3
    model_labels = mapping.labels_to_model(labels)
    np.testing.assert_array_equal(model_labels, labels[:, ::-1, ::-1])
    back = mapping.labels_to_input(model_labels)
    assert back.dtype == np.int64
    np.testing.assert_array_equal(back, labels)


@pytest.mark.parametrize("code", ["RAS", "LPS", "PIR", "SLA"])
def test_reoriented_grid_is_the_grid_of_simpleitk_dicomorient(code):
    image = sitk.Image(list(SIZE), sitk.sitkUInt8)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION)
    expected = Geometry.from_image(sitk.DICOMOrient(image, code))
    _assert_same_grid(volumes.model_grid_for(GRID, expected.spacing, code), expected)


def test_model_grid_keeps_the_physical_box_centred():
    model = volumes.model_grid_for(GRID, (2.0, 2.0, 2.0), "LPS")
    assert model.size == (16, 18, 20)  # round(40*0.8/2), round(36*1.0/2), round(16*2.5/2)

    def centre(grid: Geometry) -> np.ndarray:
        half_extent = (np.array(grid.size) - 1) * np.array(grid.spacing) / 2
        return np.array(grid.origin) + grid.direction_matrix() @ half_extent

    np.testing.assert_allclose(centre(model), centre(GRID), atol=1e-9)


def test_probabilities_map_back_linearly_and_stay_normalised():
    prepared = volumes.prepare_for_model(_image(), (1.5, 1.5, 1.5), "RAS", ZSCORE)
    mapping = prepared.mapping
    model_labels = mapping.labels_to_model(_blob(GRID))
    foreground = model_labels.astype(np.float32)
    probabilities = np.stack([1.0 - foreground, foreground])  # (C, D, H, W)
    back = mapping.probabilities_to_input(probabilities)
    assert back.shape == (2,) + GRID.shape and back.dtype == np.float32
    np.testing.assert_allclose(back.sum(axis=0), 1.0, atol=1e-5)
    assert back.min() >= -1e-6 and back.max() <= 1 + 1e-6
    # Linear, not nearest: the blob's edge gets fractional values.
    assert np.count_nonzero((back[1] > 0.05) & (back[1] < 0.95)) > 0
    agreement = np.mean(back.argmax(axis=0) == mapping.labels_to_input(model_labels))
    assert agreement > 0.98
    with pytest.raises(ValueError, match=r"probabilities must have shape \(C, \*\(.*\)\) on the model grid"):
        mapping.probabilities_to_input(probabilities[:, :-1])


# ---------------------------------------------------------------- formats


def test_nifti_nrrd_metaimage_read_with_the_same_geometry_and_voxels(tmp_path):
    image = _image()
    reads = {ext: volumes.read_image(_write(image, tmp_path / f"image{ext}"))
             for ext in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")}
    for ext, read in reads.items():
        assert read.GetDimension() == 3, ext
        _assert_same_grid(Geometry.from_image(read), GRID)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(image), err_msg=ext)


def test_segmentation_written_and_read_back_with_names_colours_values(tmp_path):
    labels = _blob(GRID).astype(np.uint16)
    labels[0, :4, :4] = 3
    segments = [Segment(1, "liver", (204, 51, 51)), Segment(3, "tumour", (25, 230, 77)),
                Segment(7, "vessel (empty)", (0, 77, 255))]
    path = volumes.write_segmentation(tmp_path / "case.seg.nrrd", labels, GRID, segments)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.seg.nrrd"]  # no temporary left behind

    raw = slicerio.read_segmentation(str(path))  # what Slicer would see
    assert [(s["name"], s["labelValue"]) for s in raw["segments"]] == [("liver", 1), ("tumour", 3),
                                                                       ("vessel (empty)", 7)]
    np.testing.assert_allclose(raw["segments"][0]["color"], [0.8, 0.2, 0.2], atol=1e-6)  # Slicer's 0-1 floats
    label_map = volumes.read_label_map(path)
    assert label_map.segments == tuple(segments)
    _assert_same_grid(label_map.geometry, GRID)
    np.testing.assert_array_equal(label_map.array(), labels)


def _write_layered_segmentation(path, voxels_ijk: np.ndarray, entries: list) -> None:
    grid = Geometry(voxels_ijk.shape[-3:], SPACING, ORIGIN, DIRECTION)
    slicerio.write_segmentation(str(path), {"voxels": voxels_ijk, "ijkToLPS": grid.ijk_to_lps(), "segments": entries})


def test_multilayer_segmentation_is_flattened_with_unique_values(tmp_path):
    layers = np.zeros((2, 10, 8, 6), dtype=np.uint8)  # (layer, i, j, k)
    layers[0, :3] = 1
    layers[1, 5:] = 1
    entries = [{"id": "a", "name": "left", "labelValue": 1, "layer": 0, "color": [1.0, 0.0, 0.2]},
               {"id": "b", "name": "right", "labelValue": 1, "layer": 1, "color": [0.0, 0.0, 1.0]}]
    path = tmp_path / "layers.seg.nrrd"
    _write_layered_segmentation(path, layers, entries)
    label_map = volumes.read_label_map(path)
    assert label_map.segments == (Segment(1, "left", (255, 0, 51)), Segment(2, "right", (0, 0, 255)))
    flat = label_map.array()  # (z, y, x) = (k, j, i)
    assert flat.shape == (6, 8, 10)
    assert np.all(flat[:, :, :3] == 1) and np.all(flat[:, :, 5:] == 2) and np.all(flat[:, :, 3:5] == 0)


def test_overlapping_segments_are_refused_naming_both(tmp_path):
    layers = np.zeros((2, 10, 8, 6), dtype=np.uint8)
    layers[0, :6] = 1
    layers[1, 4:] = 1  # i = 4, 5 overlap: 2 * 8 * 6 voxels
    entries = [{"id": "a", "name": "left", "labelValue": 1, "layer": 0},
               {"id": "b", "name": "right", "labelValue": 1, "layer": 1}]
    path = tmp_path / "overlap.seg.nrrd"
    _write_layered_segmentation(path, layers, entries)
    with pytest.raises(ValueError, match=r"segments 'left' and 'right' .* overlap in 96 voxels"):
        volumes.read_label_map(path)


def test_slicer_segmentation_cropped_to_its_extent_is_padded_onto_the_image_grid(tmp_path):
    image_path = _write(_image(), tmp_path / "image.nrrd")
    crop = Geometry((5, 4, 3), SPACING, tuple(np.array(ORIGIN) + GRID.direction_matrix()
                                              @ (np.array([7, 9, 2]) * np.array(SPACING))), DIRECTION)
    volumes.write_segmentation(tmp_path / "crop.seg.nrrd", np.ones(crop.shape, np.uint8), crop,
                               [Segment(1, "box")])
    _, label_map = volumes.read_case(image_path, tmp_path / "crop.seg.nrrd")
    _assert_same_grid(label_map.geometry, GRID)
    expected = np.zeros(GRID.shape, np.uint16)
    expected[2:5, 9:13, 7:12] = 1
    np.testing.assert_array_equal(label_map.array(), expected)


def test_plain_label_volume_gets_one_segment_per_value(tmp_path):
    labels = _blob(GRID) * 4
    labels[0, 0, 0] = 2
    path = volumes.write_label_map(tmp_path / "labels.nii", labels, GRID)
    label_map = volumes.read_label_map(path)
    assert [(s.value, s.name) for s in label_map.segments] == [(2, "Segment_2"), (4, "Segment_4")]
    np.testing.assert_array_equal(label_map.array(), labels)


def test_failed_write_leaves_neither_file_nor_temporary(tmp_path, monkeypatch):
    def broken_writer(image, path, *args):
        open(path, "wb").write(b"half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(volumes.sitk, "WriteImage", broken_writer)
    with pytest.raises(RuntimeError, match="disk full"):
        volumes.write_label_map(tmp_path / "labels.nii.gz", _blob(GRID), GRID)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- bad inputs


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere.nii.gz"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        volumes.read_image(missing)
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        volumes.read_label_map(missing)


def test_unsupported_extension_lists_the_supported_ones(tmp_path):
    path = tmp_path / "scan.png"
    path.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"unsupported image file .*scan\.png.*\.nii, \.nii\.gz, \.nrrd, \.nhdr, "
                                         r"\.mha, \.mhd"):
        volumes.read_image(path)
    with pytest.raises(ValueError, match=r"unsupported label map file .*\.seg\.nrrd"):
        volumes.read_label_map(path)
    with pytest.raises(ValueError, match=r"cannot write label map .*\.nii, \.nii\.gz, \.nrrd, \.mha"):
        volumes.write_label_map(tmp_path / "out.png", _blob(GRID), GRID)


def test_two_dimensional_image_is_refused_with_its_dimension(tmp_path):
    path = _write(sitk.Image(12, 10, sitk.sitkFloat32), tmp_path / "slice.nii.gz")
    with pytest.raises(ValueError, match=r"is 2-D \(size \(12, 10\)\); a 3-D scalar volume is needed"):
        volumes.read_image(path)


def test_four_dimensional_image_is_refused_unless_its_fourth_axis_has_size_one(tmp_path):
    volume = _image()
    path = _write(sitk.JoinSeries([volume, volume]), tmp_path / "series.nrrd")
    with pytest.raises(ValueError, match=r"is 4-D \(size \(40, 36, 16, 2\)\) with 2 volumes along the 4th axis; "
                                         r"a 3-D scalar volume is needed"):
        volumes.read_image(path)
    single = _write(sitk.JoinSeries([volume]), tmp_path / "single.mha")
    assert sitk.ReadImage(single).GetDimension() == 4  # the file really is 4-D
    squeezed = volumes.read_image(single)
    assert squeezed.GetDimension() == 3
    assert squeezed.GetSize() == SIZE


def test_multi_component_image_is_refused_and_single_component_squeezed(tmp_path):
    volume = _image()
    path = _write(sitk.Compose([volume, volume, volume]), tmp_path / "rgb.nrrd")
    with pytest.raises(ValueError, match=r"has 3 components per voxel; a 3-D scalar volume is needed"):
        volumes.read_image(path)
    single = _write(sitk.Compose([volume]), tmp_path / "one.mha")
    assert sitk.ReadImage(single).GetNumberOfComponentsPerPixel() == 1
    read = volumes.read_image(single)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(volume))


@pytest.mark.parametrize("extension", [".nii.gz", ".nii", ".nrrd", ".mha"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_finite_voxels_are_counted(tmp_path, extension, dtype):
    # NIfTI matters most: ITK 5's reader turns NaN and inf into 0, so they have to be found in the file.
    array = sitk.GetArrayFromImage(_image()).astype(dtype)
    array[0, 0, :2] = np.nan
    array[1, 1, 1] = -np.inf
    path = _write(GRID.image_from_array(array), tmp_path / f"bad{extension}")
    with pytest.raises(ValueError, match=r"has 3 non-finite voxels \(2 NaN, 1 inf\) of 23040"):
        volumes.read_image(path)


def test_non_finite_voxels_are_counted_in_a_nifti2_file(tmp_path):
    array = np.ones((3, 4, 5), np.float64)
    array[0, 0, :3] = np.nan
    array[2, 3, 4] = np.inf
    header = bytearray(540)  # NIfTI-2: sizeof_hdr, magic, datatype, bitpix, dim[8] (int64), vox_offset (int64)
    struct.pack_into("<i8shh8q", header, 0, 540, b"n+2\x00\r\n\x1a\n", 64, 64, 3, 5, 4, 3, 1, 1, 1, 1)
    struct.pack_into("<q", header, 168, 544)
    path = tmp_path / "two.nii"
    path.write_bytes(bytes(header) + bytes(4) + array.tobytes())
    assert volumes._count_non_finite_nifti(path) == (3, 1, 60)


def test_label_map_of_another_size_or_grid_names_both_files(tmp_path):
    image_path = _write(_image(), tmp_path / "image.nii.gz")
    small = Geometry((20, 36, 16), SPACING, ORIGIN, DIRECTION)
    small_path = volumes.write_label_map(tmp_path / "small.nii.gz", np.ones(small.shape, np.uint8), small)
    with pytest.raises(ValueError, match=r"label map '.*small\.nii\.gz' does not lie on the grid of image "
                                         r"'.*image\.nii\.gz'.*size \(20, 36, 16\).*size \(40, 36, 16\)"):
        volumes.read_case(image_path, small_path)
    shifted = Geometry(SIZE, SPACING, (ORIGIN[0] + 0.4, ORIGIN[1], ORIGIN[2]), DIRECTION)
    shifted_path = volumes.write_label_map(tmp_path / "shifted.nrrd", _blob(shifted), shifted)
    with pytest.raises(ValueError, match=r"label map '.*shifted\.nrrd' does not lie on the grid of image "
                                         r"'.*image\.nii\.gz'"):
        volumes.read_case(image_path, shifted_path)


def test_empty_label_map_is_refused(tmp_path):
    path = volumes.write_label_map(tmp_path / "empty.nrrd", np.zeros(GRID.shape, np.uint8), GRID)
    with pytest.raises(ValueError, match=r"label map '.*empty\.nrrd' is empty"):
        volumes.read_label_map(path)
    assert volumes.read_label_map(path, allow_empty=True).segments == ()


def test_non_integer_label_values_are_refused(tmp_path):
    path = _write(GRID.image_from_array(_blob(GRID).astype(np.float32) * 1.5), tmp_path / "soft.nii.gz")
    with pytest.raises(ValueError, match=r"non-integer values"):
        volumes.read_label_map(path)


@pytest.mark.parametrize("spec, message", [
    ({"kind": "minmax"}, r"unknown normalization kind 'minmax'"),
    ({"kind": "percentile", "lower": 0.5}, r"needs exactly the keys \['kind', 'lower', 'upper'\]"),
    ({"kind": "percentile", "lower": 99.0, "upper": 1.0}, r"0 <= lower < upper <= 100, got lower=99.0"),
    ({"kind": "zscore_nonzero", "eps": 1}, r"needs exactly the keys \['kind'\]"),
    ("zscore", r"must be a dict with a 'kind'"),
])
def test_bad_normalization_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        volumes.prepare_for_model(_image(), (2.0, 2.0, 2.0), "RAS", spec)


@pytest.mark.parametrize("orientation, spacing, message", [
    ("RAX", (2.0, 2.0, 2.0), r"orientation 'RAX' must use one letter of each pair"),
    ("RLS", (2.0, 2.0, 2.0), r"orientation 'RLS' must use one letter of each pair"),
    ("RA", (2.0, 2.0, 2.0), r"3-letter code such as 'RAS', got 'RA'"),
    ("RAS", (2.0, 0.0, 2.0), r"spacing must be 3 positive numbers .* got \(2.0, 0.0, 2.0\)"),
    ("RAS", (2.0, 2.0), r"spacing must be 3 positive numbers"),
])
def test_bad_orientation_or_spacing(orientation, spacing, message):
    with pytest.raises(ValueError, match=message):
        volumes.prepare_for_model(_image(), spacing, orientation, ZSCORE)


def test_normalizations_give_their_documented_ranges():
    array = np.zeros((4, 5, 6), np.float32)
    array[1:3, 1:4, 1:5] = np.linspace(10.0, 30.0, 24).reshape(2, 3, 4)
    zscore = volumes.normalize_intensity(array, ZSCORE)
    foreground = array != 0
    assert np.all(zscore[~foreground] == 0)
    assert abs(zscore[foreground].mean()) < 1e-5 and abs(zscore[foreground].std() - 1) < 1e-5
    scaled = volumes.normalize_intensity(array, {"kind": "percentile", "lower": 0, "upper": 100})
    assert scaled.min() == 0.0 and scaled.max() == 1.0
    with pytest.raises(ValueError, match="all zeros"):
        volumes.normalize_intensity(np.zeros(8), ZSCORE)


def test_normalizations_equal_monais_transforms():
    """MONAI as the independent reference: NormalizeIntensity(nonzero=True) and
    ScaleIntensityRangePercentiles(b_min=0, b_max=1, clip=True) give the same values (to float32 rounding)."""
    from monai.transforms import NormalizeIntensity, ScaleIntensityRangePercentiles

    array = np.random.default_rng(0).normal(50, 20, (20, 21, 22)).astype(np.float32)
    array[array < 40] = 0
    np.testing.assert_allclose(volumes.normalize_intensity(array, ZSCORE),
                               np.asarray(NormalizeIntensity(nonzero=True)(array)), rtol=0, atol=1e-6)
    reference = ScaleIntensityRangePercentiles(lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True)(array)
    np.testing.assert_allclose(volumes.normalize_intensity(array, PERCENTILE), np.asarray(reference), rtol=0, atol=1e-6)


NO_TORCH = """
import numpy as np
import SimpleITK as sitk
from TCURLoRALib import volumes
image = sitk.GetImageFromArray(np.arange(16 * 18 * 20, dtype=np.float32).reshape(16, 18, 20))
prepared = volumes.prepare_for_model(image, (2.0, 2.0, 2.0), "RAS", {"kind": "zscore_nonzero"})
print(prepared.array.shape)
"""


def test_volumes_need_no_torch():
    from faults import run_python_without

    result = run_python_without(("torch", "monai"), NO_TORCH)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(8, 9, 10)"


def test_predictions_of_the_wrong_shape_or_type_are_refused():
    mapping = volumes.prepare_for_model(_image(), (2.0, 2.0, 2.0), "RAS", ZSCORE).mapping
    with pytest.raises(ValueError, match=r"prediction on the model grid must have shape \(20, 18, 16\)"):
        mapping.labels_to_input(np.zeros((20, 18, 15), np.uint8))
    with pytest.raises(ValueError, match=r"must hold integers, got dtype float32"):
        mapping.labels_to_input(np.zeros((20, 18, 16), np.float32))


def test_segment_validates_its_fields():
    with pytest.raises(ValueError, match=r"segment value must be in 1..65535 .* got 0"):
        Segment(0, "background")
    with pytest.raises(ValueError, match=r"colour must be 3 RGB integers in 0-255, got \(1.0, 0.0, 0.0\)"):
        Segment(1, "red", (1.0, 0.0, 0.0))
    with pytest.raises(ValueError, match=r"colour must be 3 RGB integers in 0-255, got \(256, 0, 0\)"):
        Segment(1, "red", (256, 0, 0))
    with pytest.raises(ValueError, match=r"name must be a non-empty string"):
        Segment(1, " ")


def test_segmentation_refuses_labels_without_segment(tmp_path):
    labels = _blob(GRID) * 2
    with pytest.raises(ValueError, match=r"label values \[2\] in the label map have no segment"):
        volumes.write_segmentation(tmp_path / "x.seg.nrrd", labels, GRID, [Segment(1, "one")])
    with pytest.raises(ValueError, match=r"must end with '\.seg\.nrrd'"):
        volumes.write_segmentation(tmp_path / "x.nrrd", labels, GRID, [Segment(2, "two")])
    with pytest.raises(FileNotFoundError, match=r"folder .*missing. does not exist"):
        volumes.write_segmentation(tmp_path / "missing" / "x.seg.nrrd", labels, GRID, [Segment(2, "two")])
