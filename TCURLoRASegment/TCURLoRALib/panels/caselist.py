"""The Train panel's training cases (volume and segmentation node pairs) and its segment-to-label table.

The parameter node keeps the cases as two parallel node lists; these functions take and return plain lists of
pairs, and the widget writes the result back in one modification.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from .nodes import describe_segmentation

__all__ = ["CaseRow", "add_case", "case_pairs", "case_rows", "default_label_mapping", "mapping_rows",
           "remove_rows"]

Pair = tuple[Any, Any]


@dataclass(frozen=True)
class CaseRow:
    """One row of the cases table."""

    volume: str
    segmentation: str
    segments: str


def case_pairs(volumes: Iterable[Any], segmentations: Iterable[Any]) -> list[Pair]:
    """The cases of the parameter node's two lists, pairwise; a pair with a node deleted from the scene (None) is
    dropped."""
    return [(v, s) for v, s in zip(volumes, segmentations) if v is not None and s is not None]


def _same(pair: Pair, other: Pair) -> bool:
    return pair[0].GetID() == other[0].GetID() and pair[1].GetID() == other[1].GetID()


def add_case(pairs: Sequence[Pair], volume: Any, segmentation: Any) -> list[Pair] | None:
    """The cases with ``(volume, segmentation)`` appended, or None when that pair is listed already.

    Raises:
        ValueError: either node is None.
    """
    if volume is None or segmentation is None:
        raise ValueError("choose a volume and its segmentation before adding a case")
    if any(_same(pair, (volume, segmentation)) for pair in pairs):
        return None
    return [*pairs, (volume, segmentation)]


def remove_rows(pairs: Sequence[Pair], rows: Iterable[int]) -> list[Pair]:
    """The cases without the given table rows (rows out of range are ignored)."""
    dropped = set(rows)
    return [pair for row, pair in enumerate(pairs) if row not in dropped]


def case_rows(pairs: Sequence[Pair]) -> list[CaseRow]:
    """The cases table: volume name, segmentation name, and its segments."""
    return [CaseRow(v.GetName(), s.GetName(), describe_segmentation(s)) for v, s in pairs]


def default_label_mapping(segment_names: Sequence[str], label_names: Sequence[str]) -> dict[str, str]:
    """The initial segment -> adapter label table: each segment to the label of the same name.

    The name is matched case-insensitively and written as the label spells it; a segment without such a label
    keeps its own name (it becomes a new label of the adapter, see :func:`~.export.adapter_labels`).
    """
    by_folded = {name.casefold(): name for name in label_names}
    return {segment: by_folded.get(segment.casefold(), segment) for segment in segment_names}


def mapping_rows(segment_names: Sequence[str], label_names: Sequence[str],
                 edited: Mapping[str, str]) -> dict[str, str]:
    """The segment -> label table after the cases or the labels changed: one row per segment of the cases, the
    user's edits kept for segments still present, :func:`default_label_mapping` for the others."""
    mapping = default_label_mapping(segment_names, label_names)
    mapping.update({name: edited[name] for name in segment_names if name in edited})
    return mapping
