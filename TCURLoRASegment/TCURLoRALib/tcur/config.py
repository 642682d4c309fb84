"""Configuration of a tCURLoRA adapter."""
from __future__ import annotations

from dataclasses import dataclass, field

from .names import GROUP_NAMES, INITS, SELECTION_RULES

__all__ = ["INITS", "TCURLoRAConfig"]


@dataclass
class TCURLoRAConfig:
    """What to adapt and how.

    Args:
        rank: ``r``, the number of lateral and horizontal slices kept per group; U is ``r x r x n3``. Default 8 (the
            paper's setting).
        groups: weight groups to adapt, any of ``"attention"`` (``h x h x 4L``), ``"mlp_up"`` (``m x h x L``) and
            ``"mlp_down"`` (``h x m x L``). Default: all three.
        init: ``"pinv"`` starts U at the t-pseudo-inverse of the intersection ``W[I, J, :]`` (the paper's Fig. 1 and
            official code); ``"zero"`` starts U at zero (CURLoRA). Both give ``ΔW = 0`` at step 0.
        selection: slice selection rule, ``"topk"`` (deterministic) or ``"inverse_sampling"`` (seeded).
        seed: seed of ``"inverse_sampling"``.
    """

    rank: int = 8
    groups: tuple[str, ...] = field(default=GROUP_NAMES)
    init: str = "pinv"
    selection: str = "topk"
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}.")
        if isinstance(self.groups, str):
            raise ValueError(f"groups must be a sequence of group names, got the string {self.groups!r}.")
        self.groups = tuple(self.groups)
        if not self.groups:
            raise ValueError(f"groups must name at least one of {GROUP_NAMES}, got an empty sequence.")
        unknown = [name for name in self.groups if name not in GROUP_NAMES]
        if unknown:
            raise ValueError(f"unknown weight group(s) {unknown}; expected names from {GROUP_NAMES}.")
        if len(set(self.groups)) != len(self.groups):
            raise ValueError(f"groups must not repeat a name, got {list(self.groups)}.")
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; expected one of {INITS}.")
        if self.selection not in SELECTION_RULES:
            raise ValueError(f"unknown selection rule {self.selection!r}; expected one of {SELECTION_RULES}.")
