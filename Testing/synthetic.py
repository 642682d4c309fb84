"""Small generated data for tests: a tiny UNETR base file and image/label-map cases with a known structure."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from monai.networks.nets import UNETR

from TCURLoRALib.basemodel import save_base
from TCURLoRALib.cards import Label

TINY_UNETR = {"in_channels": 1, "out_channels": 3, "img_size": [32, 32, 32], "feature_size": 8, "hidden_size": 48,
              "mlp_dim": 96, "num_heads": 4}
BASE_LABELS = [Label(0, "background", (0, 0, 0)), Label(1, "grey matter", (200, 200, 200)),
               Label(2, "white matter", (250, 250, 225))]
TARGET = Label(5, "target", (220, 180, 30))
"""A structure the base never saw: a bright ellipsoid inside the white matter."""


def tiny_card_fields(name: str = "tiny") -> dict:
    """Every ModelCard field but the fingerprint, for the tiny base (2 mm, RAS, z-score)."""
    return {"name": name, "unetr": TINY_UNETR, "spacing": [2.0, 2.0, 2.0], "orientation": "RAS",
            "patch_size": [32, 32, 32], "intensity": {"kind": "zscore_nonzero"},
            "labels": [label.to_json() for label in BASE_LABELS], "provenance": {"source": "Testing/synthetic.py"},
            "metrics": {}}


def tiny_unetr(seed: int = 0, out_channels: int = 3, feature_size: int = TINY_UNETR["feature_size"]) -> UNETR:
    """The tiny UNETR of the test base (:data:`TINY_UNETR`), randomly initialised from ``seed``, in eval mode."""
    torch.manual_seed(seed)
    fields = {**TINY_UNETR, "out_channels": out_channels, "feature_size": feature_size}
    return UNETR(**{**fields, "img_size": tuple(TINY_UNETR["img_size"])}).eval()


def make_tiny_base(path: Path, seed: int = 0, name: str = "tiny") -> Path:
    """Write a randomly initialised tiny UNETR base file (3 labels) to ``path``."""
    save_base(path, tiny_unetr(seed), tiny_card_fields(name))
    return path


def case_arrays(seed: int, shape: tuple[int, int, int] = (36, 40, 38)) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic case, arrays in (z, y, x): image float32 and label map uint16.

    Labels: 1 grey matter (a shell), 2 white matter (the inside), 5 the target ellipsoid; positions and contrast
    vary with ``seed``.
    """
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    centre = np.array(shape, dtype=np.float32) / 2 + rng.uniform(-2, 2, 3)
    radius = np.sqrt((((grid - centre[:, None, None, None]) / np.array([14, 15, 14])[:, None, None, None]) ** 2).sum(0))
    labels = np.zeros(shape, np.uint16)
    labels[radius < 1.0] = 1
    labels[radius < 0.7] = 2
    target_centre = centre + rng.uniform(-3, 3, 3)
    target = np.sqrt((((grid - target_centre[:, None, None, None]) / np.array([4, 5, 3])[:, None, None, None]) ** 2).sum(0))
    labels[target < 1.0] = TARGET.value
    intensity = {0: 0.0, 1: 60.0, 2: 100.0, TARGET.value: 160.0}
    image = np.zeros(shape, np.float32)
    for value, level in intensity.items():
        image[labels == value] = level * rng.uniform(0.9, 1.1)
    image += rng.normal(0, 4, shape).astype(np.float32)
    image[labels == 0] = 0
    return image, labels


def write_case(folder: Path, seed: int, spacing: tuple[float, float, float] = (2.0, 2.0, 2.0)) -> tuple[Path, Path]:
    """Write case ``seed`` as ``case<seed>_image.nii.gz`` and ``case<seed>_label.nii.gz``; returns both paths."""
    image, labels = case_arrays(seed)
    paths = []
    for array, suffix in ((image, "image"), (labels, "label")):
        volume = sitk.GetImageFromArray(array)
        volume.SetSpacing(spacing)
        volume.SetOrigin((-30.0, -40.0, 10.0))
        path = folder / f"case{seed}_{suffix}.nii.gz"
        sitk.WriteImage(volume, str(path))
        paths.append(path)
    return paths[0], paths[1]
