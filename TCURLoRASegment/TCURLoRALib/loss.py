"""The training loss: Dice + cross-entropy over the annotated voxels only (sparse annotation stays out of it).

The Dice term is a batch Dice (sums over all crops of the batch, then one ratio per channel), so the loss of a batch
is not the mean of its crops' losses. :func:`dice_ce_statistics` and :func:`dice_ce_from_statistics` compute the same
loss from sums that add over crops: processes that each hold a part of a batch add their statistics and get the loss
of the whole batch (:mod:`TCURLoRALib.distributed`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss

from .cases import IGNORE_INDEX

__all__ = ["DICE_SMOOTH", "dice_ce_from_statistics", "dice_ce_statistics", "masked_dice_ce"]

DICE_SMOOTH = 1e-5
"""MONAI ``DiceLoss``'s default ``smooth_nr`` and ``smooth_dr``, which :func:`masked_dice_ce` uses."""


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


def dice_ce_statistics(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The sums that :func:`masked_dice_ce` is made of, each of which adds over crops (differentiable).

    Args:
        logits: ``B x C x D x H x W``.
        target: int64 ``B x D x H x W``, channel index or IGNORE_INDEX.

    Returns:
        a vector of ``3 C + 2``: per channel c, over the annotated voxels of every crop, the intersection
        ``sum p_c * y_c``, the reference volume ``sum y_c`` and the predicted volume ``sum p_c`` (p softmax
        probabilities, y one-hot target); then the summed cross-entropy and the number of annotated voxels.
    """
    annotated = target != IGNORE_INDEX
    mask = annotated.unsqueeze(1).to(logits.dtype)
    probabilities = torch.softmax(logits, dim=1) * mask
    one_hot = F.one_hot(target.clamp(min=0), logits.shape[1]).movedim(-1, 1).to(logits.dtype) * mask
    spatial = [0, *range(2, logits.dim())]
    cross_entropy = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum")
    count = annotated.sum().to(logits.dtype)
    return torch.cat([(probabilities * one_hot).sum(spatial), one_hot.sum(spatial), probabilities.sum(spatial),
                      cross_entropy.reshape(1), count.reshape(1)])


def dice_ce_from_statistics(statistics: torch.Tensor) -> torch.Tensor:
    """:func:`masked_dice_ce` from the (summed) :func:`dice_ce_statistics` of a batch.

    Dice loss per channel ``1 - (2 I + s) / (G + P + s)`` with ``s`` = :data:`DICE_SMOOTH`, averaged over the
    channels, plus the summed cross-entropy over the number of annotated voxels; 0 (gradient 0) where none is.
    """
    channels = (statistics.numel() - 2) // 3
    intersection, reference, predicted = statistics[:3 * channels].reshape(3, channels)
    cross_entropy, count = statistics[3 * channels], statistics[3 * channels + 1]
    if not bool(count > 0):
        return statistics.sum() * 0.0
    dice = (1.0 - (2.0 * intersection + DICE_SMOOTH) / (reference + predicted + DICE_SMOOTH)).mean()
    return dice + cross_entropy / count
