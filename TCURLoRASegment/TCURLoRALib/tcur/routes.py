"""Three ways for a group's update ``ΔW = C * D * R`` (``D = U - U0``) to reach its Linear layers, and the count that
picks one.

A group ``n1 x n2 x n3`` at rank ``r`` feeds Linear layers ("sites") that each hold ``c`` consecutive frontal slices
``k = s .. s+c-1`` stacked on rows (``c = 3`` for a fused qkv, 1 otherwise). A site's output for ``N`` tokens ``x``
(``N x n2``) is ``y_k = x (W_k + ΔW_k)^T`` for each of its slices. By the t-product's definition
``ΔW_k = sum_{a+b+c = k mod n3} C_a D_b R_c``, so with ``q = r n3``:

- ``"fft"``: build ``ΔW`` densely by ``rfft``/``irfft`` along mode 3 (``TCURGroup.delta_weight``), then
  ``F.linear(x, W + ΔW)``; autograd gives every site a dense weight gradient ``g^T x`` and carries it back to ``U``.
- ``"bcirc"``: the same dense ``ΔW`` by block-circulant matmuls, ``E = D * R`` (``unfold(E) = bcirc(D) unfold(R)``)
  and ``ΔW_k = [C_0 .. C_{n3-1}] [E_k; E_{k-1}; ..; E_{k-n3+1}]``: more multiply-adds than the FFT (``n3 / 2`` times),
  but no transform passes over ``n1 n2 n3`` elements.
- ``"factored"`` (:mod:`.factored`): never builds ``ΔW``. Project ``x`` on ``R``'s Fourier slices (one
  ``N x n2 x q'`` matmul per site), mix with ``D``'s, expand by ``C``'s (one ``N c x q' x n1`` matmul per site), all
  in a real Fourier basis (``q' = q`` for even ``n3``, ``q + r`` for odd); the base Linear runs as a frozen
  ``F.linear`` with no weight gradient. The input's gradient gains ``N q' n2`` per site.

Cost per group and training step (forward + backward, the base's own ``x W^T`` and its input gradient left out,
since every route pays them), in multiply-adds ("MACs"), with ``F = n3 // 2 + 1``, ``T = n1 n2 n3`` (elements of
``ΔW``) and ``S`` sites of ``c_s`` slices:

- fft: ``N T`` (the weight gradients ``g^T x``) ``+ 8 F r n2 (n1 + r)`` (slice products) ``+ β_fft T``;
- bcirc: ``N T + 2 r n3 T + 2 r^2 n3^2 n2 + β_bcirc T``;
- factored: ``sum_s (N q' n2 (1 + g) + 2 N c_s q' n1) + γ S``, ``g = 1`` when the inputs need a gradient (x-side
  backward ``N q' n2``; autograd skips it where an input needs none, as the first block's).

``β`` charges the dense routes' passes over the ``T`` elements of ``ΔW`` (transforms, ``W + ΔW``, the gradients,
each site's slices) and ``γ`` the factored route's small operations per site (the mixing, layout copies), both in
MACs at the speed of a large matmul. Without a backward pass the MAC terms of the forward remain
(``4 F r n2 (n1 + r)``, ``r n3 T + r^2 n3^2 n2``, ``N q' n2 + N c_s q' n1``) and half of ``β`` and
``γ``. The defaults :data:`BETA_FFT`, :data:`BETA_BCIRC` and :data:`GAMMA_SITE` were fitted to the route timings of
``Testing/benchmarks/bench_core.py`` on a 2-core CPU (its route table has them, with the crossovers); a pass over
memory is slow there against a matmul, so the dense routes pay for every element of ``ΔW`` hundreds of times.

Per token and slice the factored route costs about ``2 q (n1 + n2 / c)`` MACs, the dense routes ``n1 n2``. Where
the first is smaller the factored route wins at every ``N`` (UNETR-B's MLP groups at ``r = 8``: ``q = 96``, 0.74M
against 2.4M); elsewhere it wins below a crossover, where the dense routes' fixed ``β T`` is not yet paid back
(UNETR-B's attention, ``q = 384 = h / 2``: 0.88M against 0.59M, crossover about 1,200 tokens by the count, 5-6
crops of 96^3; the compact UNETR's attention, ``q = 384 = 2 h``: 0.22M against 0.04M, crossover about 90 tokens).
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch

from .factored import fourier_blocks
from .tproduct import to_fourier

__all__ = ["AUTO", "BETA_BCIRC", "BETA_FFT", "GAMMA_SITE", "ROUTES", "choose_route", "delta_by_bcirc", "delta_by_fft",
           "route_costs"]

ROUTES = ("fft", "bcirc", "factored")
"""The routes, see the module docstring."""
AUTO = "auto"
"""Choose a route per group and forward pass by :func:`choose_route`."""
BETA_FFT = 600.0
"""MACs that one element of ``ΔW`` costs in the fft route's passes over memory (forward and backward)."""
BETA_BCIRC = 250.0
"""MACs that one element of ``ΔW`` costs in the bcirc route's passes over memory (forward and backward)."""
GAMMA_SITE = 1.5e7
"""MACs that one site costs in the factored route's small operations (forward and backward)."""


