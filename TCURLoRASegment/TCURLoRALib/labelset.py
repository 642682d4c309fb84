"""The labels of a new adapter, from what the user gave: a full label list, label names, or new names in a mapping.

:func:`adapter_labels` decides, in this order:

1. a full list of labels (``{value, name, color}``, background first): used as given;
2. label names (``["left hippocampus", "right hippocampus"]``; on the command line ``--labels "left hippocampus,right
   hippocampus"``): background at 0, then the names with values 1, 2, ... in the order given;
3. neither, and a label mapping (``--label-map``) whose targets name labels that the base (or the parent adapter)
   does not have: the mapping's targets in the order given become the labels, as for names;
4. otherwise the base's (or the parent's) labels.

With labels made from a mapping, only the mapping (and segment names) assign case structures to them: their values
are their order, which means nothing in the cases. A name that is a label of the base (or parent) keeps that
label's colour; a new label gets the colour that Slicer
gives a new segment at its position (:data:`GENERIC_ANATOMY_COLORS`, entries 1-12 of Slicer's GenericAnatomyColors
table, repeating). A numeric target (``"7"``) that is no label's value cannot name a new label and is refused.
All of this needs no torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .cards import Label

__all__ = ["GENERIC_ANATOMY_COLORS", "LabelChoice", "adapter_labels", "describe_labels", "new_label_color"]

GENERIC_ANATOMY_COLORS = (
    ("tissue", (128, 174, 128)), ("bone", (241, 214, 145)), ("skin", (177, 122, 101)),
    ("connective_tissue", (111, 184, 210)), ("blood", (216, 101, 79)), ("organ", (221, 130, 101)),
    ("mass", (144, 238, 144)), ("muscle", (192, 104, 88)), ("foreign_object", (220, 245, 20)),
    ("waste", (78, 63, 0)), ("teeth", (255, 250, 220)), ("fat", (230, 220, 70)),
)
"""Entries 1-12 of 3D Slicer's GenericAnatomyColors table (Base/Logic/Resources/ColorFiles), the colours Slicer's
segment editor gives the 1st, 2nd, ... new segment."""
BACKGROUND = Label(0, "background", (0, 0, 0))


@dataclass(frozen=True)
class LabelChoice:
    """The adapter's labels and where they came from.

    Args:
        labels: background first.
        source: a phrase for the user, e.g. "new, from the names in --label-map".
        by_value: whether an unnamed case structure that the mapping misses may still go to the label of its value;
            not for labels made from a mapping's names, whose values (their order) mean nothing in the cases.
    """

    labels: list
    source: str
    by_value: bool = True


def new_label_color(position: int) -> tuple:
    """The colour of the label at ``position`` (1 = the first after background), as Slicer colours segments."""
    return GENERIC_ANATOMY_COLORS[(int(position) - 1) % len(GENERIC_ANATOMY_COLORS)][1]


def adapter_labels(given: Sequence[Any] | None, mapping: Mapping[str, Any] | None,
                   default: Sequence[Label], default_source: str = "the base's") -> LabelChoice:
    """The adapter's labels by the rules of the module docstring.

    Args:
        given: None, a full list (:class:`Label` objects or their JSON dicts), or label names.
        mapping: the label mapping ``{case structure: target label}`` (targets by name or value); may be None.
        default: the base's labels, or the parent adapter's.
        default_source: how to call ``default`` in :attr:`LabelChoice.source`.

    Raises:
        ValueError: a mix of names and labels, a repeated name, background among the names, or a numeric mapping
            target that is no label's value.
    """
    default = list(default)
    if given is not None:
        items = list(given)
        if items and all(isinstance(item, str) for item in items):
            return LabelChoice(_from_names(items, default, "--labels"), "from the names in --labels")
        if any(isinstance(item, str) for item in items):
            raise ValueError(f"--labels must be label names or a list of {{value, name, color}} labels, not a mix: "
                             f"{items!r:.200}")
        return LabelChoice([item if isinstance(item, Label) else Label.from_json(item) for item in items],
                           "as given with --labels")
    targets = _distinct(list((mapping or {}).values()))
    unknown = [target for target in targets if _find(default, target) is None]
    if not unknown:
        return LabelChoice(default, f"{default_source} labels")
    numeric = [target for target in unknown if str(target).strip().lstrip("-").isdigit()]
    if numeric:
        raise ValueError(f"--label-map targets {numeric} are no label value of {default_source} labels "
                         f"({_listing(default)}): name a new label (e.g. \"left hippocampus\") instead of a value, "
                         f"or give the labels with --labels")
    names = [str(target).strip() for target in targets if _find(default, target) != 0]
    return LabelChoice(_from_names(names, default, "--label-map"), "new, from the names in --label-map",
                       by_value=False)


def describe_labels(choice: LabelChoice) -> str:
    """One line: ``adapter labels (new, from ...): 1 left hippocampus, 2 right hippocampus``."""
    return f"adapter labels ({choice.source}): " + ", ".join(f"{label.value} {label.name}"
                                                             for label in choice.labels[1:])


def _from_names(names: Sequence[str], default: Sequence[Label], option: str) -> list:
    folded = [name.casefold() for name in names]
    repeated = sorted({name for name in names if folded.count(name.casefold()) > 1})
    if repeated:
        raise ValueError(f"{option}: label names {repeated} are given more than once")
    if BACKGROUND.name in folded:
        raise ValueError(f"{option}: background is label 0 of every adapter; leave it out of the names")
    labels = [BACKGROUND]
    for position, name in enumerate(names, 1):
        known = _find(default, name)
        color = default[known].color if known is not None else new_label_color(position)
        labels.append(Label(position, default[known].name if known is not None else name, color))
    return labels


def _find(labels: Sequence[Label], target: Any) -> int | None:
    """Index of the label named (case-insensitively) or valued ``target``, else None."""
    text = str(target).strip()
    for index, label in enumerate(labels):
        if label.name.casefold() == text.casefold() or str(label.value) == text:
            return index
    return None


def _distinct(values: Sequence[Any]) -> list:
    seen, result = set(), []
    for value in values:
        key = str(value).strip().casefold()
        if key not in seen:
            seen.add(key)
            result.append(value)
    return result


def _listing(labels: Sequence[Label]) -> str:
    return ", ".join(f"{label.value} {label.name!r}" for label in labels)
