"""The t-product of real third-order tensors and the operations that follow from it.

A third-order tensor ``A`` of shape ``n1 x n2 x n3`` is a stack of ``n3`` frontal slices ``A[:, :, k]``. The
t-product (Kilmer and Martin, 2011) multiplies two tensors as block-circulant matrices:

.. math::

    A * B = \\operatorname{fold}\\big(\\operatorname{bcirc}(A)\\,\\operatorname{unfold}(B)\\big)

which the discrete Fourier transform along mode 3 diagonalises, so that every Fourier slice multiplies on its own:
``(A * B)^_k = Â_k @ B̂_k``. For real tensors the spectrum is conjugate symmetric, so ``rfft`` and ``irfft`` need only
the ``n3 // 2 + 1`` first slices.

Every function here takes tensors of shape ``(..., n1, n2, n3)``: leading dimensions are batch dimensions and
broadcast like ``torch.matmul``. All functions are differentiable.

References:
    M. E. Kilmer and C. D. Martin, "Factorization strategies for third-order tensors", Linear Algebra and its
    Applications 435 (2011) 641-658.
"""
from __future__ import annotations

import torch

__all__ = ["t_product", "t_transpose", "t_identity", "t_pinv", "to_fourier", "from_fourier"]


def _check_third_order(name: str, tensor: torch.Tensor) -> None:
    if tensor.ndim < 3:
        raise ValueError(f"{name} must have shape (..., n1, n2, n3), got shape {tuple(tensor.shape)}.")
    if tensor.is_complex():
        raise ValueError(f"{name} must be real, got dtype {tensor.dtype}.")


def to_fourier(tensor: torch.Tensor) -> torch.Tensor:
    """Fourier slices of a real tensor along mode 3.

    Args:
        tensor: real tensor of shape ``(..., n1, n2, n3)``.

    Returns:
        complex tensor of shape ``(..., n3 // 2 + 1, n1, n2)``: slice ``k`` is ``Â_k``, ready for batched matmul.
    """
    _check_third_order("tensor", tensor)
    return torch.fft.rfft(tensor, dim=-1).movedim(-1, -3)


def from_fourier(slices: torch.Tensor, n3: int) -> torch.Tensor:
    """Inverse of :func:`to_fourier`: ``(..., n3 // 2 + 1, n1, n2)`` complex slices to a real ``(..., n1, n2, n3)``."""
    expected = n3 // 2 + 1
    if slices.ndim < 3 or slices.shape[-3] != expected:
        raise ValueError(
            f"expected {expected} Fourier slices for n3={n3} in dimension -3, got shape {tuple(slices.shape)}."
        )
    return torch.fft.irfft(slices.movedim(-3, -1), n=n3, dim=-1)


def t_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """t-product ``A * B`` of real tensors.

    Args:
        a: shape ``(..., n1, n2, n3)``.
        b: shape ``(..., n2, n4, n3)``; batch dimensions broadcast against ``a``'s.

    Returns:
        real tensor of shape ``(..., n1, n4, n3)``.

    Raises:
        ValueError: when the inner dimensions or the tube lengths ``n3`` differ (both shapes are quoted).
    """
    _check_third_order("a", a)
    _check_third_order("b", b)
    if a.shape[-2] != b.shape[-3] or a.shape[-1] != b.shape[-1]:
        raise ValueError(
            f"t-product needs a of shape (..., n1, n2, n3) and b of shape (..., n2, n4, n3); "
            f"got a {tuple(a.shape)} and b {tuple(b.shape)}."
        )
    n3 = a.shape[-1]
    return from_fourier(to_fourier(a) @ to_fourier(b), n3)


def t_transpose(a: torch.Tensor) -> torch.Tensor:
    """t-transpose: transpose every frontal slice, then reverse the order of slices 1 .. n3-1.

    It is the tensor whose block-circulant matrix is ``bcirc(A)^T``, so that ``(A * B)^T = B^T * A^T``.

    Args:
        a: shape ``(..., n1, n2, n3)``.

    Returns:
        shape ``(..., n2, n1, n3)``.
    """
    _check_third_order("a", a)
    transposed = a.transpose(-3, -2)
    reversed_tail = transposed[..., 1:].flip(-1)
    return torch.cat([transposed[..., :1], reversed_tail], dim=-1)


def t_identity(n: int, n3: int, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """Identity tensor ``I`` of shape ``n x n x n3`` (identity first frontal slice, zeros elsewhere): ``A * I = A``."""
    if n < 1 or n3 < 1:
        raise ValueError(f"t_identity needs n >= 1 and n3 >= 1, got n={n}, n3={n3}.")
    identity = torch.zeros(n, n, n3, dtype=dtype, device=device)
    identity[:, :, 0] = torch.eye(n, dtype=dtype, device=device)
    return identity


def t_pinv(a: torch.Tensor) -> torch.Tensor:
    """t-pseudo-inverse: the Moore-Penrose pseudo-inverse of every Fourier slice.

    It satisfies, under the t-product, ``A * A+ * A = A``, ``A+ * A * A+ = A+`` and both ``A * A+`` and ``A+ * A`` are
    t-symmetric (equal to their t-transposes).

    Args:
        a: shape ``(..., n1, n2, n3)``.

    Returns:
        shape ``(..., n2, n1, n3)``.
    """
    _check_third_order("a", a)
    n3 = a.shape[-1]
    return from_fourier(torch.linalg.pinv(to_fourier(a)), n3)