def delta_by_fft(c_fourier: torch.Tensor, r_fourier: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
    """``C * core * R`` from the Fourier slices of ``C`` (``F x n1 x r``) and ``R`` (``F x r x n2``).

    Returns:
        ``ΔW``, shape ``n1 x n2 x n3`` (``n3`` = the core's last dimension).
    """
    n3 = core.shape[-1]
    spectrum = (c_fourier @ to_fourier(core)) @ r_fourier  # (n3 // 2 + 1) x n1 x n2
    # irfft along the last, contiguous axis runs about twice as fast here as along the leading one.
    return torch.fft.irfft(spectrum.permute(1, 2, 0), n=n3, dim=-1)


@functools.lru_cache(maxsize=512)
def circulant_index(n3: int, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """``index[i, t] = (start + i - t) mod n3``, shape ``(stop - start) x n3``: the slices that meet slice ``t`` of
    the left factor in output slice ``start + i`` of a t-product. Cached (read only): every forward pass asks again.
    Made outside inference mode even when first asked inside it (validation, segmentation): a cached inference tensor
    would make every later training step fail ("Inference tensors cannot be saved for backward")."""
    with torch.inference_mode(False):
        outputs = torch.arange(start, stop, device=device)[:, None]
        return (outputs - torch.arange(n3, device=device)[None, :]) % n3


def delta_by_bcirc(c_cat: torch.Tensor, r_cat: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
    """``C * core * R`` by block-circulant matmuls.

    Args:
        c_cat: ``C`` as ``(n3 r) x n1``, row ``t r + a`` = ``C[:, a, t]``.
        r_cat: ``R`` as ``n2 x (n3 r)``, column ``t r + b`` = ``R[b, :, t]`` (so ``r_cat^T = unfold(R)``).
        core: ``D``, shape ``r x r x n3``.

    Returns:
        ``ΔW`` slices first, shape ``n3 x n1 x n2`` (contiguous, so a site's rows are a view).
    """
    rank, _, n3 = core.shape
    n2 = r_cat.shape[0]
    index = circulant_index(n3, 0, n3, core.device)
    # bcirc(D): block (i, t) = D_{i - t}; unfold(E) = bcirc(D) unfold(R), E = D * R.
    bcirc_core = core.permute(2, 0, 1)[index].permute(0, 2, 1, 3).reshape(n3 * rank, n3 * rank)
    e_slices = (bcirc_core @ r_cat.T).view(n3, rank, n2)
    # ΔW_k = sum_t C_t E_{k-t}: the rolled E of every output slice k, n3 x (n3 r) x n2, against [C_0 .. C_{n3-1}].
    rolled = e_slices[index].reshape(n3, n3 * rank, n2)
    return c_cat.T @ rolled


def route_costs(
    shape: Sequence[int], rank: int, site_counts: Sequence[int], tokens: int, backward: bool = True,
    input_grad: bool = True,
) -> dict[str, float]:
    """The count of the module docstring: estimated MACs of each route for one group.

    Args:
        shape: ``(n1, n2, n3)`` of the group tensor.
        rank: ``r``.
        site_counts: slices each site holds, e.g. ``[3, 1] * L`` for attention; they sum to ``n3``.
        tokens: ``N``, the rows of each site's input (batch times tokens).
        backward: whether a gradient to ``U`` will be computed (training).
        input_grad: whether the sites' inputs need a gradient.

    Returns:
        ``{"fft": ..., "bcirc": ..., "factored": ...}``.

    Raises:
        ValueError: when the site counts do not sum to ``n3``.
    """
    n1, n2, n3 = shape
    if sum(site_counts) != n3:
        raise ValueError(f"site slice counts {list(site_counts)} must sum to n3={n3}.")
    f, q, total = n3 // 2 + 1, 2 * rank * fourier_blocks(n3), n1 * n2 * n3
    passes = 2 if backward else 1
    weight_gradients = tokens * total if backward else 0
    fft = weight_gradients + passes * 4 * f * rank * n2 * (n1 + rank) + BETA_FFT * total * passes / 2
    bcirc = weight_gradients + passes * (rank * n3 * total + rank**2 * n3**2 * n2) + BETA_BCIRC * total * passes / 2
    x_side = 2 if backward and input_grad else 1
    factored = sum(tokens * q * (n2 * x_side + passes * count * n1) for count in site_counts)
    factored += GAMMA_SITE * len(site_counts) * passes / 2
    return {"fft": float(fft), "bcirc": float(bcirc), "factored": float(factored)}


def choose_route(
    shape: Sequence[int], rank: int, site_counts: Sequence[int], tokens: int, backward: bool = True,
    input_grad: bool = True,
) -> str:
    """The route of least :func:`route_costs`."""
    costs = route_costs(shape, rank, site_counts, tokens, backward, input_grad)
    return min(costs, key=costs.__getitem__)
