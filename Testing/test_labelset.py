"""A new adapter's labels from names, from a label mapping's new names, or as given; the CLI's --labels spellings."""
from __future__ import annotations

import pytest

from synthetic import BASE_LABELS
from TCURLoRALib.cards import Label
from TCURLoRALib.labelset import GENERIC_ANATOMY_COLORS, adapter_labels, new_label_color

TISSUE, BONE, SKIN = (128, 174, 128), (241, 214, 145), (177, 122, 101)  # Slicer's first new-segment colours


def test_names_become_labels_in_order_with_slicers_new_segment_colours() -> None:
    choice = adapter_labels(["left hippocampus", "right hippocampus", "White Matter"], None, BASE_LABELS)
    assert choice.labels == [Label(0, "background", (0, 0, 0)), Label(1, "left hippocampus", TISSUE),
                             Label(2, "right hippocampus", BONE),
                             Label(3, "white matter", BASE_LABELS[2].color)]  # a base label keeps its colour
    assert choice.by_value and "--labels" in choice.source
    assert new_label_color(len(GENERIC_ANATOMY_COLORS) + 3) == SKIN  # the table repeats, as in Slicer


def test_new_names_in_a_label_mapping_become_labels_and_only_the_mapping_assigns_them() -> None:
    mapping = {"1": "Left hippocampus", "Segment_2": "right hippocampus", "7": "LEFT HIPPOCAMPUS", "9": "background"}
    choice = adapter_labels(None, mapping, BASE_LABELS)
    assert [(label.value, label.name, label.color) for label in choice.labels[1:]] == [
        (1, "Left hippocampus", TISSUE), (2, "right hippocampus", BONE)]
    assert not choice.by_value  # their values are their order, which means nothing in the cases
    known = adapter_labels(None, {"5": "white matter", "6": 1}, BASE_LABELS)
    assert known.labels == BASE_LABELS and known.by_value and known.source == "the base's labels"
    assert adapter_labels(None, None, BASE_LABELS).labels == BASE_LABELS


@pytest.mark.parametrize("given, mapping, message", [
    (None, {"1": "7"}, r"--label-map targets \['7'\] are no label value of the base's labels .* or give the labels "
                       r"with --labels"),
    (["a", "A"], None, r"--labels: label names \['A', 'a'\] are given more than once"),
    (["background", "a"], None, r"--labels: background is label 0 of every adapter; leave it out"),
    (["a", {"value": 0, "name": "background", "color": [0, 0, 0]}], None, r"not a mix"),
])
def test_label_choices_that_cannot_work_are_refused(given, mapping, message) -> None:
    with pytest.raises(ValueError, match=message):
        adapter_labels(given, mapping, BASE_LABELS)
