"""Training settings and device names: defaults, checks that name the flag, a parent's settings, the CLI spelling."""
from __future__ import annotations

import pytest
import torch

from TCURLoRALib.cli import PRETRAINING_FIELDS, TRAINING_FIELDS, build_parser
from TCURLoRALib.devices import check_device, resolve_device
from TCURLoRALib.settings import TrainSettings


@pytest.mark.parametrize("changes, message", [
    ({"steps": -1}, r"^--steps must be an integer >= 0, got -1$"),
    ({"steps": 2.5}, r"^--steps must be an integer >= 0, got 2\.5$"),
    ({"batch_size": 0}, r"^--batch-size must be an integer >= 1, got 0$"),
    ({"validate_every": True}, r"^--validate-every must be an integer >= 1, got True$"),
    ({"rank": 0}, r"^--rank must be an integer >= 1, got 0$"),
    ({"threads": 0}, r"^--threads must be an integer >= 1, got 0$"),
    ({"lr": 0.0}, r"^--lr must be a positive number, got 0\.0$"),
    ({"lr_u": float("nan")}, r"^--lr-u must be a positive number, got nan$"),
    ({"init": "random"}, r"^--init must be one of pinv, zero, got 'random'$"),
    ({"groups": ["attention", "attention"]}, r"^--groups must name each of .* got \['attention', 'attention'\]$"),
    ({"groups": "attention"}, r"^--groups must be a list of group names, got 'attention'$"),
    ({"device": "gpu"}, r"^--device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'$"),
    ({"unmapped": "drop"}, r"^--unmapped must be one of error, background, ignore, got 'drop'$"),
    ({"validation": " "}, r"^--validation must be 'auto', 'none' or validation cases, got ''$"),
])
def test_bad_settings_name_the_flag_and_quote_the_value(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainSettings(**changes)


def test_defaults_and_pretraining_defaults() -> None:
    plain, pretraining = TrainSettings(), TrainSettings.for_pretraining(seed=3)
    assert (plain.steps, plain.lr, plain.lr_u, plain.batch_size, plain.validate_every, plain.validation) == \
        (200, 1e-2, 1e-3, 2, 50, "auto")
    assert (pretraining.steps, pretraining.lr, pretraining.validate_every, pretraining.validation, pretraining.seed) \
        == (1000, 1e-3, 200, "none", 3)
    assert plain.resolved() == (16, "zero", ("attention", "mlp_up", "mlp_down"))
    assert TrainSettings(validation=" None ", device="CUDA:1").validation == "none"
    assert TrainSettings(device="CUDA:1").device == "cuda:1"
    with pytest.raises(ValueError, match=r"^--rank, --lr-u: not a pretraining setting"):
        TrainSettings.for_pretraining(rank=8, lr_u=1e-2)
    with pytest.raises(TypeError, match=r"unknown training setting\(s\) \['step'\]"):
        TrainSettings.of(step=3)
    assert TrainSettings.of(TrainSettings(steps=7), lr=0.5) == TrainSettings(steps=7, lr=0.5)


def test_a_parents_settings_are_kept_and_a_clash_is_refused() -> None:
    parent = {"name": "v1", "rank": 4, "init": "pinv", "groups": ["attention"]}
    assert TrainSettings().resolved(parent) == (4, "pinv", ("attention",))
    assert TrainSettings(rank=4).resolved(parent) == (4, "pinv", ("attention",))
    with pytest.raises(ValueError, match=r"continuing adapter 'v1' keeps its settings; got --rank 8 \(parent: 4\), "
                                         r"--groups \('mlp_up',\) \(parent: \('attention',\)\)"):
        TrainSettings(rank=8, groups=["mlp_up"]).resolved(parent)


@pytest.mark.parametrize("settings", [
    TrainSettings(rank=4, init="pinv", groups=("mlp_up", "attention"), steps=3, lr=0.002, lr_u=5e-4, batch_size=1,
                  validate_every=7, validation="cases.json", seed=9, device="cuda:1", threads=2,
                  unmapped="ignore"),
    TrainSettings(),
])
def test_settings_round_trip_through_the_command_line(settings: TrainSettings) -> None:
    """to_arguments (what the panels may send) parses back to the same settings, through the CLI's own options."""
    args = build_parser().parse_args(["train", "--cases", "c.json", *settings.to_arguments()])
    given = {name: getattr(args, name) for name in TRAINING_FIELDS if getattr(args, name) is not None}
    assert TrainSettings.of(**given) == settings
    assert set(PRETRAINING_FIELDS) < set(TRAINING_FIELDS)


def test_device_names_are_checked_without_torch_and_resolved_with_it() -> None:
    assert [check_device(name) for name in ("auto", " CPU ", "cuda", "cuda:12")] == ["auto", "cpu", "cuda", "cuda:12"]
    for wrong in ("gpu", "cuda:", "cuda:-1", "cpu:0", 3, None):
        with pytest.raises(ValueError, match=r"--device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"):
            check_device(wrong)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device 'cuda:1' was asked for, but CUDA is not available here"):
            resolve_device("cuda:1")
    else:
        with pytest.raises(ValueError, match=r"only \d+ CUDA device\(s\) exist"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
