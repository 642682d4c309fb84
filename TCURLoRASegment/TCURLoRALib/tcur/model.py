"""tCURLoRA on a MONAI UNETR: injection into the ViT, merge and unmerge, and what trains."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .config import TCURLoRAConfig
from .groups import LinearSite, group_sites, stack_group, vit_blocks
from .layer import TCURGroup, TCURLinear
from .routes import AUTO, ROUTES, choose_route

__all__ = ["DECODER_BLOCKS", "HEAD", "ParameterCounts", "TCURLoRAModel"]

# UNETR's decoder path, trained with U (the paper); the output head trains only when the label set changes.
DECODER_BLOCKS = ("decoder5", "decoder4", "decoder3", "decoder2")
HEAD = "out"


@dataclass(frozen=True)
class ParameterCounts:
    """Trainable parameters by part, and the model's total."""

    u: int
    decoder: int
    head: int
    total: int

    @property
    def trainable(self) -> int:
        return self.u + self.decoder + self.head

    @property
    def trainable_fraction(self) -> float:
        return self.trainable / self.total


class TCURLoRAModel(nn.Module):
    """A UNETR whose ViT weight groups are adapted by tCURLoRA.

    The base model is modified in place: each adapted ``nn.Linear`` is wrapped by a :class:`TCURLinear` that keeps
    the original layer as ``base_layer``. Each group reaches its Linear layers by one of the routes of
    :mod:`.routes`, chosen per forward pass of the ViT from the token count (:meth:`set_route` fixes one): a dense
    ``ΔW`` of the whole group, built once per forward pass, of which each Linear adds its rows to its weight; or the
    factored form, which never builds ``ΔW`` and leaves the base Linear frozen. All routes compute the same function.

    Args:
        base: a MONAI ``UNETR``; its ViT weights are read, never copied per layer.
        config: rank, groups, init and slice selection.
        group_state: a saved adapter's groups (see :meth:`group_state`): ``{group: {"rows", "cols", "u_init", "u"}}``;
            when given, slices are not selected again but taken from it, and U is set to the saved one.

    Example:
        >>> model = TCURLoRAModel(UNETR(1, 2, (96, 96, 96), feature_size=16), TCURLoRAConfig(rank=8))
        >>> counts = model.mark_trainable(train_head=False)
    """

    def __init__(
        self,
        base: nn.Module,
        config: TCURLoRAConfig | None = None,
        group_state: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    ):
        super().__init__()
        config = config or TCURLoRAConfig()
        vit_blocks(base)  # validates before any work
        self.base = base
        self.config = config
        self.groups = nn.ModuleDict()
        self.sites: dict[str, list[LinearSite]] = {}
        self._deltas: dict[str, torch.Tensor] = {}
        self._routes = {name: AUTO for name in config.groups}
        self._chosen: dict[str, str] = {}
        self._merged_cores: dict[str, torch.Tensor] = {}
        for name in config.groups:
            sites = group_sites(base, name)
            weight = stack_group(base, sites)
            if group_state is None:
                group = TCURGroup.from_weight(weight, config.rank, config.init, config.selection, config.seed)
            else:
                group = _group_from_state(name, weight, group_state, config.rank)
            self.groups[name] = group
            self.sites[name] = sites
            for site in sites:
                parent_path, _, attribute = site.path.rpartition(".")
                parent = base.get_submodule(parent_path)
                forward = functools.partial(self._site_forward, name, site)
                setattr(parent, attribute, TCURLinear(getattr(parent, attribute), forward))
        # One route and one ΔW per group and forward pass; dropped afterwards so that no stale update outlives a
        # training step.
        self._hooks = [
            base.vit.register_forward_pre_hook(lambda *_: self._forget_pass()),
            base.vit.register_forward_hook(lambda *_: self._forget_pass()),
        ]

    def _forget_pass(self) -> None:
        self._deltas.clear()
        self._chosen.clear()

    def group_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """What an adapter file needs to rebuild the groups on the same base: ``I``, ``J``, ``U0`` and ``U``."""
        return {
            name: {"rows": group.rows, "cols": group.cols, "u_init": group.u_init, "u": group.u.detach()}
            for name, group in self.groups.items()
        }

    def unload(self) -> nn.Module:
        """Take the adapter out: unmerge, put the original Linear layers back, remove the hooks; returns the base."""
        self.unmerge()
        for sites in self.sites.values():
            for site in sites:
                parent_path, _, attribute = site.path.rpartition(".")
                parent = self.base.get_submodule(parent_path)
                setattr(parent, attribute, getattr(parent, attribute).base_layer)
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self.sites.clear()
        return self.base

    @property
    def merged(self) -> bool:
        return bool(self._merged_cores)

    def set_route(self, route: str, groups: Iterable[str] | None = None) -> None:
        """How the update of ``groups`` (default: all) reaches their Linear layers: ``"auto"`` (the default: the
        cheapest by :func:`.routes.choose_route` for each forward pass's token count), ``"fft"``, ``"bcirc"`` or
        ``"factored"``. The output is the same on every route, to rounding.

        Raises:
            ValueError: for an unknown route or a group this model does not adapt.
        """
        if route not in ROUTES + (AUTO,):
            raise ValueError(f"unknown route {route!r}; expected one of {ROUTES + (AUTO,)}.")
        names = list(self.groups) if groups is None else list(groups)
        unknown = [name for name in names if name not in self.groups]
        if unknown:
            raise ValueError(f"this model adapts no group(s) {unknown}; it adapts {list(self.groups)}.")
        for name in names:
            self._routes[name] = route

    def route(self, group: str, tokens: int) -> str:
        """The route ``group`` takes for inputs of ``tokens`` rows in the current grad mode."""
        route = self._routes[group]
        if route != AUTO:
            return route
        module = self.groups[group]
        backward = torch.is_grad_enabled() and module.u.requires_grad
        counts = [site.stop - site.start for site in self.sites[group]]
        return choose_route(module.shape, module.rows.numel(), counts, tokens, backward=backward)

    def _site_forward(self, group: str, site: LinearSite, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return layer(x)
        route = self._chosen.get(group)
        if route is None:
            route = self._chosen[group] = self.route(group, x[..., 0].numel())
        # Per group and pass: ΔW slices first (dense routes) or the mixing matrices of U - U0 (factored).
        cached = self._deltas.get(group)
        module = self.groups[group]
        if route == "factored":
            if cached is None:
                cached = self._deltas[group] = module.mixing()
            return module.update(x, site.start, site.stop, cached, base=layer(x))
        if cached is None:
            cached = self._deltas[group] = module.delta_slices(route)
        delta = cached[site.start : site.stop].reshape(-1, cached.shape[-1])
        return F.linear(x, layer.weight + delta, layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``B x in_channels x D x H x W`` -> logits ``B x out_channels x D x H x W``."""
        return self.base(x)

    def _base_linear(self, site: LinearSite) -> nn.Linear:
        return self.base.get_submodule(site.path).base_layer

    @torch.no_grad()
    def merge(self) -> None:
        """Add ``ΔW`` into the base weights once, so that inference costs what the base model costs.

        Raises:
            ValueError: when ``ΔW`` of a group is not finite (the base weights are left untouched).
        """
        if self.merged:
            return
        deltas = {name: group.delta_weight() for name, group in self.groups.items()}
        for name, delta in deltas.items():
            if not torch.isfinite(delta).all():
                raise ValueError(f"cannot merge: the update of group {name!r} holds non-finite values.")
        for name, delta in deltas.items():
            slices = delta.unbind(-1)
            for site in self.sites[name]:
                weight = self._base_linear(site).weight
                weight += site.take(slices).to(weight.dtype)
            self._merged_cores[name] = self.groups[name].u.detach().clone()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract exactly the update that :meth:`merge` added (from the U it used), restoring the base weights."""
        for name, core in self._merged_cores.items():
            slices = self.groups[name].delta_weight(core).unbind(-1)
            for site in self.sites[name]:
                weight = self._base_linear(site).weight
                weight -= site.take(slices).to(weight.dtype)
        self._merged_cores.clear()

    def mark_trainable(self, train_head: bool = False) -> ParameterCounts:
        """Freeze everything but U, the decoder blocks and, when asked, the output head.

        Args:
            train_head: also train UNETR's output head (needed when the label set differs from the base's).

        Returns:
            the parameter counts of what now trains.

        Raises:
            ValueError: when the base has no ``decoder5 .. decoder2`` or no ``out`` head.
        """
        for part in DECODER_BLOCKS + (HEAD,):
            if not isinstance(getattr(self.base, part, None), nn.Module):
                raise ValueError(f"{type(self.base).__name__} has no '{part}' block; expected a MONAI UNETR.")
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        trainable_parts = DECODER_BLOCKS + ((HEAD,) if train_head else ())
        for part in trainable_parts:
            getattr(self.base, part).requires_grad_(True)
        for group in self.groups.values():
            group.u.requires_grad_(True)

        def count(modules) -> int:
            return sum(p.numel() for module in modules for p in module.parameters())

        return ParameterCounts(
            u=count(self.groups.values()),
            decoder=count(getattr(self.base, part) for part in DECODER_BLOCKS),
            head=count([getattr(self.base, HEAD)]) if train_head else 0,
            total=sum(p.numel() for p in self.parameters()),
        )


def _group_from_state(
    name: str, weight: torch.Tensor, group_state: Mapping[str, Mapping[str, torch.Tensor]], rank: int
) -> TCURGroup:
    state = group_state.get(name)
    if state is None:
        raise ValueError(f"the saved adapter has no state for group {name!r}; it holds {sorted(group_state)}.")
    missing = [key for key in ("rows", "cols", "u_init", "u") if key not in state]
    if missing:
        raise ValueError(f"the saved state of group {name!r} lacks {missing}.")
    n3 = weight.shape[-1]
    for key, shape in (("rows", (rank,)), ("cols", (rank,)), ("u_init", (rank, rank, n3)), ("u", (rank, rank, n3))):
        if tuple(state[key].shape) != shape:
            raise ValueError(
                f"saved {key} of group {name!r} has shape {tuple(state[key].shape)}, expected {shape} for rank {rank} "
                f"on a group tensor of shape {tuple(weight.shape)}."
            )
    group = TCURGroup.from_indices(weight, state["rows"], state["cols"], state["u_init"])
    with torch.no_grad():
        group.u.copy_(state["u"])
    return group
