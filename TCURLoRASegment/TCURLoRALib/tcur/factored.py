"""The factored route: ``x ΔW_site^T`` for ``ΔW = C * D * R`` without building ``ΔW``, in a real Fourier basis.

With Fourier slices along mode 3 (``F = n3 // 2 + 1``), output slice ``k`` of a site is

.. math::

    y_k = \\frac{1}{n_3} \\sum_{f=0}^{n_3-1} \\hat C_f \\, e^{2\\pi i f k / n_3} \\hat D_f \\, \\hat R_f \\, x^T

and, ``x`` being real, the ``F`` first frequencies carry it all. Three real matmuls per site compute it:

1. project: ``p = x R̂`` with ``R̂`` the ``n2 x q'`` matrix of the real and imaginary parts of ``R``'s Fourier slices
   (frozen; ``x R_t^T`` and the forward transform in one product);
2. mix: per block of frequencies, ``z = p M_b(k)`` with ``M_b(k)`` the ``2r x 2r`` real form of
   ``e^{2πi f k / n3} D̂_f^T`` (built once per forward pass for all ``k`` by :func:`mixing_matrices`; the only part
   that depends on ``U``);
3. expand: ``y_k = z Ĉ`` with ``Ĉ`` the ``q' x n1`` matrix of ``C``'s Fourier slices weighted for the inverse
   transform (frozen).

Blocks of ``2r`` columns: block 0 holds frequency 0 and, for even ``n3``, the Nyquist frequency ``n3 / 2`` (both
real); block ``b >= 1`` holds the real and imaginary parts of frequency ``b``. So ``q' = r n3`` for even ``n3`` (the
``q`` of the block-circulant form: no extra multiply-adds) and ``r (n3 + 1)`` for odd ``n3`` (block 0 padded).
No FFT, gather or scatter runs per site; a forward and backward pass of a site costs
``N q' n2`` (project) ``+ N q' n2`` (input gradient) ``+ 2 N c q' n1`` (expand and its gradient) ``+ 6 N c r q'``
(mixing) multiply-adds.
"""
from __future__ import annotations

import functools
import math

import torch

__all__ = ["factored_update", "fourier_blocks", "mixing_matrices", "real_fourier_factors"]


def fourier_blocks(n3: int) -> int:
    """Blocks of ``2r`` columns for tube length ``n3``: ``n3 // 2`` for even ``n3``, ``(n3 + 1) // 2`` for odd."""
    return n3 // 2 if n3 % 2 == 0 else (n3 + 1) // 2


