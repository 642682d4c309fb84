"""Training crops: where they are cut (foreground oversampling) and how they are augmented.

Each crop has the card's patch size (UNETR's position embeddings fix its input size) and is cut from a training case
on the model grid. It is centred, with probability ``1 - BACKGROUND_FRACTION``, on a voxel of a foreground label
chosen uniformly among those the case holds (small structures get as many crops as large ones), else on any
annotated voxel. Augmentation: a small random affine (rotation, scaling) and intensity scale/shift; no flips,
because a flip swaps left and right structures (``hippocampus_left``) and the model grid always has the card's
orientation.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import Compose, RandAffined, RandScaleIntensityd, RandShiftIntensityd

from .cases import IGNORE_INDEX, PreparedCase

__all__ = ["BACKGROUND_FRACTION", "CropSampler"]

BACKGROUND_FRACTION = 0.33
"""Share of crops centred on any annotated voxel rather than on a foreground label."""


class CropSampler:
    """Random training crops with foreground oversampling and augmentation (rules in the module docstring).

    Args:
        cases: the prepared training cases (model grid).
        patch_size: crop size (D, H, W).
        seed: seeds case choice, crop centres and augmentation.
    """

    def __init__(self, cases: Sequence[PreparedCase], patch_size: Sequence[int], seed: int):
        self.patch = tuple(int(p) for p in patch_size)
        self.rng = np.random.default_rng(seed)
        self.cases = [self._index(case) for case in cases]
        self.augment = Compose([
            RandAffined(keys=("image", "label"), prob=0.5, rotate_range=(0.15, 0.15, 0.15),
                        scale_range=(0.1, 0.1, 0.1), mode=("bilinear", "nearest"),
                        padding_mode=("zeros", "border")),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
        ])
        self.augment.set_random_state(seed=seed)

    def _index(self, case: PreparedCase) -> dict[str, Any]:
        # Pad to at least the patch size; padding is not annotated, so it never enters the loss.
        pad = [(max(0, p - s) // 2, max(0, p - s) - max(0, p - s) // 2) for p, s in zip(self.patch, case.image.shape)]
        image = np.pad(case.image, pad, constant_values=0.0)
        target = np.pad(case.target, pad, constant_values=IGNORE_INDEX)
        flat = target.reshape(-1)
        by_class = {int(c): np.flatnonzero(flat == c) for c in np.unique(flat) if c > 0}
        return {"image": image, "target": target, "by_class": by_class,
                "annotated": np.flatnonzero(flat != IGNORE_INDEX)}

    def batch(self, size: int, keep: range | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``size`` crops: images float32 ``B x 1 x D x H x W`` and targets int64 ``B x D x H x W``.

        Args:
            size: crops drawn.
            keep: which of them to return (indices into the ``size``; default all, ``B = size``). The others are
                drawn but neither cut nor augmented, so that the random streams move on exactly as for all
                ``size``: processes that keep disjoint parts of one seeded batch hold that batch together.
        """
        images, targets = [], []
        for index in range(size):
            case = self.cases[int(self.rng.integers(len(self.cases)))]
            box = self._box(case)
            if keep is not None and index not in keep:
                # The same draws as a real crop: the transforms' random parameters do not depend on the data.
                self.augment({"image": torch.zeros(1, 2, 2, 2), "label": torch.zeros(1, 2, 2, 2)})
                continue
            image, target = np.ascontiguousarray(case["image"][box]), np.ascontiguousarray(case["target"][box])
            out = self.augment({"image": torch.from_numpy(image)[None], "label": torch.from_numpy(target)[None]
                                .to(torch.float32)})
            images.append(_plain(out["image"]))
            targets.append(_plain(out["label"])[0].round().to(torch.int64))
        return torch.stack(images), torch.stack(targets)

    def _box(self, case: Mapping[str, Any]) -> tuple[slice, ...]:
        classes = sorted(case["by_class"])
        if classes and self.rng.random() >= BACKGROUND_FRACTION:
            pool = case["by_class"][classes[int(self.rng.integers(len(classes)))]]
        else:
            pool = case["annotated"]
        centre = np.unravel_index(int(pool[int(self.rng.integers(len(pool)))]), case["target"].shape)
        start = [int(min(max(c - p // 2, 0), s - p)) for c, p, s in zip(centre, self.patch, case["target"].shape)]
        return tuple(slice(b, b + p) for b, p in zip(start, self.patch))


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """A MONAI MetaTensor as a plain tensor (the loop needs no metadata)."""
    return tensor.as_tensor() if hasattr(tensor, "as_tensor") else tensor
