"""The tCURLoRA layers: a group's trainable core U, and the Linear wrapper that applies the group's update."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .cur import tensor_cur
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
        # C and R are frozen: their Fourier slices are computed once, contiguous for batched complex matmul.
        self.register_buffer("c_fourier", to_fourier(self.c).contiguous(), persistent=False)
        self.register_buffer("r_fourier", to_fourier(self.r).contiguous(), persistent=False)

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
        self.c_fourier = to_fourier(self.c).contiguous()
        self.r_fourier = to_fourier(self.r).contiguous()
        return self

    def delta_weight(self, u: torch.Tensor | None = None) -> torch.Tensor:
        """``ΔW = C * (U - U0) * R`` by FFT along mode 3, shape ``n1 x n2 x n3``.

        Args:
            u: the core to use instead of the current ``U`` (for an exact unmerge).
        """
        core = (self.u if u is None else u) - self.u_init
        n3 = self.c.shape[-1]
        spectrum = (self.c_fourier @ to_fourier(core)) @ self.r_fourier  # (n3 // 2 + 1) x n1 x n2
        # irfft along the last, contiguous axis runs about twice as fast here as along the leading one.
        return torch.fft.irfft(spectrum.permute(1, 2, 0), n=n3, dim=-1)

    def extra_repr(self) -> str:
        n1, n2, n3 = self.shape
        return f"shape=({n1}, {n2}, {n3}), rank={self.rows.numel()}"


class TCURLinear(nn.Module):
    """An ``nn.Linear`` whose weight is its base weight plus its rows of the group update.

    Args:
        base_layer: the frozen Linear, kept as it is (its weight is not copied).
        delta: returns this layer's share of the group's ``ΔW`` (``out_features x in_features``), or ``None`` when
            the update is merged into the base weight.
    """

    def __init__(self, base_layer: nn.Linear, delta: Callable[[], Optional[torch.Tensor]]):
        super().__init__()
        self.base_layer = base_layer
        self._delta = delta

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``B x N x in_features`` -> ``B x N x out_features``."""
        delta = self._delta()
        if delta is None:
            return self.base_layer(x)
        return F.linear(x, self.base_layer.weight + delta, self.base_layer.bias)
