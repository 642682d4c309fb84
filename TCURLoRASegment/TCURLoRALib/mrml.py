"""Slicer glue: MRML nodes to files for the engine, and the engine's results back into MRML nodes (no qt).

Runs with the MRML of a real Slicer and with Kitware's ``slicer-core`` wheel alike: nodes are written and read with
Slicer's own storage nodes (``vtkMRMLVolumeArchetypeStorageNode``), segments are made by
``vtkSlicerSegmentationsModuleLogic``; nothing uses ``slicer.mrmlScene`` or ``slicer.util`` GUI helpers, the scene is
always the node's own.

Geometry: a volume under a linear parent transform is written with the transform hardened into its IJK-to-RAS
matrix (the node itself is left as it is); a non-linear parent transform is refused, as the engine works on grids.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from .cards import Label

__all__ = ["export_training_case", "export_volume", "import_label_map", "world_ijk_to_ras"]


def world_ijk_to_ras(volume_node) -> vtk.vtkMatrix4x4:
    """The node's IJK-to-RAS matrix in world coordinates (its linear parent transforms applied).

    Raises:
        ValueError: the volume is under a non-linear transform (harden it in Slicer first).
    """
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    parent = volume_node.GetParentTransformNode()
    if parent is None:
        return ijk_to_ras
    if not parent.IsTransformToWorldLinear():
        raise ValueError(
            f"volume {volume_node.GetName()!r} is under the non-linear transform {parent.GetName()!r}: "
            "harden the transform (Data module, right-click, Harden transform) before using it here"
        )
    to_world = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(to_world)
    world = vtk.vtkMatrix4x4()
    vtk.vtkMatrix4x4.Multiply4x4(to_world, ijk_to_ras, world)
    return world


def _write_node_atomically(node, path: Path) -> Path:
    """Write a volume node with Slicer's storage node to ``path`` through a temporary file in the same folder."""
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, temporary = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(temporary)
        storage.SetUseCompression(True)
        if not storage.WriteData(node):
            raise OSError(f"Slicer's volume writer could not write {str(path)!r}")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _detached_copy(node, image_data, matrix: vtk.vtkMatrix4x4, class_name: str):
    """A node of ``class_name`` in a private scene with ``image_data`` on the grid ``matrix``."""
    scene = slicer.vtkMRMLScene()
    copy = scene.AddNewNodeByClass(class_name, node.GetName())
    copy.SetAndObserveImageData(image_data)
    copy.SetIJKToRASMatrix(matrix)
    return copy


def export_volume(volume_node, path: str | os.PathLike) -> Path:
    """Write a scalar volume node for the engine (``.nii.gz``, ``.nrrd``...), parent transform hardened.

    Raises:
        ValueError: no image data, more than one component, or a non-linear parent transform.
    """
    image = volume_node.GetImageData() if volume_node is not None else None
    if image is None:
        name = volume_node.GetName() if volume_node is not None else None
        raise ValueError(f"volume {name!r} has no image data to export")
    if image.GetNumberOfScalarComponents() != 1:
        raise ValueError(
            f"volume {volume_node.GetName()!r} has {image.GetNumberOfScalarComponents()} components per voxel; "
            "a scalar (single-component) volume is needed"
        )
    copy = _detached_copy(volume_node, image, world_ijk_to_ras(volume_node), "vtkMRMLScalarVolumeNode")
    return _write_node_atomically(copy, Path(path))


def _label_array(labelmap_node) -> np.ndarray:
    """Voxels of a label map node as a flat view (VTK's x-fastest order)."""
    return numpy_support.vtk_to_numpy(labelmap_node.GetImageData().GetPointData().GetScalars())


