"""The tCURLoRA layers: a group's trainable core U, and the Linear wrapper that applies the group's update."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .cur import tensor_cur
from .factored import factored_update, mixing_matrices, real_fourier_factors
from .routes import delta_by_bcirc, delta_by_fft
from .tproduct import t_pinv, to_fourier

__all__ = ["TCURGroup", "TCURLinear"]


class TCURGroup(nn.Module):
    """One weight group ``W`` (``n1 x n2 x n3``) with its frozen CUR factors and the trainable core ``U``.

    The adapted group is ``W + C * (U - U0) * R``, which equals the paper's ``W_res + C * U * R`` with
    ``W_res = W - C * U0 * R`` without storing ``W_res``: the base weights stay where they are, in their Linear layers.

    Args:
        c: ``W[:, J, :]``, shape ``n1 x r x n3``.
        r: ``W[I, :, :]``, shape ``r x n2 x n3``.
        rows: ``I``, int64 of shape ``(r,)``.
        cols: ``J``, int64 of shape ``(r,)``.
        u_init: ``U0``, shape ``r x r x n3``; ``U`` starts as a copy of it, so ``ΔW = 0`` at step 0.
    """

    def __init__(self, c: torch.Tensor, r: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, u_init: torch.Tensor):
        super().__init__()
        rank = rows.numel()
        n1, _, n3 = c.shape
        expected = {"c": (n1, rank, n3), "r": (rank, r.shape[1], n3), "cols": (rank,), "u_init": (rank, rank, n3)}
        actual = {"c": tuple(c.shape), "r": tuple(r.shape), "cols": tuple(cols.shape), "u_init": tuple(u_init.shape)}
        for name, shape in expected.items():
            if actual[name] != shape:
                raise ValueError(f"{name} must have shape {shape} for rank {rank}, got {actual[name]}.")
        self.register_buffer("c", c.detach().clone())
        self.register_buffer("r", r.detach().clone())
        self.register_buffer("rows", rows.detach().clone().to(torch.int64))
        self.register_buffer("cols", cols.detach().clone().to(torch.int64))
        self.register_buffer("u_init", u_init.detach().clone())
        self.u = nn.Parameter(u_init.detach().clone())
        # C and R are frozen: their Fourier slices and the matrix layouts of the other routes are computed once.
        for name, value in self._derived().items():
            self.register_buffer(name, value, persistent=False)

    def _derived(self) -> dict[str, torch.Tensor]:
        """C and R as each route reads them (see :mod:`.routes`): Fourier slices (fft), ``(n3 r) x n1`` / ``n2 x (n3 r)``
        (bcirc), and the real Fourier matrices of :func:`.factored.real_fourier_factors` (factored)."""
        rank, n3 = self.rows.numel(), self.c.shape[-1]
        r_hat, c_hat = real_fourier_factors(self.c, self.r)
        return {
            "c_fourier": to_fourier(self.c).contiguous(),
            "r_fourier": to_fourier(self.r).contiguous(),
            "c_cat": self.c.permute(2, 1, 0).reshape(n3 * rank, -1).contiguous(),
            "r_cat": self.r.permute(1, 2, 0).reshape(-1, n3 * rank).contiguous(),
            "r_hat": r_hat,
            "c_hat": c_hat,
        }

    @classmethod
    def from_weight(
        cls, weight: torch.Tensor, rank: int, init: str = "pinv", selection: str = "topk", seed: int = 0
    ) -> "TCURGroup":
        """Decompose a group tensor ``n1 x n2 x n3`` and initialise ``U0`` by ``init`` (``"pinv"`` or ``"zero"``)."""
        cur = tensor_cur(weight, rank, selection, seed)
        if init == "pinv":
            u_init = t_pinv(cur.core)
        elif init == "zero":
            u_init = torch.zeros_like(cur.core)
        else:
            raise ValueError(f"unknown init {init!r}; expected 'pinv' or 'zero'.")
        return cls(cur.c, cur.r, cur.rows, cur.cols, u_init)

    @classmethod
    def from_indices(
        cls, weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, u_init: torch.Tensor
    ) -> "TCURGroup":
        """Rebuild a group from saved indices ``I``, ``J`` and ``U0`` (C and R are read again from ``weight``).

        Raises:
            ValueError: when an index lies outside ``weight`` (the index and the shape are named).
        """
        n1, n2, _ = weight.shape
        for name, index, bound in (("rows", rows, n1), ("cols", cols, n2)):
            if index.ndim != 1 or index.numel() == 0 or int(index.min()) < 0 or int(index.max()) >= bound:
                raise ValueError(
                    f"{name} indices {index.tolist()} do not fit a group tensor of shape {tuple(weight.shape)}."
                )
        detached = weight.detach()
        return cls(detached[:, cols, :], detached[rows, :, :], rows, cols, u_init.to(weight.dtype))

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(n1, n2, n3)`` of the group tensor."""
        return self.c.shape[0], self.r.shape[1], self.c.shape[2]

    def _apply(self, fn, recurse: bool = True):
        # Module.to(dtype) / .double() cast the complex spectra to a real dtype, dropping their imaginary parts:
        # compute them again from C and R, which were cast like any real buffer.
        super()._apply(fn, recurse)
        for name, value in self._derived().items():
            setattr(self, name, value)
        return self

    def delta_weight(self, u: torch.Tensor | None = None) -> torch.Tensor:
        """``ΔW = C * (U - U0) * R`` by FFT along mode 3, shape ``n1 x n2 x n3``.

        Args:
            u: the core to use instead of the current ``U`` (for an exact unmerge).
        """
        return delta_by_fft(self.c_fourier, self.r_fourier, (self.u if u is None else u) - self.u_init)

    def delta_slices(self, route: str) -> torch.Tensor:
        """``ΔW`` slices first, ``n3 x n1 x n2``, built by the dense ``route`` (``"fft"`` or ``"bcirc"``)."""
        if route == "fft":
            return self.delta_weight().permute(2, 0, 1)
        if route == "bcirc":
            return delta_by_bcirc(self.c_cat, self.r_cat, self.u - self.u_init)
        raise ValueError(f"route {route!r} builds no dense update; expected 'fft' or 'bcirc'.")

    def mixing(self) -> torch.Tensor:
        """What the factored route mixes with: :func:`.factored.mixing_matrices` of ``U - U0``."""
        return mixing_matrices(self.u - self.u_init)

    def update(
        self, x: torch.Tensor, start: int, stop: int, mixing: torch.Tensor | None = None,
        base: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x ΔW_site^T`` (plus ``base``) for frontal slices ``start .. stop-1`` by the factored route, never building
        ``ΔW``.

        Args:
            x: ``... x n2``.
            mixing: :meth:`mixing`, when the caller computed it once for all its sites.
            base: added to the result, shape ``... x ((stop - start) n1)`` (the base Linear's output).

        Returns:
            ``... x ((stop - start) n1)``.
        """
        mixing = self.mixing() if mixing is None else mixing
        return factored_update(x, self.r_hat, self.c_hat, mixing, start, stop, base)

    def extra_repr(self) -> str:
        n1, n2, n3 = self.shape
        return f"shape=({n1}, {n2}, {n3}), rank={self.rows.numel()}"


class TCURLinear(nn.Module):
    """An ``nn.Linear`` whose weight is its base weight plus its rows of the group update.

    Args:
        base_layer: the frozen Linear, kept as it is (its weight is not copied).
        forward: ``forward(base_layer, x)``, the adapted output; the model routes it (see :mod:`.routes`), and runs
            ``base_layer`` alone when the update is merged into the base weight.
    """

    def __init__(self, base_layer: nn.Linear, forward: Callable[[nn.Linear, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.base_layer = base_layer
        self._forward = forward

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``B x N x in_features`` -> ``B x N x out_features``."""
        return self._forward(self.base_layer, x)
