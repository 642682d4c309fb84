"""Cohort-building helpers (Testing/cohorts): augmentation, synthetic images, split rule. No network, no cache."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from cohorts import augment, splits, synthseg
from cohorts.sources import tissue_labels


def _sphere_case(spacing: float = 1.0, size: int = 40) -> sitk.Image:
    """UInt16 label map: a ball of radius 12 mm (label 1) with a ball of radius 6 mm (label 2) at its centre."""
    grid = np.stack(np.meshgrid(*[np.arange(size) * spacing for _ in range(3)], indexing="ij"))
    radius = np.sqrt(((grid - (size - 1) / 2 * spacing) ** 2).sum(0))
    labels = np.zeros((size,) * 3, np.uint16)
    labels[radius < 12] = 1
    labels[radius < 6] = 2
    image = sitk.GetImageFromArray(labels)
    image.SetSpacing((spacing,) * 3)
    return image


def _warped(seed: int, params: augment.AugmentParams) -> np.ndarray:
    source = _sphere_case()
    transform = augment.random_spatial_transform(source, np.random.default_rng(seed), params)
    return sitk.GetArrayFromImage(augment.warp(source, source, transform, labels=True))


DEFORM_ONLY = augment.AugmentParams(rotation_deg=0.0, scale=0.0, translation_mm=0.0, deform_mm=3.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_deformation_keeps_label_volumes_and_values(seed):
    before = np.bincount(sitk.GetArrayFromImage(_sphere_case()).ravel(), minlength=3)
    warped = _warped(seed, DEFORM_ONLY)
    after = np.bincount(warped.ravel(), minlength=3)
    assert set(np.unique(warped)) <= {0, 1, 2}  # nearest neighbour: no blended label values
    np.testing.assert_allclose(after[1:], before[1:], rtol=0.15)
    assert not np.array_equal(warped, sitk.GetArrayFromImage(_sphere_case()))  # it did move something


def test_deformation_is_reproducible_by_seed():
    params = augment.AugmentParams()
    np.testing.assert_array_equal(_warped(7, params), _warped(7, params))
    assert not np.array_equal(_warped(7, params), _warped(8, params))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scale_changes_volume_as_its_cube(seed):
    """A pure scale s maps output point p to source point s p: the structure's volume changes by 1 / s^3."""
    source = _sphere_case()
    params = augment.AugmentParams(rotation_deg=0.0, scale=0.15, translation_mm=0.0, deform_mm=0.0)
    transform = augment.random_spatial_transform(source, np.random.default_rng(seed), params)
    scale = np.linalg.det(np.array(transform.GetNthTransform(0).GetMatrix()).reshape(3, 3)) ** (1 / 3)
    warped = sitk.GetArrayFromImage(augment.warp(source, source, transform, labels=True))
    ratio = (warped > 0).sum() / (sitk.GetArrayFromImage(source) > 0).sum()
    assert abs(scale - 1) > 0.1  # these seeds: a scale well above voxel size
    assert ratio == pytest.approx(scale ** -3, rel=0.05)


def test_bias_field_is_smooth_positive_and_bounded():
    field = augment.bias_field((30, 34, 28), np.random.default_rng(0), strength=0.3)
    assert field.dtype == np.float32 and field.shape == (30, 34, 28)
    assert field.min() >= np.exp(-0.3) - 1e-6 and field.max() <= np.exp(0.3) + 1e-6
    assert field.max() / field.min() > 1.02  # not constant
    # Smooth: neighbouring voxels differ by under 2 %, far less than the field's range.
    for axis in range(3):
        assert np.abs(np.diff(np.log(field), axis=axis)).max() < 0.02


def test_smooth_random_field_refuses_one_control_point():
    with pytest.raises(ValueError, match="at least 2, got 1"):
        augment.smooth_random_field((4, 4, 4), np.random.default_rng(0), 1)


def test_augment_intensity_zero_outside_mask_and_reproducible():
    rng_image = np.random.default_rng(0)
    image = rng_image.uniform(50, 150, (20, 22, 18)).astype(np.float32)
    mask = np.zeros(image.shape, bool)
    mask[4:16, 5:17, 3:15] = True
    one = augment.augment_intensity(image, mask, np.random.default_rng(5), augment.AugmentParams())
    two = augment.augment_intensity(image, mask, np.random.default_rng(5), augment.AugmentParams())
    np.testing.assert_array_equal(one, two)
    assert np.all(one[~mask] == 0) and one.min() >= 0
    assert 0.5 < np.percentile(one[mask], 99) < 2.0


def test_augment_intensity_refuses_an_empty_mask():
    with pytest.raises(ValueError, match="mask is empty"):
        augment.augment_intensity(np.ones((3, 3, 3)), np.zeros((3, 3, 3), bool), np.random.default_rng(0),
                                  augment.AugmentParams())


def test_params_refuse_negative_strengths():
    with pytest.raises(ValueError, match=r"deform_mm must be >= 0, got -1"):
        augment.AugmentParams(deform_mm=-1.0)


def test_synthesize_orders_tissues_like_t1():
    labels = np.zeros((12, 12, 12), np.uint16)
    labels[2:10, 2:10, 2:6], labels[2:10, 2:10, 6:10] = 3, 1000
    image = synthseg.synthesize(labels, {3: "cortex", 1000: "white"}, np.random.default_rng(0), blur_mm=0.0)
    assert image[labels == 0].max() == 0
    assert image[labels == 1000].mean() > image[labels == 3].mean() + 0.1


def test_synthesize_refuses_a_label_without_class():
    with pytest.raises(ValueError, match=r"label values \[7\] have no tissue class"):
        synthseg.synthesize(np.full((2, 2, 2), 7, np.uint16), {}, np.random.default_rng(0))


def test_tissue_labels_argmax_inside_mask():
    gm = np.array([[[0.7, 0.2, 0.1, 0.9]]])
    wm = np.array([[[0.2, 0.7, 0.1, 0.1]]])
    mask = np.array([[[True, True, True, False]]])
    np.testing.assert_array_equal(tissue_labels(gm, wm, mask), [[[2, 3, 1, 0]]])


@pytest.mark.parametrize("task", sorted(splits.SPLITS))
def test_shipped_splits_keep_test_sources_unseen(task):
    table = splits.SPLITS[task]
    splits.check_splits(table, task)
    assert not set(table["test"]) & (set(table["train"]) | set(table["val"]))


@pytest.mark.parametrize("table, message", [
    ({"train": ["a"], "val": ["b"], "test": ["a"]}, r"test sources \['a'\] also appear"),
    ({"train": ["a", "b"], "val": ["b"], "test": ["c"]}, r"val sources \['b'\] also appear in train"),
    ({"train": ["a"], "val": [], "test": ["c"]}, r"split 'val' has no source"),
    ({"train": ["a"], "test": ["c"]}, r"splits must be exactly"),
])
def test_check_splits_refuses_shared_sources(table, message):
    with pytest.raises(ValueError, match=message):
        splits.check_splits(table)


def test_two_source_task_may_reuse_train_for_val():
    splits.check_splits({"train": ["a"], "val": ["a"], "test": ["b"]})


def test_assign_sources_cycles_and_never_crosses_splits():
    table = splits.SPLITS["hippocampus"]
    assigned = {name: splits.assign_sources(table[name], 7) for name in splits.SPLIT_NAMES}
    assert assigned["train"][:5] == table["train"] + table["train"][:1]
    assert not set(assigned["test"]) & (set(assigned["train"]) | set(assigned["val"]))
    with pytest.raises(ValueError, match="no source given"):
        splits.assign_sources([], 1)