def import_label_map(
    path: str | os.PathLike,
    labels: Sequence[Label],
    reference_volume,
    segmentation_node=None,
    name: str | None = None,
):
    """Load a label map written by the engine into a segmentation node, one segment a label.

    Args:
        path: the label map (in world coordinates, on the reference volume's grid).
        labels: the adapter's labels; label 0 (background) gets no segment. Names and colours come from here.
        reference_volume: the input volume; it becomes the segmentation's reference geometry.
        segmentation_node: a node to fill (its segments are replaced); a new one in the volume's scene otherwise.
        name: the name of a new segmentation node (default: ``<volume> segmentation``).

    Returns:
        the segmentation node, its segments in label order; a label with no voxel still gets an (empty) segment.

    Raises:
        FileNotFoundError: no such file. ValueError: the file holds values that are not among ``labels``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label map {str(path)!r} does not exist")
    scene = reference_volume.GetScene()
    if segmentation_node is None:
        segmentation_node = scene.AddNewNodeByClass(
            "vtkMRMLSegmentationNode", name or f"{reference_volume.GetName()} segmentation"
        )
        segmentation_node.CreateDefaultDisplayNodes()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "tcurlora-import")
    try:
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(path))
        if not storage.ReadData(labelmap):
            raise ValueError(f"Slicer could not read the label map {str(path)!r}")
        by_value = {label.value: label for label in labels if label.value != 0}
        found = set(np.unique(_label_array(labelmap)).tolist()) - {0}
        unknown = sorted(found - set(by_value))
        if unknown:
            raise ValueError(f"label map {str(path)!r} holds values {unknown} that are not among the labels "
                             f"{sorted(by_value)}")
        segmentation = segmentation_node.GetSegmentation()
        segmentation.RemoveAllSegments()
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation_node):
            raise ValueError(f"Slicer could not import {str(path)!r} into segments")
        imported = {}
        for index in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(index)
            imported[segment.GetLabelValue()] = segmentation.GetNthSegmentID(index)
        for value, label in by_value.items():
            segment_id = imported.get(value) or segmentation.AddEmptySegment("", label.name)
            segment = segmentation.GetSegment(segment_id)
            segment.SetName(label.name)
            segment.SetColor(*(channel / 255.0 for channel in label.color))
        _order_segments(segmentation, [segmentation.GetSegmentIdBySegmentName(label.name) for label in by_value.values()])
    finally:
        scene.RemoveNode(labelmap)
    return segmentation_node


def _order_segments(segmentation, segment_ids: list[str]) -> None:
    for position, segment_id in enumerate(segment_ids):
        segmentation.SetSegmentIndex(segment_id, position)


def export_training_case(
    volume_node,
    segmentation_node,
    mapping: Mapping[str, Label],
    folder: str | os.PathLike,
    case_name: str,
) -> tuple[Path, Path]:
    """Write one training case: the volume and a label map of the mapped segments on the volume's grid.

    Args:
        volume_node: the image.
        segmentation_node: its segmentation (segments named as in ``mapping``; others are left out, as background).
        mapping: segment name -> the adapter label whose value its voxels get.
        folder: where to write ``<case_name>_image.nii.gz`` and ``<case_name>_label.nii.gz``.

    Raises:
        ValueError: a mapped segment is missing, the mapping is empty, the two nodes are under different transforms,
            or the mapped segments hold no voxel.
    """
    if not mapping:
        raise ValueError("map at least one segment to a label")
    segmentation = segmentation_node.GetSegmentation()
    names = {segmentation.GetNthSegment(i).GetName(): segmentation.GetNthSegmentID(i)
             for i in range(segmentation.GetNumberOfSegments())}
    missing = sorted(set(mapping) - set(names))
    if missing:
        raise ValueError(f"segmentation {segmentation_node.GetName()!r} has no segment(s) {missing}; it has "
                         f"{sorted(names)}")
    if segmentation_node.GetTransformNodeID() != volume_node.GetTransformNodeID():
        raise ValueError(f"segmentation {segmentation_node.GetName()!r} and volume {volume_node.GetName()!r} are "
                         "under different transforms: harden both first")
    folder = Path(folder)
    image_path = export_volume(volume_node, folder / f"{case_name}_image.nii.gz")
    segment_ids = vtk.vtkStringArray()
    for segment_name in mapping:
        segment_ids.InsertNextValue(names[segment_name])
    scene = volume_node.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "tcurlora-export")
    try:
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, segment_ids, labelmap, volume_node
        ):
            raise ValueError(f"Slicer could not export the segments of {segmentation_node.GetName()!r}")
        voxels = _label_array(labelmap)
        # The export numbers segments 1..n in the order asked for; give each its label's value.
        remapped = np.zeros_like(voxels, dtype=np.uint16)
        for index, label in enumerate(mapping.values(), start=1):
            remapped[voxels == index] = label.value
        if not remapped.any():
            raise ValueError(f"the segments {sorted(mapping)} of {segmentation_node.GetName()!r} are empty")
        image = vtk.vtkImageData()
        image.DeepCopy(labelmap.GetImageData())
        image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(remapped, deep=True))
        copy = _detached_copy(labelmap, image, world_ijk_to_ras(volume_node), "vtkMRMLLabelMapVolumeNode")
        label_path = _write_node_atomically(copy, folder / f"{case_name}_label.nii.gz")
    finally:
        scene.RemoveNode(labelmap)
    return image_path, label_path
