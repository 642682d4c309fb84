"""What the panels say about MRML nodes: a volume's grid, a segmentation's segments (names and colours).

Only the nodes' own methods are called, so this runs on Slicer's MRML and on the ``slicer-core`` wheel alike.
"""
from __future__ import annotations

from typing import Any, Iterable

__all__ = ["describe_segmentation", "describe_volume", "segment_colors", "segment_names", "volume_summary"]


def describe_volume(volume_node: Any) -> str:
    """A volume's grid, e.g. ``"6 x 5 x 4 voxels, 1.00 x 2.00 x 3.00 mm"``: size and spacing in the IJK order of the
    image data (columns, rows, slices).

    Raises:
        ValueError: the node is None or holds no image data.
    """
    if volume_node is None:
        raise ValueError("volumeNode is None: select a volume")
    image_data = volume_node.GetImageData()
    if image_data is None:
        raise ValueError(f"Volume {volume_node.GetName()!r} holds no image data")
    size = " x ".join(str(n) for n in image_data.GetDimensions())
    spacing = " x ".join(f"{s:.2f}" for s in volume_node.GetSpacing())
    return f"{size} voxels, {spacing} mm"


def volume_summary(volume_node: Any) -> tuple[bool, str]:
    """``(usable, text)`` for the Segment panel's input: whether the node can be segmented, and what to show."""
    if volume_node is None:
        return False, "No volume selected"
    if volume_node.GetImageData() is None:
        return False, "The volume holds no image data"
    return True, describe_volume(volume_node)


def segment_colors(segmentation_node: Any) -> dict[str, tuple[float, float, float]]:
    """Segment name -> RGB colour in 0-1 of a segmentation node, in the segmentation's order."""
    segmentation = segmentation_node.GetSegmentation()
    result = {}
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        result[segment.GetName()] = tuple(float(c) for c in segment.GetColor())
    return result


def describe_segmentation(segmentation_node: Any) -> str:
    """A segmentation's segments, e.g. ``"2 segments: GM, WM"``, in order, or ``"no segments"``.

    Raises:
        ValueError: the node is None.
    """
    if segmentation_node is None:
        raise ValueError("segmentationNode is None: select a segmentation")
    names = list(segment_colors(segmentation_node))
    if not names:
        return "no segments"
    return f"{len(names)} segment{'s' if len(names) != 1 else ''}: {', '.join(names)}"


def segment_names(segmentation_nodes: Iterable[Any]) -> list[str]:
    """Every segment name of the segmentations, each once, in order of first appearance."""
    names: list[str] = []
    for node in segmentation_nodes:
        names += [name for name in segment_colors(node) if name not in names]
    return names
