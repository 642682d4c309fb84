"""The end-of-training table, from a card's metrics and training record alone."""
from __future__ import annotations

from TCURLoRALib.report import validation_table


def test_table_of_the_written_state_and_the_start() -> None:
    metrics = {"validation": {"dice": {"left": 0.81234, "right": None}, "mean_dice": 0.5, "step": 150, "cases": 2,
                              "initial": {"dice": {"left": 0.0, "right": 0.1}, "mean_dice": 0.05}}}
    training = {"steps": 200, "validation_split": {"train": ["a"], "validation": ["b", "c"], "rule": "why"}}
    assert validation_table(metrics, training).splitlines() == [
        "validation on 2 cases (b, c): the state of step 150, the best mean Dice, was written",
        "  label  Dice    at start",
        "  left   0.8123  0.0000",
        "  right  -       0.1000",
        "  mean   0.5000  0.0500"]


def test_pretraining_and_older_cards_and_no_validation() -> None:
    metrics = {"validation": {"dice": {"grey matter": 0.7}, "mean_dice": 0.7, "step": 0, "cases": 1}}
    assert validation_table(metrics, {}).splitlines() == [
        "validation on 1 case: the starting state, the best mean Dice, was written",
        "  label        Dice",
        "  grey matter  0.7000",
        "  mean         0.7000"]
    assert validation_table({}, {"steps": 40}) == ("no validation: the state after the last step (40) was written. "
                                                   "Measure the result on cases it did not train on with the "
                                                   "evaluate command")
