"""Which of the panels' buttons are enabled, what they say, and why a disabled one is disabled (its tooltip)."""
from __future__ import annotations

from dataclasses import dataclass

from .adapters import AdapterChoice

__all__ = ["ButtonState", "TrainView", "segment_apply", "train_view"]


@dataclass(frozen=True)
class ButtonState:
    """A push button: enabled, its text, and its tooltip (for a disabled button: what to do first)."""

    enabled: bool
    text: str
    tooltip: str


def _running(cancelling: bool, what: str) -> ButtonState:
    if cancelling:
        return ButtonState(False, "Cancelling...", f"The {what} stops at its next step")
    return ButtonState(True, "Cancel", f"Stop the running {what}")


def segment_apply(*, running: bool, cancelling: bool, volume_usable: bool, adapter: AdapterChoice) -> ButtonState:
    """The Segment panel's Apply button, which turns into Cancel while a segmentation runs.

    Args:
        running, cancelling: a segmentation runs; its cancel was asked for.
        volume_usable: an input volume with image data is selected.
        adapter: the adapter entry shown (see :class:`~.adapters.AdapterList`).
    """
    if running:
        return _running(cancelling, "segmentation")
    if not volume_usable:
        return ButtonState(False, "Apply", "Select an input volume that holds image data")
    if adapter.missing:
        return ButtonState(False, "Apply", f"The adapter {adapter.name!r} is not listed: choose another entry")
    return ButtonState(True, "Apply", "Segment the input volume in a background process")


@dataclass(frozen=True)
class TrainView:
    """The Train panel's enabled states: the Start/Cancel button, Add case, the parent adapter and the rank."""

    start: ButtonState
    add_case: bool
    parent: bool
    rank: bool


def train_view(*, running: bool, cancelling: bool, cases: int, name: str, improve: bool, parent: AdapterChoice,
               pair_chosen: bool, mapped: bool) -> TrainView:
    """The Train panel's state.

    Args:
        running, cancelling: a training runs; its cancel was asked for.
        cases: number of training cases listed.
        name: the new adapter's name as typed.
        improve: *Improve adapter* is ticked; parent: the parent entry shown.
        pair_chosen: a volume and a segmentation are chosen (Add case can add them).
        mapped: at least one segment has an adapter label in the table.
    """
    if running:
        start = _running(cancelling, "training")
    else:
        reasons = [(not cases, "Add at least one training case"),
                   (not name.strip(), "Give the new adapter a name"),
                   (improve and parent.name is None, "Choose the adapter to improve"),
                   (improve and parent.missing, f"The adapter {parent.name!r} is not listed: choose another one"),
                   (not mapped, "Give at least one segment an adapter label in the table")]
        missing = [text for failed, text in reasons if failed]
        start = ButtonState(not missing, "Start training",
                            missing[0] if missing else "Train the new adapter in a background process")
    # An improved adapter keeps its parent's rank.
    return TrainView(start, add_case=pair_chosen and not running, parent=improve and not running,
                     rank=not improve and not running)
