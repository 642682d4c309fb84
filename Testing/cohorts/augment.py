"""Random, seeded changes of one brain case: smooth deformation, small rotation/scale, bias field, contrast, noise.

Everything takes a ``numpy.random.Generator``, so one seed gives one case, bit for bit. Spatial changes act on
SimpleITK images in physical (LPS) space; intensity changes on arrays in (z, y, x) order. Labels are warped with
nearest-neighbour interpolation only, so no new label values appear.

The smooth random fields (displacement, bias) are coarse Gaussian noise on a few control points per axis,
upsampled to the full grid with normalised Gaussian kernels: smooth everywhere, with no B-spline library needed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import SimpleITK as sitk

__all__ = ["AugmentParams", "smooth_random_field", "random_spatial_transform", "warp", "bias_field",
           "augment_intensity"]


@dataclass(frozen=True)
class AugmentParams:
    """Strength of each random change (defaults: what the cohorts use).

    Args:
        rotation_deg: standard deviation of each rotation angle about the case centre, degrees (clipped at 2x).
        scale: half-width of the uniform isotropic scale factor around 1.
        translation_mm: half-width of the uniform shift along each axis, mm.
        deform_mm: largest displacement of the smooth deformation, mm.
        deform_points: control points per axis of the deformation's coarse grid.
        bias: largest absolute log of the multiplicative bias field (0.25 = x0.78 to x1.28).
        bias_points: control points per axis of the bias field's coarse grid.
        gamma_log_sigma: standard deviation of log(gamma) of the contrast curve.
        noise: (low, high) of the uniform noise standard deviation, as a fraction of the 99th percentile in the mask.
    """

    rotation_deg: float = 5.0
    scale: float = 0.06
    translation_mm: float = 4.0
    deform_mm: float = 3.0
    deform_points: int = 5
    bias: float = 0.25
    bias_points: int = 3
    gamma_log_sigma: float = 0.2
    noise: tuple = (0.01, 0.04)

    def __post_init__(self) -> None:
        for name in ("rotation_deg", "scale", "translation_mm", "deform_mm", "bias", "gamma_log_sigma"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("deform_points", "bias_points"):
            if int(getattr(self, name)) < 2:
                raise ValueError(f"{name} must be at least 2 control points, got {getattr(self, name)!r}")
        if len(self.noise) != 2 or not 0 <= self.noise[0] <= self.noise[1]:
            raise ValueError(f"noise must be (low, high) with 0 <= low <= high, got {self.noise!r}")


def smooth_random_field(shape: Sequence[int], rng: np.random.Generator, points: int) -> np.ndarray:
    """A smooth random field scaled to a largest absolute value of 1.

    Args:
        shape: output array shape (z, y, x).
        rng: random generator.
        points: control points per axis of the coarse N(0, 1) grid (>= 2).

    Returns:
        float64 array of `shape`, max |value| = 1 (all zeros only if every control value is 0).
    """
    if points < 2:
        raise ValueError(f"points must be at least 2, got {points!r}")
    coarse = rng.standard_normal((points,) * len(shape))
    field = coarse
    for axis, n in enumerate(shape):
        # Kernel width = control spacing: neighbouring bumps overlap, so the sum has no ripples at control points.
        centres = np.linspace(0.0, 1.0, points)
        positions = np.linspace(0.0, 1.0, n)[:, None]
        weights = np.exp(-0.5 * ((positions - centres) / (1.0 / (points - 1))) ** 2)
        weights /= weights.sum(axis=1, keepdims=True)
        field = np.moveaxis(np.tensordot(weights, np.moveaxis(field, axis, 0), axes=1), 0, axis)
    peak = np.abs(field).max()
    return field / peak if peak > 0 else field


def random_spatial_transform(reference: sitk.Image, rng: np.random.Generator, params: AugmentParams,
                             centre: Sequence[float] | None = None) -> sitk.Transform:
    """A random transform from `reference`'s physical space to the source's: smooth deformation, then affine.

    Args:
        reference: output grid (the transform's displacement field lives on it).
        rng: random generator.
        params: strengths; see :class:`AugmentParams`.
        centre: LPS point (mm) that rotation and scale keep fixed; default the centre of `reference`.

    Returns:
        A composite transform for ``sitk.Resample(source, reference, transform)``.
    """
    if centre is None:
        centre = reference.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in reference.GetSize()])
    angles = np.clip(rng.normal(0.0, np.deg2rad(params.rotation_deg), 3), -2 * np.deg2rad(params.rotation_deg),
                     2 * np.deg2rad(params.rotation_deg))
    rotation = np.array(sitk.Euler3DTransform((0, 0, 0), *(float(a) for a in angles)).GetMatrix()).reshape(3, 3)
    affine = sitk.AffineTransform(3)
    affine.SetCenter(tuple(float(c) for c in centre))
    affine.SetMatrix(tuple((rotation * (1.0 + rng.uniform(-params.scale, params.scale))).ravel()))
    affine.SetTranslation(tuple(float(t) for t in rng.uniform(-params.translation_mm, params.translation_mm, 3)))
    shape = tuple(reversed(reference.GetSize()))
    # One field per ITK axis (x, y, z); the vector image wants (z, y, x, 3).
    displacement = np.stack([smooth_random_field(shape, rng, params.deform_points) for _ in range(3)], axis=-1)
    field = sitk.GetImageFromArray(displacement * params.deform_mm, isVector=True)
    field.CopyInformation(reference)
    composite = sitk.CompositeTransform(affine)
    # The transform added last is applied first: deform on the output grid, then map into the source.
    composite.AddTransform(sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64)))
    return composite


def warp(image: sitk.Image, reference: sitk.Image, transform: sitk.Transform, labels: bool) -> sitk.Image:
    """`image` resampled onto `reference`'s grid through `transform` (linear, or nearest neighbour for labels).

    Outside the source the value is 0.
    """
    interpolator = sitk.sitkNearestNeighbor if labels else sitk.sitkLinear
    pixel = image.GetPixelID() if labels else sitk.sitkFloat32
    return sitk.Resample(image, reference, transform, interpolator, 0.0, pixel)


def bias_field(shape: Sequence[int], rng: np.random.Generator, strength: float, points: int = 3) -> np.ndarray:
    """A smooth, positive multiplicative field exp(s * f), f smooth with max |f| = 1, s uniform in [0, strength].

    Returns:
        float32 array of `shape` (z, y, x), all values in [exp(-strength), exp(strength)].
    """
    if strength < 0:
        raise ValueError(f"strength must be >= 0, got {strength!r}")
    scale = rng.uniform(0.0, strength)
    return np.exp(scale * smooth_random_field(shape, rng, points)).astype(np.float32)


def augment_intensity(array: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
                      params: AugmentParams) -> np.ndarray:
    """Contrast (gamma), bias field and Gaussian noise inside `mask`; 0 outside.

    Args:
        array: image (z, y, x), >= 0 inside the mask.
        mask: bool (z, y, x), the head (noise outside it would only cost file size; the sources are skull-stripped).
        rng: random generator.
        params: strengths.

    Returns:
        float32 (z, y, x), scaled so that the 99th percentile inside the mask is about 1, >= 0.
    """
    if array.shape != mask.shape:
        raise ValueError(f"image shape {array.shape} and mask shape {mask.shape} differ")
    if not mask.any():
        raise ValueError("the mask is empty: no voxel to augment")
    out = np.clip(array.astype(np.float32), 0.0, None)
    out /= max(float(np.percentile(out[mask], 99)), 1e-6)
    gamma = float(np.exp(np.clip(rng.normal(0.0, params.gamma_log_sigma), -2 * params.gamma_log_sigma,
                                 2 * params.gamma_log_sigma)))
    out = np.clip(out, 0.0, None) ** gamma
    out *= bias_field(out.shape, rng, params.bias, params.bias_points)
    out += rng.normal(0.0, rng.uniform(*params.noise), out.shape).astype(np.float32)
    out[~mask] = 0.0
    return np.clip(out, 0.0, None)
