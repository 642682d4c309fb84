"""The quality benchmark's pieces: the time-budget loop keeps the best validated state and follows the budget,
post-processing rules do what their names say, per-label scores on a cropped box equal those on the whole volume."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from synthetic import make_tiny_base

BENCHMARKS = Path(__file__).resolve().parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import bench_quality as bench  # noqa: E402
import budget_fit  # noqa: E402

from TCURLoRALib.adapter import attach_head  # noqa: E402
from TCURLoRALib.basemodel import load_base  # noqa: E402
from TCURLoRALib.cards import Label  # noqa: E402
from TCURLoRALib.cases import PreparedCase  # noqa: E402
from TCURLoRALib.metrics import label_metrics  # noqa: E402
from TCURLoRALib.train import adapter_optimizer  # noqa: E402

LABELS = [Label(0, "background", (0, 0, 0)), Label(1, "left x", (200, 0, 0)), Label(2, "right x", (0, 200, 0))]


def test_cosine_fraction_runs_from_one_to_the_final_fraction():
    assert budget_fit.cosine_fraction(0.0) == pytest.approx(1.0)
    assert budget_fit.cosine_fraction(0.5) == pytest.approx(0.525)
    assert budget_fit.cosine_fraction(1.0) == pytest.approx(budget_fit.FINAL_LR_FRACTION)
    assert budget_fit.cosine_fraction(3.0) == budget_fit.cosine_fraction(1.0)


class _Ticks:
    """A clock that advances one unit on every reading."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def _setup(tmp_path):
    unetr = load_base(make_tiny_base(tmp_path / "base.safetensors")).model
    attach_head(unetr, LABELS)
    unetr.requires_grad_(False)
    trainable = list(unetr.out.parameters()) + list(unetr.decoder2.parameters())
    for parameter in trainable:
        parameter.requires_grad_(True)
    target = np.zeros((32, 32, 32), np.int64)
    target[8:14, 10:20, 6:14], target[8:14, 10:20, 18:26] = 1, 2
    cases = [PreparedCase("case", (target * 0.5).astype(np.float32), target)]
    return unetr, trainable, cases


def test_budget_fit_keeps_the_best_validated_state_and_restores_the_rates(tmp_path, monkeypatch, one_torch_thread):
    unetr, trainable, cases = _setup(tmp_path)
    start = [p.detach().clone() for p in trainable]
    scores = iter([0.5, 0.9, 0.1, 0.2, 0.3, 0.4, 0.0, 0.0])  # the best state: after the first validated step
    snapshots = {}

    def fake_validate(model, data, labels, patch, device):
        snapshots[len(snapshots)] = [p.detach().clone() for p in trainable]
        value = next(scores)
        return {"dice": {"left x": value, "right x": value}, "mean": value}

    monkeypatch.setattr(budget_fit, "validate", fake_validate)
    monkeypatch.setitem(budget_fit.CLOCKS, "fake", _Ticks())
    optimizer = adapter_optimizer([], trainable, 1e-2, 1e-3)
    result = budget_fit.budget_fit(unetr, optimizer, cases, cases, LABELS, (32, 32, 32), seconds=1e6, batch_size=1,
                                   seed=0, device=torch.device("cpu"), clock="fake", validate_fraction=1e-9,
                                   max_steps=3)
    assert result.steps == 3
    assert [entry["step"] for entry in result.history] == [0, 1, 2, 3]
    assert result.best_step == 1 and result.best["mean"] == 0.9
    for now, kept, first in zip(trainable, snapshots[1], start):
        assert torch.equal(now.detach(), kept)
    assert any(not torch.equal(kept, first) for kept, first in zip(snapshots[1], start))
    assert [group["lr"] for group in optimizer.param_groups] == [1e-2]


