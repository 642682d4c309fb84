"""Post-processing of label maps: largest connected component per one-piece label, plausible regions; known
answers built by hand."""
from __future__ import annotations

import numpy as np
import pytest

from TCURLoRALib.postprocess import Region, brain_box, keep_largest_component, learn_regions, relative_grid, \
    suppress_outside


def _blobs() -> np.ndarray:
    labels = np.zeros((12, 12, 12), np.uint16)
    labels[1:5, 1:5, 1:5] = 1        # 64 voxels: the structure
    labels[8:10, 8:10, 8:10] = 1     # 8 voxels, far away: a stray blob
    labels[6, 6, 6] = 1              # 1 voxel touching nothing
    labels[1:3, 7:11, 1:3] = 2       # 16 voxels
    labels[5:7, 9, 1] = 2            # 2 voxels, not touching
    labels[10, 1, 10] = 3            # label 3: not declared one piece
    labels[1, 10, 10] = 3
    return labels


def test_largest_component_keeps_only_the_biggest_piece_of_each_declared_label():
    labels = _blobs()
    out = keep_largest_component(labels, [1, 2])
    expected = np.zeros_like(labels)
    expected[1:5, 1:5, 1:5] = 1
    expected[1:3, 7:11, 1:3] = 2
    expected[10, 1, 10] = 3
    expected[1, 10, 10] = 3
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == labels.dtype
    np.testing.assert_array_equal(labels, _blobs())  # the input is not changed


@pytest.mark.parametrize("connectivity, pieces", [(6, 2), (18, 1), (26, 1)])
def test_connectivity_decides_whether_an_edge_touch_joins_pieces(connectivity, pieces):
    labels = np.zeros((5, 5, 5), np.uint8)
    labels[1:3, 1:3, 1:3] = 1    # 8 voxels
    labels[3, 3, 1] = 1          # touches (2, 2, 1) along an edge only
    out = keep_largest_component(labels, [1], connectivity=connectivity)
    assert int(out.sum()) == (8 if pieces == 2 else 9)


def test_corner_touch_joins_only_at_26():
    labels = np.zeros((4, 4, 4), np.uint8)
    labels[0:2, 0:2, 0:2] = 1
    labels[2, 2, 2] = 1
    assert int(keep_largest_component(labels, [1], 18).sum()) == 8
    assert int(keep_largest_component(labels, [1], 26).sum()) == 9


def test_largest_component_of_a_missing_or_single_piece_label_changes_nothing():
    labels = np.zeros((4, 4, 4), np.int64)
    labels[1:3, 1:3, 1:3] = 2
    np.testing.assert_array_equal(keep_largest_component(labels, [1, 2]), labels)


@pytest.mark.parametrize("bad, message", [(np.zeros((3, 3)), "3-D"), (np.zeros((3, 3, 3)), "connectivity")])
def test_largest_component_refuses_bad_input(bad, message):
    with pytest.raises(ValueError, match=message):
        keep_largest_component(bad, [1], connectivity=26 if bad.ndim == 2 else 8)


def test_brain_box_and_relative_grid():
    image = np.zeros((10, 8, 6))
    image[2:7, 1:8, 3] = 1.0
    assert brain_box(image) == ((2, 1, 3), (6, 7, 3))
    z, y, x = relative_grid(image.shape, brain_box(image))
    np.testing.assert_allclose(z[[2, 4, 6]], [0, 0.5, 1])
    np.testing.assert_allclose(y[[0, 1, 7]], [-1 / 6, 0, 1])
    assert x[3] == 0 and x[4] == 1  # a one-voxel-thick box: unit steps
    with pytest.raises(ValueError, match="no non-zero voxel"):
        brain_box(np.zeros((3, 3, 3)))


def _case(shift: int) -> tuple:
    """A brain box [10, 29] on every axis shifted by `shift`; label 1 at relative 0.25..0.5 on axis 2, left half;
    label 2 at 0.5..0.75, right half."""
    image = np.zeros((40, 40, 40), np.float32)
    lo = 10 + shift
    image[lo:lo + 20, lo:lo + 20, lo:lo + 20] = 1.0
    labels = np.zeros(image.shape, np.int64)
    labels[lo + 5:lo + 11, lo + 5:lo + 11, lo + 5:lo + 11] = 1   # relative (5..10)/19 on every axis
    labels[lo + 12:lo + 15, lo + 12:lo + 15, lo + 12:lo + 15] = 2
    labels[0, 0, 0] = -1  # not annotated: ignored
    return image, labels


def test_learn_regions_gives_the_labels_box_in_brain_coordinates_widened_by_the_margin():
    regions = learn_regions([_case(0), _case(3)], [1, 2, 7], margin=0.1)
    assert set(regions) == {1, 2}
    np.testing.assert_allclose(regions[1].lower, [5 / 19 - 0.1] * 3)
    np.testing.assert_allclose(regions[1].upper, [10 / 19 + 0.1] * 3)
    np.testing.assert_allclose(regions[2].lower, [12 / 19 - 0.1] * 3)
    np.testing.assert_allclose(regions[2].upper, [14 / 19 + 0.1] * 3)


def test_learn_regions_spans_every_case():
    image, labels = _case(0)
    other = labels.copy()
    other[other == 1] = 0
    other[10 + 1, 10 + 2, 10 + 18] = 1   # relative (1/19, 2/19, 18/19)
    regions = learn_regions([(image, labels), (image, other)], [1], margin=0.0)
    np.testing.assert_allclose(regions[1].lower, [1 / 19, 2 / 19, 5 / 19])
    np.testing.assert_allclose(regions[1].upper, [10 / 19, 10 / 19, 18 / 19])


def test_suppress_outside_removes_only_voxels_outside_their_labels_region():
    image, labels = _case(2)
    regions = {1: Region((0.2, 0.2, 0.2), (0.6, 0.6, 0.6))}
    predicted = labels.copy()
    predicted[predicted < 0] = 0
    predicted[12 + 17, 12 + 17, 12 + 17] = 1     # relative 17/19 = 0.89: outside label 1's region
    predicted[12 + 4, 12 + 4, 12 + 17] = 1       # outside along the last axis only
    predicted[12 + 4, 12 + 4, 12 + 11] = 1       # relative (0.21, 0.21, 0.58): inside
    out = suppress_outside(predicted, image, regions)
    expected = predicted.copy()
    expected[12 + 17, 12 + 17, 12 + 17] = 0
    expected[12 + 4, 12 + 4, 12 + 17] = 0
    np.testing.assert_array_equal(out, expected)
    assert int((out == 2).sum()) == 27  # label 2 has no region: untouched


def test_suppress_outside_follows_the_brain_not_the_array():
    """A brain moved in the volume keeps its labels: the region is relative to the brain box."""
    regions = learn_regions([_case(0)], [1, 2], margin=0.02)
    for shift in (-5, 4):
        image, labels = _case(shift)
        labels[labels < 0] = 0
        np.testing.assert_array_equal(suppress_outside(labels, image, regions), labels)


def test_region_round_trips_and_refuses_bad_bounds():
    region = Region((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert Region.from_json(region.to_json()) == region
    with pytest.raises(ValueError, match="lower <= upper"):
        Region((0.5, 0, 0), (0.4, 1, 1))
    with pytest.raises(ValueError, match="3 finite"):
        Region((0, 0), (1, 1))
    with pytest.raises(ValueError, match="margin"):
        learn_regions([_case(0)], [1], margin=-0.1)
