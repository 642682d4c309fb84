"""T1-like images drawn from label maps, in the manner of SynthSeg (Billot et al., Med Image Anal 86, 2023).

Each label gets a random mean intensity around a T1 prior for its tissue class (so images look like skull-stripped
T1 scans, the base model's domain, rather than SynthSeg's fully random contrasts), voxels get Gaussian texture,
and the result is blurred to mimic partial volume. Bias field and noise come later, from :mod:`.augment`, as for
real images.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import SimpleITK as sitk

__all__ = ["T1_CLASS_MEANS", "synthesize"]

T1_CLASS_MEANS = {"background": 0.0, "csf": 0.2, "cortex": 0.55, "deep_grey": 0.62, "thalamus": 0.7,
                  "pallidum": 0.78, "brainstem": 0.82, "white": 0.9}
"""Mean intensity of each tissue class on a T1 scale where white matter is about 0.9 and background 0."""


def synthesize(labels: np.ndarray, label_class: Mapping[int, str], rng: np.random.Generator,
               spacing: tuple = (1.0, 1.0, 1.0), jitter: float = 0.05, texture: float = 0.03,
               blur_mm: float = 1.0) -> np.ndarray:
    """A T1-like image of a label map.

    Args:
        labels: integer label map (z, y, x).
        label_class: tissue class (a key of :data:`T1_CLASS_MEANS`) of every non-zero value in `labels`.
        rng: random generator.
        spacing: voxel size (x, y, z) in mm, for the blur.
        jitter: standard deviation of each label's mean around its class mean.
        texture: standard deviation of the per-voxel Gaussian texture.
        blur_mm: Gaussian blur sigma in mm (0 = none).

    Returns:
        float32 (z, y, x), >= 0, background exactly 0.

    Raises:
        ValueError: a label value without a class, or an unknown class name.
    """
    values = np.unique(labels)
    missing = [int(v) for v in values if v != 0 and int(v) not in label_class]
    if missing:
        raise ValueError(f"label values {missing[:10]} have no tissue class")
    unknown = sorted({c for c in label_class.values() if c not in T1_CLASS_MEANS})
    if unknown:
        raise ValueError(f"unknown tissue classes {unknown}; known: {sorted(T1_CLASS_MEANS)}")
    lookup = np.zeros(int(values.max()) + 1, np.float32)
    for value in values:
        if value != 0:
            lookup[value] = T1_CLASS_MEANS[label_class[int(value)]] + rng.normal(0.0, jitter)
    image = lookup[labels] + rng.normal(0.0, texture, labels.shape).astype(np.float32)
    image[labels == 0] = 0.0
    if blur_mm > 0:
        volume = sitk.GetImageFromArray(image)
        volume.SetSpacing(tuple(float(s) for s in spacing))
        image = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(volume, blur_mm))
    return np.clip(image, 0.0, None).astype(np.float32)