def _block_parts(spectrum: torch.Tensor, n3: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First and second halves of every block from Fourier slices ``(..., F)``: ``(B, ...)`` each.

    Block 0: (frequency 0, Nyquist or zeros); block ``b >= 1``: (real part, imaginary part) of frequency ``b``.
    """
    blocks = fourier_blocks(n3)
    slices = spectrum.movedim(-1, 0)  # F x ...
    first = slices[:blocks].real
    nyquist = slices[n3 // 2].real if n3 % 2 == 0 else torch.zeros_like(first[0])
    second = torch.cat([nyquist[None], slices[1:blocks].imag])
    return first, second


def real_fourier_factors(c: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen matrices of the factored route.

    Args:
        c: ``C``, shape ``n1 x r x n3``.
        r: ``R``, shape ``r x n2 x n3``.

    Returns:
        ``(r_hat, c_hat)``: ``n2 x q'`` and ``q' x n1``, columns and rows ordered (block, half, index ``0..r-1``).
    """
    n1, rank, n3 = c.shape
    r_first, r_second = _block_parts(torch.fft.rfft(r, dim=-1), n3)  # B x r x n2 each
    r_hat = torch.stack([r_first, r_second], dim=1).reshape(-1, r.shape[1]).T.contiguous()
    c_first, c_second = _block_parts(torch.fft.rfft(c, dim=-1), n3)  # B x n1 x r each
    # Inverse transform: frequency 0 and Nyquist count once, the others twice (their conjugates are not stored);
    # Re(z Ĉ^T) = z_re Ĉ_re^T - z_im Ĉ_im^T, hence the minus on imaginary parts.
    weights = torch.full((c_first.shape[0], 1, 1), 2.0 / n3, dtype=c.dtype, device=c.device)
    weights[0] = 1.0 / n3
    second_sign = torch.full_like(weights, -1.0)
    second_sign[0] = 1.0
    c_hat = torch.stack([weights * c_first, weights * second_sign * c_second], dim=1)  # B x 2 x n1 x r
    return r_hat, c_hat.transpose(-1, -2).reshape(-1, n1).contiguous()


@functools.lru_cache(maxsize=64)
def _phases(n3: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """cos and sin of ``2π b k / n3`` (``B x n3``), and ``(-1)^k`` (``n3``). Cached (read only), and made outside
    inference mode for the reason :func:`~.routes.circulant_index` gives."""
    with torch.inference_mode(False):
        blocks = torch.arange(fourier_blocks(n3), dtype=torch.float64)
        slices = torch.arange(n3, dtype=torch.float64)
        angles = 2 * math.pi * blocks[:, None] * slices[None, :] / n3
        signs = torch.where(slices % 2 == 0, 1.0, -1.0)
        return tuple(t.to(device=device, dtype=dtype) for t in (angles.cos(), angles.sin(), signs))  # type: ignore[return-value]


def mixing_matrices(core: torch.Tensor) -> torch.Tensor:
    """The mixing by ``D`` (``r x r x n3``) for every output slice ``k``, as real block matrices.

    For block ``b >= 1`` and slice ``k``, the ``2r x 2r`` real form of right-multiplying a row vector of complex
    numbers by ``A^T = e^{2πi b k / n3} D̂_b^T``: ``[p_re, p_im] [[A_re^T, A_im^T], [-A_im^T, A_re^T]]``. Block 0:
    ``diag(D̂_0^T, (-1)^k D̂_{n3/2}^T)`` (zeros in place of the Nyquist part for odd ``n3``).

    Returns:
        shape ``B x 2r x (n3 2r)``: columns ``k 2r .. (k+1) 2r - 1`` mix for output slice ``k``.
    """
    rank, _, n3 = core.shape
    cos, sin, signs = _phases(n3, core.device, core.dtype)
    first, second = _block_parts(torch.fft.rfft(core, dim=-1).transpose(0, 1), n3)  # B x r x r each: D̂^T parts
    # Blocks b >= 1: first = Re D̂_b^T, second = Im D̂_b^T, rotated by the phase of slice k.
    re = cos[1:, :, None, None] * first[1:, None] - sin[1:, :, None, None] * second[1:, None]  # (B-1) x n3 x r x r
    im = sin[1:, :, None, None] * first[1:, None] + cos[1:, :, None, None] * second[1:, None]
    pairs = torch.stack([torch.stack([re, im], dim=3), torch.stack([-im, re], dim=3)], dim=2)  # .. x 2 x r x 2 x r
    zero = torch.zeros_like(first[0]).expand(n3, rank, rank)
    dc = first[0].expand(n3, rank, rank)
    nyquist = signs[:, None, None] * second[0]
    block0 = torch.stack([torch.stack([dc, zero], dim=2), torch.stack([zero, nyquist], dim=2)], dim=1)
    blocks = torch.cat([block0[None], pairs])  # B x n3 x 2 x r x 2 x r (k, half in, row, half out, column)
    return blocks.permute(0, 2, 3, 1, 4, 5).reshape(blocks.shape[0], 2 * rank, n3 * 2 * rank)


def factored_update(
    x: torch.Tensor, r_hat: torch.Tensor, c_hat: torch.Tensor, mixing: torch.Tensor, start: int, stop: int,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x ΔW_site^T`` (plus ``base``) for the frontal slices ``start .. stop-1``, never building ``ΔW``.

    Args:
        x: ``... x n2``.
        r_hat, c_hat: :func:`real_fourier_factors` of ``C`` and ``R``.
        mixing: :func:`mixing_matrices` of ``D = U - U0``.
        start, stop: the site's slices.
        base: added to the result in the last matmul (the base Linear's output, shaped like the result).

    Returns:
        shape ``... x ((stop - start) n1)``: slice ``start``'s outputs first, as a fused Linear's rows are stacked.
    """
    n2 = r_hat.shape[0]
    n1 = c_hat.shape[1]
    blocks, width = mixing.shape[0], mixing.shape[1]
    count = stop - start
    lead = x.shape[:-1]
    projected = (x.reshape(-1, n2) @ r_hat).view(-1, blocks, width).transpose(0, 1)  # B x N x 2r
    mixed = projected @ mixing[:, :, start * width : stop * width]  # B x N x (c 2r)
    mixed = mixed.view(blocks, -1, count, width).permute(1, 2, 0, 3).reshape(-1, blocks * width)  # (N c) x q'
    if base is None:
        return (mixed @ c_hat).view(*lead, count * n1)
    return torch.addmm(base.reshape(-1, n1), mixed, c_hat).view(*lead, count * n1)