def test_budget_fit_stops_when_the_clock_runs_out_and_decays_the_rate(tmp_path, monkeypatch, one_torch_thread):
    unetr, trainable, cases = _setup(tmp_path)
    ticks = _Ticks()
    monkeypatch.setitem(budget_fit.CLOCKS, "fake", ticks)
    optimizer = adapter_optimizer([], trainable, 1e-2, 1e-3)
    rates = []
    original_step = optimizer.step

    def recording_step(*args, **kwargs):
        rates.append(optimizer.param_groups[0]["lr"])
        return original_step(*args, **kwargs)

    monkeypatch.setattr(optimizer, "step", recording_step)
    result = budget_fit.budget_fit(unetr, optimizer, cases, [], LABELS, (32, 32, 32), seconds=12, batch_size=1,
                                   seed=0, device=torch.device("cpu"), clock="fake")
    # Readings: 1 at the start; each step reads the clock twice (loop test, rate): steps while reading < 1 + 12.
    assert result.steps == 6
    assert rates == pytest.approx([1e-2 * budget_fit.cosine_fraction((3 + 2 * k - 1) / 12) for k in range(6)])
    assert all(later < earlier for earlier, later in zip(rates, rates[1:]))


def test_postprocessing_rules_remove_what_their_names_say():
    image = np.zeros((30, 30, 30), np.float32)
    image[5:25, 5:25, 5:25] = 1.0
    train = np.zeros(image.shape, np.int64)
    train[10:14, 10:14, 8:12] = 1
    other = np.zeros(image.shape, np.int64)
    other[10:14, 10:14, 14:18] = 1     # a second training case: the region spans both
    regions = bench.learn_all_regions([PreparedCase("t", image, train), PreparedCase("u", image, other)], 3)
    predicted = train.copy()
    predicted[19:24, 19:24, 19:24] = 1   # a stray blob larger than the structure, outside its region
    predicted[12, 12, 16] = 1            # a lone voxel inside the region, not touching
    out = {rule: bench.postprocessed(predicted, image, regions, rule, 3) for rule in bench.POSTPROCESS}
    assert int((out["none"] == 1).sum()) == 64 + 125 + 1
    assert int((out["lcc"] == 1).sum()) == 125 and out["lcc"][21, 21, 21] == 1   # the larger piece wins alone
    assert int((out["box"] == 1).sum()) == 64 + 1
    assert int((out["box+lcc"] == 1).sum()) == 64 and out["box+lcc"][11, 11, 9] == 1


def test_label_scores_on_the_cropped_box_equal_the_whole_volume():
    rng = np.random.default_rng(1)
    reference = np.zeros((40, 44, 36), np.uint16)
    reference[10:20, 12:22, 8:16] = 1
    reference[25:30, 5:9, 20:30] = 2
    prediction = reference.copy()
    prediction[rng.random(reference.shape) < 0.002] = 1   # scattered false positives
    prediction[26:29, 5:9, 20:30] = 0
    spacing = (1.0, 1.5, 2.0)
    scores = bench.label_scores(prediction, reference, spacing, LABELS)
    whole = label_metrics(prediction, reference, spacing, LABELS)
    for item in whole:
        assert scores[item.name]["dice"] == pytest.approx(item.dice, abs=1e-4)
        assert scores[item.name]["hd95"] == pytest.approx(item.hd95_mm, abs=0.01)
        assert scores[item.name]["predicted"] == item.prediction_voxels
    empty = bench.label_scores(np.zeros_like(reference), np.zeros_like(reference), spacing, LABELS)
    assert empty["left x"]["dice"] == 1.0 and empty["left x"]["hd95"] is None


def test_test_time_mirroring_maps_the_mirrored_prediction_back_with_the_sides_swapped():
    """A 'network' that calls every bright voxel 'left x': on the mirrored image it finds the structure mirrored;
    mirrored back and swapped, that is the same voxels called 'right x'."""
    def network(batch: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(batch), 10 * batch, torch.zeros_like(batch)], dim=1)

    image = np.zeros((32, 32, 32), np.float32)
    image[4:9, 10:14, 3:7] = 1.0   # asymmetric along every axis
    direct = bench.probabilities(network, image, (32, 32, 32), torch.device("cpu"))
    mirrored = bench.mirrored_probabilities(network, image, (32, 32, 32), torch.device("cpu"), "RAS", [(1, 2)])
    bright = image > 0
    assert direct.shape == mirrored.shape == (3, 32, 32, 32)
    assert np.all(direct.argmax(0)[bright] == 1) and np.all(direct.argmax(0)[~bright] != 1)
    np.testing.assert_allclose(mirrored[2], direct[1], atol=1e-6)
    np.testing.assert_allclose(mirrored[1], direct[2], atol=1e-6)
