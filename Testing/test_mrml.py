"""The MRML glue against real MRML nodes from the slicer-core wheel: geometry, names, colours, exact masks."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="the slicer-core wheel gives real MRML")
import vtk  # noqa: E402  (slicer-core brings its own vtk)
from vtk.util import numpy_support  # noqa: E402

from TCURLoRALib.cards import Label  # noqa: E402
from TCURLoRALib.mrml import export_training_case, export_volume, import_label_map  # noqa: E402

SHAPE_ZYX = (7, 9, 11)
LABELS = [Label(0, "background", (0, 0, 0)), Label(3, "left hippocampus", (220, 180, 30)),
          Label(4, "right hippocampus", (30, 180, 220))]


def rotation(ax: float, az: float) -> np.ndarray:
    cx, sx, cz, sz = math.cos(ax), math.sin(ax), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ rx


def add_volume(scene, array_zyx: np.ndarray, class_name: str = "vtkMRMLScalarVolumeNode", name: str = "T1"):
    """A volume node with an oblique direction (20 deg about x and z), spacing 0.8 x 1.0 x 2.5 mm."""
    node = scene.AddNewNodeByClass(class_name, name)
    image = vtk.vtkImageData()
    image.SetDimensions(array_zyx.shape[2], array_zyx.shape[1], array_zyx.shape[0])
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(array_zyx.ravel(), deep=True))
    node.SetAndObserveImageData(image)
    direction = rotation(math.radians(20), math.radians(20))
    matrix = vtk.vtkMatrix4x4()
    spacing = (0.8, 1.0, 2.5)
    origin = (12.0, -30.0, 5.0)
    for row in range(3):
        for col in range(3):
            matrix.SetElement(row, col, direction[row, col] * spacing[col])
        matrix.SetElement(row, 3, origin[row])
    node.SetIJKToRASMatrix(matrix)
    return node


def ijk_to_ras_of_file(path: Path) -> np.ndarray:
    """The file's own IJK-to-RAS matrix, from SimpleITK's LPS geometry."""
    image = sitk.ReadImage(str(path))
    direction = np.array(image.GetDirection()).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = image.GetOrigin()
    lps_to_ras = np.diag([-1, -1, 1, 1])
    return lps_to_ras @ matrix


def as_numpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


@pytest.fixture()
def scene():
    return slicer.vtkMRMLScene()


def blobs() -> np.ndarray:
    labels = np.zeros(SHAPE_ZYX, np.uint16)
    labels[2:5, 2:6, 1:4] = 3
    labels[3:6, 4:8, 6:10] = 4
    return labels


def test_export_volume_keeps_oblique_anisotropic_geometry_with_hardened_transform(scene, tmp_path: Path) -> None:
    voxels = np.arange(np.prod(SHAPE_ZYX), dtype=np.int16).reshape(SHAPE_ZYX)
    volume = add_volume(scene, voxels)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    to_parent = vtk.vtkMatrix4x4()
    turn = rotation(0.0, math.radians(30))
    for row in range(3):
        for col in range(3):
            to_parent.SetElement(row, col, turn[row, col])
    to_parent.SetElement(0, 3, 7.0)
    to_parent.SetElement(2, 3, -4.0)
    transform.SetMatrixTransformToParent(to_parent)
    volume.SetAndObserveTransformNodeID(transform.GetID())

    path = export_volume(volume, tmp_path / "t1.nii.gz")
    expected = as_numpy(to_parent) @ as_numpy(_ijk_to_ras(volume))
    np.testing.assert_allclose(ijk_to_ras_of_file(path), expected, atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), voxels)
    assert volume.GetParentTransformNode() is transform, "the node itself must not be hardened"
    assert [p.name for p in tmp_path.iterdir()] == ["t1.nii.gz"], "no temporary file left behind"


def _ijk_to_ras(node) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return matrix


def test_export_refuses_empty_or_multicomponent_volumes(scene, tmp_path: Path) -> None:
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(ValueError, match="volume 'empty' has no image data"):
        export_volume(empty, tmp_path / "x.nii.gz")


def test_label_map_comes_back_as_named_coloured_segments_voxel_exact(scene, tmp_path: Path) -> None:
    volume = add_volume(scene, np.zeros(SHAPE_ZYX, np.int16))
    labels = blobs()
    label_node = add_volume(scene, labels, "vtkMRMLLabelMapVolumeNode", "result")
    written = export_volume(label_node, tmp_path / "result.nii.gz")

    segmentation = import_label_map(written, LABELS, volume)
    segments = segmentation.GetSegmentation()
    assert [segments.GetNthSegment(i).GetName() for i in range(segments.GetNumberOfSegments())] == [
        "left hippocampus", "right hippocampus"]
    colour = segments.GetSegment(segments.GetSegmentIdBySegmentName("right hippocampus")).GetColor()
    np.testing.assert_allclose(colour, (30 / 255, 180 / 255, 220 / 255), atol=1e-6)

    mapping = {"left hippocampus": Label(1, "hippocampus_left", (1, 2, 3)),
               "right hippocampus": Label(2, "hippocampus_right", (4, 5, 6))}
    _, label_path = export_training_case(volume, segmentation, mapping, tmp_path, "case0")
    exported = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path)))
    expected = np.select([labels == 3, labels == 4], [1, 2], 0)
    np.testing.assert_array_equal(exported, expected)
    np.testing.assert_allclose(ijk_to_ras_of_file(label_path), as_numpy(_ijk_to_ras(volume)), atol=1e-4)

    # Filling the same node again replaces its segments.
    import_label_map(written, LABELS, volume, segmentation_node=segmentation)
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 2


def test_import_refuses_values_outside_the_labels(scene, tmp_path: Path) -> None:
    volume = add_volume(scene, np.zeros(SHAPE_ZYX, np.int16))
    labels = blobs()
    labels[0, 0, 0] = 9
    written = export_volume(add_volume(scene, labels, "vtkMRMLLabelMapVolumeNode"), tmp_path / "odd.nii.gz")
    with pytest.raises(ValueError, match=r"holds values \[9\] that are not among the labels \[3, 4\]"):
        import_label_map(written, LABELS, volume)
    with pytest.raises(FileNotFoundError):
        import_label_map(tmp_path / "none.nii.gz", LABELS, volume)


def test_training_export_errors_are_specific(scene, tmp_path: Path) -> None:
    volume = add_volume(scene, np.zeros(SHAPE_ZYX, np.int16))
    written = export_volume(add_volume(scene, blobs(), "vtkMRMLLabelMapVolumeNode"), tmp_path / "l.nii.gz")
    segmentation = import_label_map(written, LABELS, volume)
    with pytest.raises(ValueError, match=r"has no segment\(s\) \['amygdala'\]"):
        export_training_case(volume, segmentation, {"amygdala": LABELS[1]}, tmp_path, "c")
    with pytest.raises(ValueError, match="map at least one segment"):
        export_training_case(volume, segmentation, {}, tmp_path, "c")
