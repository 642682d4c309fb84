"""Adapter combo boxes: their entries and tooltips, and the rule that the entry shown is the adapter that runs.

Both panels fill a combo box from the adapter store at run time, so it cannot be bound to the parameter node by
Slicer's connectors; :class:`AdapterList` keeps the two equal instead (the parameter node saves the store name).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from .tracking import format_duration

__all__ = ["BASE_ONLY_TEXT", "CHOOSE_PARENT_TEXT", "AdapterChoice", "AdapterList", "adapter_choices",
           "describe_adapter"]

BASE_ONLY_TEXT = "Base model only"
CHOOSE_PARENT_TEXT = "Choose the adapter to improve"
_MAX_TOOLTIP_DICE = 12


@dataclass(frozen=True)
class AdapterChoice:
    """One entry of an adapter combo box.

    Args:
        name: the store name, or None for the entry that names no adapter ("Base model only", "Choose ...").
        text: what the combo box shows.
        tooltip: the card, described (see :func:`describe_adapter`).
        missing: the name is not in the store (deleted, renamed, or the store cannot be listed yet).
    """

    name: str | None
    text: str
    tooltip: str
    missing: bool = False

    @property
    def value(self) -> str:
        """The parameter-node value of this entry: the store name, ``""`` for none."""
        return self.name or ""


def _card_json(card: Any) -> Mapping[str, Any]:
    return card.to_json() if hasattr(card, "to_json") else card


def _format_number(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def describe_adapter(card: Any, source: str = "user") -> str:
    """A plain-text tooltip for an adapter: labels, base, rank, training record and validation Dice.

    Args:
        card: an :class:`~TCURLoRALib.cards.AdapterCard` or its JSON dict.
        source: ``"shipped"`` or ``"user"`` (from the store entry).

    Returns:
        Several lines, e.g. ``"hippocampus (user adapter)\\nLabels: left, right\\nBase: tiny\\n..."``; fields the
        card lacks are left out.
    """
    data = _card_json(card)
    lines = [f"{data.get('name', '?')} ({source} adapter)"]
    labels = [label["name"] if isinstance(label, Mapping) else label.name for label in data.get("labels", [])[1:]]
    lines.append("Labels: " + (", ".join(labels) if labels else "none"))
    lines.append(f"Base: {data.get('base_name', '?')}")
    lines.append(f"Rank: {data.get('rank', '?')}, groups: {', '.join(data.get('groups') or []) or 'none'}")
    if data.get("parent"):
        lines.append(f"Improved from: {data['parent']}")
    training = data.get("training") or {}
    if training:
        seconds = training.get("seconds")
        took = f", {format_duration(seconds)}" if isinstance(seconds, (int, float)) else ""
        lines.append(f"Trained on {training.get('cases', '?')} cases, {training.get('steps', '?')} steps"
                     f" ({training.get('device', '?')}{took})")
    validation = (data.get("metrics") or {}).get("validation") or {}
    if validation.get("mean_dice") is not None:
        lines.append(f"Validation mean Dice: {_format_number(validation['mean_dice'])}"
                     f" on {validation.get('cases', '?')} cases")
        shown = list((validation.get("dice") or {}).items())[:_MAX_TOOLTIP_DICE]
        if shown:
            lines.append("  " + ", ".join(f"{name} {_format_number(value)}" for name, value in shown))
    else:
        lines.append("Validation: none recorded")
    if data.get("created"):
        lines.append(f"Created: {data['created']}")
    return "\n".join(lines)


def adapter_choices(entries: Iterable[Any]) -> list[AdapterChoice]:
    """One entry per store entry, in the store's order; shipped adapters are marked in their text.

    Args:
        entries: :class:`~TCURLoRALib.store.AdapterEntry` objects (``name``, ``card``, ``source``), as listed.
    """
    return [AdapterChoice(entry.name, f"{entry.name} (shipped)" if entry.source == "shipped" else entry.name,
                          describe_adapter(entry.card, entry.source)) for entry in entries]


class AdapterList:
    """The entries of one adapter combo box, built so that the entry shown is always the parameter's value.

    The widget fills the combo box with :meth:`entries` for the parameter's value, selects :meth:`index` of it, and
    writes ``entries[i].value`` back when the user picks entry ``i``. A value the store does not list (an adapter
    deleted since, a scene saved on another computer, a store that cannot be listed before the dependencies are
    installed) gets an entry of its own, marked missing, instead of falling back to the first entry, which would
    show one adapter while another runs.

    Args:
        first: the entry that names no adapter ("Base model only" for Segment, "Choose the adapter to improve" for
            the Train panel's parent).
    """

    def __init__(self, first: AdapterChoice):
        if first.name is not None:
            raise ValueError(f"the first entry must name no adapter, got {first.name!r}")
        self.first = first
        self.choices: list[AdapterChoice] = []
        self.problem: str | None = None

    def update(self, choices: Sequence[AdapterChoice], problem: str | None = None,
               first: AdapterChoice | None = None) -> None:
        """The store's adapters (:func:`adapter_choices`), why they could not be listed (``choices`` empty then),
        and a new first entry (the base entry's tooltip names the base once it can be read)."""
        if first is not None and first.name is not None:
            raise ValueError(f"the first entry must name no adapter, got {first.name!r}")
        self.choices = list(choices)
        self.problem = problem
        self.first = first or self.first

    def find(self, value: str) -> AdapterChoice | None:
        """The listed entry of a parameter value (a store name, case-insensitively as the store finds it)."""
        if not value:
            return self.first
        exact = [choice for choice in self.choices if choice.name == value]
        folded = [choice for choice in self.choices if choice.name.casefold() == value.casefold()]
        return (exact or folded or [None])[0]

    def entries(self, value: str) -> list[AdapterChoice]:
        """The combo box's entries for the parameter value ``value``: ``first``, the store's adapters, and ``value``
        itself marked missing when the store does not list it."""
        entries = [self.first, *self.choices]
        if self.find(value) is None:
            why = self.problem or "it was deleted or renamed, or this scene was saved on another computer"
            entries.append(AdapterChoice(value, f"{value} (not found)", f"No adapter named {value!r} is listed: "
                                         f"{why}. Choose another entry.", missing=True))
        return entries

    def index(self, value: str) -> int:
        """Index in :meth:`entries` of the entry that shows ``value``."""
        entries = self.entries(value)
        shown = self.find(value)
        return entries.index(shown) if shown is not None else len(entries) - 1

    def selected(self, value: str) -> AdapterChoice:
        """The entry shown for ``value``; ``.missing`` tells whether the store lacks it."""
        return self.entries(value)[self.index(value)]
