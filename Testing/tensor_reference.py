"""Slow references for the core math, written from the definitions with loops and no FFT (test use only)."""
from __future__ import annotations

import torch


def bcirc(a: torch.Tensor) -> torch.Tensor:
    """Block-circulant matrix of ``a`` (n1 x n2 x n3): ``(n3 n1) x (n3 n2)``, block (i, j) = frontal slice (i - j) mod n3."""
    n1, n2, n3 = a.shape
    out = torch.zeros(n1 * n3, n2 * n3, dtype=a.dtype)
    for i in range(n3):
        for j in range(n3):
            out[i * n1 : (i + 1) * n1, j * n2 : (j + 1) * n2] = a[:, :, (i - j) % n3]
    return out


def unfold(a: torch.Tensor) -> torch.Tensor:
    """Frontal slices stacked vertically: n1 x n2 x n3 -> (n3 n1) x n2."""
    return torch.cat([a[:, :, k] for k in range(a.shape[2])], dim=0)


def fold(matrix: torch.Tensor, n1: int, n3: int) -> torch.Tensor:
    """Inverse of :func:`unfold`: (n3 n1) x n2 -> n1 x n2 x n3."""
    return torch.stack([matrix[k * n1 : (k + 1) * n1] for k in range(n3)], dim=-1)


def naive_t_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fold(bcirc(A) @ unfold(B))."""
    return fold(bcirc(a) @ unfold(b), a.shape[0], a.shape[2])


def naive_delta(weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
    """``C * core * R`` with ``C = W[:, J, :]`` and ``R = W[I, :, :]`` taken here from ``weight``, by block-circulant
    products: ``unfold(C * D * R) = bcirc(C) bcirc(D) unfold(R)``."""
    c = weight[:, cols, :]
    r = weight[rows, :, :]
    return fold(bcirc(c) @ bcirc(core) @ unfold(r), weight.shape[0], weight.shape[2])


def random(*shape: int, seed: int = 0) -> torch.Tensor:
    """Standard normal float64 tensor from its own seeded generator."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
