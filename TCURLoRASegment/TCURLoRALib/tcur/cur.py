"""Tensor CUR decomposition under the t-product.

For a real tensor ``W`` of shape ``n1 x n2 x n3``, pick ``r`` lateral slices ``J`` (columns) and ``r`` horizontal
slices ``I`` (rows). With ``C = W[:, J, :]``, ``R = W[I, :, :]`` and the intersection ``M = W[I][:, J]``:

.. math::

    W \\approx C * M^{+} * R

exactly so when every Fourier slice of ``W`` has rank at most ``r`` and the Fourier slices of ``M`` have that rank.

Slices are chosen from Fourier-domain norms: a column's score is ``s_j = sum_k ||Ŵ_k[:, j]||`` over all ``n3`` Fourier
slices, a row's score is the same sum over the chosen columns only, ``s_i = sum_k ||Ŵ_k[i, J]||``. ``"topk"`` keeps the
``r`` highest scores (deterministic, as the official tCURLoRA code does); ``"inverse_sampling"`` draws ``r`` distinct
indices with probabilities proportional to ``1 / s`` from a seeded generator (CURLoRA's rule: it favours slices of
small norm, so that the adapted directions disturb the pre-trained weight least).

References:
    G. He, W. Cheng, H. Zhu, X. Cai, G. Yu, "tCURLoRA: Tensor CUR Decomposition Based Low-Rank Parameter Adaptation
    and Its Application in Medical Image Segmentation", MICCAI 2025.
    M. Fawi, "CURLoRA: Stable LLM Continual Fine-Tuning and Catastrophic Forgetting Mitigation", 2024.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .names import SELECTION_RULES
from .tproduct import t_pinv, t_product

__all__ = ["SELECTION_RULES", "TensorCUR", "slice_scores", "select_slices", "tensor_cur"]


class TensorCUR(NamedTuple):
    """Result of :func:`tensor_cur` for a tensor of shape ``n1 x n2 x n3`` at rank ``r``.

    Attributes:
        rows: ``I``, int64 of shape ``(r,)``, the chosen horizontal slices, ascending.
        cols: ``J``, int64 of shape ``(r,)``, the chosen lateral slices, ascending.
        c: ``W[:, J, :]``, shape ``n1 x r x n3``.
        r: ``W[I, :, :]``, shape ``r x n2 x n3``.
        core: the intersection ``W[I][:, J]``, shape ``r x r x n3``.
    """

    rows: torch.Tensor
    cols: torch.Tensor
    c: torch.Tensor
    r: torch.Tensor
    core: torch.Tensor

    def reconstruct(self) -> torch.Tensor:
        """``C * pinv(core) * R``, shape ``n1 x n2 x n3``."""
        return t_product(t_product(self.c, t_pinv(self.core)), self.r)


def slice_scores(weight: torch.Tensor, cols: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fourier-domain scores of the lateral and horizontal slices of ``weight``.

    Args:
        weight: real tensor ``n1 x n2 x n3``.
        cols: when given, rows are scored on these columns only.

    Returns:
        ``(column_scores, row_scores)``: shapes ``(n2,)`` and ``(n1,)``; ``s_j = sum_k ||Ŵ_k[:, j]||_2``.
    """
    spectrum = torch.fft.fft(weight.detach(), dim=-1)  # n1 x n2 x n3, all n3 slices as in the score's definition
    magnitude_sq = spectrum.real**2 + spectrum.imag**2
    column_scores = magnitude_sq.sum(dim=0).sqrt().sum(dim=-1)
    restricted = magnitude_sq if cols is None else magnitude_sq[:, cols, :]
    row_scores = restricted.sum(dim=1).sqrt().sum(dim=-1)
    return column_scores, row_scores


def _pick(scores: torch.Tensor, rank: int, rule: str, generator: torch.Generator | None) -> torch.Tensor:
    if rule == "topk":
        chosen = torch.topk(scores, rank, sorted=False).indices
    else:
        # Zero-norm slices carry no information: give them the smallest positive score instead of infinity.
        floor = torch.finfo(scores.dtype).tiny
        probabilities = 1.0 / scores.double().clamp_min(floor)
        chosen = torch.multinomial(probabilities / probabilities.sum(), rank, replacement=False, generator=generator)
    return torch.sort(chosen).values.to(torch.int64)


def select_slices(
    weight: torch.Tensor, rank: int, rule: str = "topk", seed: int | None = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose ``r`` rows ``I`` and ``r`` columns ``J`` of ``weight`` (columns first, rows scored on them).

    Args:
        weight: real tensor ``n1 x n2 x n3``.
        rank: ``r``, at most ``min(n1, n2)``.
        rule: ``"topk"`` (default) or ``"inverse_sampling"``.
        seed: seed of the generator for ``"inverse_sampling"``; ignored by ``"topk"``.

    Returns:
        ``(rows, cols)``: ascending int64 index tensors of shape ``(r,)``.
    """
    if weight.ndim != 3:
        raise ValueError(f"weight must be a third-order tensor n1 x n2 x n3, got shape {tuple(weight.shape)}.")
    if rule not in SELECTION_RULES:
        raise ValueError(f"unknown selection rule {rule!r}; expected one of {SELECTION_RULES}.")
    n1, n2, _ = weight.shape
    if not 1 <= rank <= min(n1, n2):
        raise ValueError(
            f"rank r={rank} must be between 1 and min(n1, n2)={min(n1, n2)} for a tensor of shape {tuple(weight.shape)}."
        )
    generator = None
    if rule == "inverse_sampling":
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
    column_scores, _ = slice_scores(weight)
    cols = _pick(column_scores.cpu(), rank, rule, generator)
    _, row_scores = slice_scores(weight, cols.to(weight.device))
    rows = _pick(row_scores.cpu(), rank, rule, generator)
    return rows.to(weight.device), cols.to(weight.device)


def tensor_cur(weight: torch.Tensor, rank: int, rule: str = "topk", seed: int | None = 0) -> TensorCUR:
    """Tensor CUR decomposition of ``weight`` at rank ``r``.

    Args:
        weight: real tensor ``n1 x n2 x n3``.
        rank: number of rows and columns kept.
        rule: slice selection rule, see :func:`select_slices`.
        seed: seed for ``"inverse_sampling"``.

    Returns:
        :class:`TensorCUR` with ``C`` (``n1 x r x n3``), ``R`` (``r x n2 x n3``) and the core (``r x r x n3``), all
        detached copies: the decomposition never shares storage with ``weight``.

    Notes:
        Slow reference of the reconstruction, for each Fourier slice ``k``:
        ``Ŵ_k ≈ Ĉ_k @ pinv(M̂_k) @ R̂_k``.
    """
    rows, cols = select_slices(weight, rank, rule, seed)
    detached = weight.detach()
    c = detached[:, cols, :].clone()
    r = detached[rows, :, :].clone()
    core = detached[rows][:, cols].clone()
    return TensorCUR(rows=rows, cols=cols, c=c, r=r, core=core)
