"""The training loss: Dice + cross-entropy over the annotated voxels only (sparse annotation stays out of it)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss

from .cases import IGNORE_INDEX

__all__ = ["masked_dice_ce"]


def masked_dice_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice + cross-entropy over annotated voxels only.

    Cross-entropy ignores voxels with target :data:`cases.IGNORE_INDEX` (mean over the others); Dice (MONAI
    ``DiceLoss``, softmax probabilities, one-hot target, all channels, summed over the batch) is computed after
    zeroing both probabilities and one-hot target at those voxels, so they add nothing to any term.

    Args:
        logits: ``B x C x D x H x W``.
        target: int64 ``B x D x H x W``, channel index or IGNORE_INDEX.

    Returns:
        scalar loss (0 with a gradient of 0 where no voxel is annotated).
    """
    annotated = target != IGNORE_INDEX
    if not bool(annotated.any()):
        return logits.sum() * 0.0
    cross_entropy = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
    mask = annotated.unsqueeze(1).to(logits.dtype)
    probabilities = torch.softmax(logits, dim=1) * mask
    one_hot = F.one_hot(target.clamp(min=0), logits.shape[1]).movedim(-1, 1).to(logits.dtype) * mask
    dice = DiceLoss(include_background=True, batch=True)(probabilities, one_hot)
    return dice + cross_entropy
