"""What a finished training tells its user: the validation Dice of the written state as a small table.

Read from the card's ``metrics`` and ``training`` record alone (no torch), so that the CLI and the panels print the
same thing. Without validation it says so, and why, instead of printing nothing.
"""
from __future__ import annotations

from typing import Any, Mapping

__all__ = ["validation_table"]


def validation_table(metrics: Mapping[str, Any] | None, training: Mapping[str, Any] | None) -> str:
    """Per-label validation Dice of the written state, the step it came from, and the starting state's Dice.

    Args:
        metrics: a card's ``metrics`` (``{"validation": {"dice", "mean_dice", "step", "cases"[, "initial"]}}``).
        training: a card's ``training`` record (``steps``; ``validation_split`` when the training recorded it).

    Returns:
        A few lines, e.g.::

            validation on 1 case (case2): the state of step 150, the best mean Dice, was written
              label    Dice    at start
              left     0.7812  0.0000
              mean     0.7812  0.0000
    """
    training = training or {}
    validation = (metrics or {}).get("validation")
    split = training.get("validation_split") or {}
    if not validation:
        why = split.get("rule") or f"the state after the last step ({training.get('steps', '?')}) was written"
        return f"no validation: {why}. Measure the result on cases it did not train on with the evaluate command"
    names = split.get("validation") or []
    count = validation.get("cases", len(names))
    which = f" ({', '.join(names)})" if names else ""
    step = validation.get("step")
    chosen = "the starting state" if step == 0 else f"the state of step {step}"
    initial = validation.get("initial")
    header = ["label", "Dice"] + (["at start"] if initial else [])
    rows = [[name, _number(value)] + ([_number(initial["dice"].get(name))] if initial else [])
            for name, value in validation["dice"].items()]
    rows.append(["mean", _number(validation.get("mean_dice"))] + ([_number(initial.get("mean_dice"))]
                                                                   if initial else []))
    widths = [max(len(row[column]) for row in [header] + rows) for column in range(len(header))]
    lines = [f"validation on {count} case{'s' if count != 1 else ''}{which}: {chosen}, the best mean Dice, "
             f"was written"]
    lines += ["  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
              for row in [header] + rows]
    return "\n".join(lines)


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"
