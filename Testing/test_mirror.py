"""Left/right mirroring on the model grid: the flip runs along the patient's left-right axis, whatever the card's
orientation, and a mirrored left structure lands where a right one would be, carrying the right label."""
from __future__ import annotations

import numpy as np
import pytest

from TCURLoRALib import volumes
from TCURLoRALib.cases import IGNORE_INDEX
from TCURLoRALib.mirror import check_pairs, left_right_axis, mirror, pairs_from_names, swap_pairs

LEFT, RIGHT, OTHER = 1, 2, 3


@pytest.mark.parametrize("code, axis", [("RAS", 2), ("LPS", 2), ("LAS", 2), ("ARS", 1), ("SAR", 0), ("IPL", 0),
                                        ("ras", 2)])
def test_left_right_axis_is_the_array_axis_of_the_r_or_l_letter(code, axis):
    assert left_right_axis(code) == axis


@pytest.mark.parametrize("code", ["RRS", "RA", "XYZ", "", None, "RASR"])
def test_left_right_axis_refuses_bad_codes(code):
    with pytest.raises(ValueError, match="one of each of R/L, A/P, S/I"):
        left_right_axis(code)


def _centroid_lps(mask: np.ndarray, grid: volumes.Geometry) -> np.ndarray:
    """LPS centre (mm) of a mask (z, y, x) on `grid`."""
    index = np.argwhere(mask).mean(axis=0)[::-1]  # (x, y, z)
    return (grid.ijk_to_lps() @ np.append(index, 1.0))[:3]


def _input_case(direction: np.ndarray) -> tuple:
    """An LPS image and label map: a left structure at LPS x = +30 (the patient's left), a structure of no side
    at x = -20; unlike bodies in y and z so that a flip along a wrong axis moves them."""
    size = (40, 36, 32)
    grid = volumes.Geometry(size, (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), direction.ravel())
    lps_of = grid.ijk_to_lps()
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), axis=-1).reshape(-1, 3)
    points = (lps_of[:3, :3] @ ijk.T).T + lps_of[:3, 3]
    centre = (lps_of[:3, :3] @ ((np.array(size) - 1) / 2)) + lps_of[:3, 3]
    relative = points - centre
    left = (np.abs(relative[:, 0] - 12) <= 4) & (np.abs(relative[:, 1] - 6) <= 6) & (np.abs(relative[:, 2] + 8) <= 3)
    other = (np.abs(relative[:, 0] + 10) <= 3) & (np.abs(relative[:, 1] + 10) <= 3) & (np.abs(relative[:, 2]) <= 5)
    flat = np.zeros(len(points), np.uint16)  # (x, y, z) order, x fastest last
    flat[left] = LEFT
    flat[other] = OTHER
    labels = np.ascontiguousarray(flat.reshape(size).transpose(2, 1, 0))  # (z, y, x)
    image = 1.0 + labels.astype(np.float32) + np.linspace(0, 1, labels.size, dtype=np.float32).reshape(labels.shape)
    return grid, image, labels


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "SAR", "PIL"])
@pytest.mark.parametrize("input_direction", ["identity", "flipped_permuted"])
def test_a_mirrored_left_structure_lies_mirrored_in_lps_x_and_is_labelled_right(orientation, input_direction):
    direction = np.eye(3) if input_direction == "identity" else np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0.0]])
    grid, image, labels = _input_case(direction)
    prepared = volumes.prepare_for_model(grid.image_from_array(image), (2.0, 2.0, 2.0), orientation,
                                         {"kind": "zscore_nonzero"})
    model_grid = prepared.mapping.model_grid
    target = prepared.mapping.labels_to_model(labels).astype(np.int64)
    flipped_image, flipped_target = mirror(prepared.array, target, orientation, [(LEFT, RIGHT)], 4)

    assert not np.any(flipped_target == LEFT)
    centre = (model_grid.ijk_to_lps() @ np.append((np.array(model_grid.size) - 1) / 2, 1.0))[:3]
    for before, after in ((LEFT, RIGHT), (OTHER, OTHER)):
        assert int((target == before).sum()) > 20
        original = _centroid_lps(target == before, model_grid)
        moved = _centroid_lps(flipped_target == after, model_grid)
        expected = np.array([2 * centre[0] - original[0], original[1], original[2]])
        np.testing.assert_allclose(moved, expected, atol=1e-6)
        assert int((flipped_target == after).sum()) == int((target == before).sum())
    # The image moves with the labels: the intensities of the mirrored right structure are the left one's.
    np.testing.assert_allclose(np.sort(flipped_image[flipped_target == RIGHT]), np.sort(prepared.array[target == LEFT]))


def test_mirroring_twice_gives_the_case_back_and_keeps_unannotated_voxels():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(5, 6, 7)).astype(np.float32)
    target = rng.integers(-1, 4, size=(5, 6, 7))
    once_image, once_target = mirror(image, target, "RAS", [(1, 2)], 4)
    twice_image, twice_target = mirror(once_image, once_target, "RAS", [(1, 2)], 4)
    np.testing.assert_array_equal(twice_image, image)
    np.testing.assert_array_equal(twice_target, target)
    np.testing.assert_array_equal(once_target == IGNORE_INDEX, np.flip(target == IGNORE_INDEX, 2))
    assert once_image.flags.c_contiguous and once_target.flags.c_contiguous and once_target.dtype == target.dtype


def test_swap_pairs_exchanges_only_paired_channels():
    target = np.array([0, 1, 2, 3, 4, 5, 6, -1])
    np.testing.assert_array_equal(swap_pairs(target, [(1, 2), (5, 6)]), [0, 2, 1, 3, 4, 6, 5, -1])


@pytest.mark.parametrize("pairs, message", [([(1, 1)], "two different foreground channels"),
                                            ([(0, 1)], "two different foreground channels"),
                                            ([(1, 4)], r"in 1\.\.3"),
                                            ([(1, 2), (2, 3)], "channel 2 is already in another pair"),
                                            ([(1,)], "two channel indices"),
                                            ([(1.0, 2)], "two channel indices")])
def test_bad_pairs_are_refused(pairs, message):
    with pytest.raises(ValueError, match=message):
        check_pairs(pairs, 4)


def test_mirror_refuses_mismatched_arrays():
    with pytest.raises(ValueError, match="one shape"):
        mirror(np.zeros((2, 3, 4)), np.zeros((2, 3, 5), int), "RAS", [], 2)


def test_pairs_from_names_finds_side_words_in_common_conventions():
    names = ["background", "left hippocampus", "right hippocampus", "Left-Putamen", "Right-Putamen",
             "Caudate_L", "Caudate_R", "brainstem", "lh.insula", "rh.insula", "left only"]
    assert pairs_from_names(names) == [(1, 2), (3, 4), (5, 6), (8, 9)]


def test_pairs_from_names_ignores_side_letters_inside_words_and_refuses_ambiguity():
    assert pairs_from_names(["background", "lateral ventricle", "rateral ventricle"]) == []
    with pytest.raises(ValueError, match="2 right-side twins"):
        pairs_from_names(["background", "left x", "right x", "Right X"])
