"""Issue #15's options as users meet them: ``train --minutes`` (a time budget that ends on a validated state and keeps
the best), ``train --mirror`` (mirrored cases with the left/right labels swapped; refused without pairs), the card's
``anatomy`` (one-piece labels, left/right pairs; round trip) and ``segment --postprocess`` / ``--tta``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from synthetic import make_tiny_base, write_case
from TCURLoRALib import loop, segmentation, train, volumes
from TCURLoRALib.adapter import attach_head, save_adapter
from TCURLoRALib.basemodel import load_base
from TCURLoRALib.cards import AdapterCard, CardError, Label
from TCURLoRALib.cases import PreparedCase
from TCURLoRALib.loop import adapter_optimizer, fit
from TCURLoRALib.mirror import left_right_axis
from TCURLoRALib.settings import TrainSettings
from TCURLoRALib.tcur import TCURLoRAConfig, TCURLoRAModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ENGINE_FOLDER = Path(__file__).resolve().parents[1] / "TCURLoRASegment"
PAIRED = [Label(0, "background", (0, 0, 0)), Label(1, "left x", (200, 0, 0)), Label(2, "right x", (0, 200, 0))]
SIDED_MAP = {"1": "left x", "2": "right x"}  # grey / white matter of the synthetic cases as a pair
SMALL_SPACING = (1.6, 1.6, 1.6)  # one sliding window of the tiny base: cheap validation


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("quality")
    return {"base": make_tiny_base(folder / "base.safetensors"),
            "cases": [write_case(folder, seed, SMALL_SPACING) for seed in range(3)]}


class Ticks:
    """A clock that advances one second on every reading."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def _head_only(base_path: Path):
    unetr = load_base(base_path).model
    attach_head(unetr, PAIRED)
    unetr.requires_grad_(False)
    trainable = list(unetr.out.parameters()) + list(unetr.decoder2.parameters())
    for parameter in trainable:
        parameter.requires_grad_(True)
    target = np.zeros((32, 32, 32), np.int64)
    target[8:14, 10:20, 6:14], target[8:14, 10:20, 18:26] = 1, 2
    return unetr, trainable, [PreparedCase("case", (target * 0.5).astype(np.float32), target)]


# ---------------------------------------------------------------------------------------------------- --minutes


def test_a_spent_budget_stops_after_the_first_validated_step_and_keeps_the_best_state(data, monkeypatch) -> None:
    unetr, trainable, cases = _head_only(data["base"])
    start = [p.detach().clone() for p in trainable]
    scores = iter([0.6, 0.3])  # the starting state validates better than step 1
    validated = []

    def fake_validate(model, cases, labels, patch_size):
        validated.append([p.detach().clone() for p in trainable])
        value = next(scores)
        return {"dice": {"left x": value, "right x": value}, "mean": value}

    monkeypatch.setattr(loop, "validate", fake_validate)
    events = []
    settings = TrainSettings(steps=50, minutes=1e-6, validate_every=10, batch_size=1)
    result = fit(unetr, adapter_optimizer([], trainable, 1e-2, 1e-3), cases, cases, labels=PAIRED,
                 patch_size=(32, 32, 32), settings=settings, validate_initial=True, clock=Ticks(),
                 progress=lambda kind, **fields: events.append((kind, fields)))
    assert result.steps == 1 and result.stopped_by == "budget"
    assert len(validated) == 2  # step 0 and step 1, which was not a validate_every step: the budget asked for it
    assert any(not torch.equal(after, before) for after, before in zip(validated[1], start))  # step 1 did train
    assert result.best_step == 0 and result.best["mean"] == 0.6
    for now, first in zip(trainable, start):
        assert torch.equal(now.detach(), first)  # the best state (the start) is what the model holds
    assert [f["step"] for kind, f in events if kind == "step"] == [1]
    assert any(kind == "log" and "time budget" in f["message"] for kind, f in events)


def test_a_budget_ends_the_run_once_spent_and_the_rate_decays_over_it(data) -> None:
    """A budget of 20 clock readings: the run ends long before its 1000 steps, and the learning rate follows the
    budget's cosine (the steps' fraction alone would keep it near the start, at most 1e-2 * 0.9999)."""
    unetr, trainable, cases = _head_only(data["base"])
    optimizer = adapter_optimizer([], trainable, 1e-2, 1e-3)
    ticks = Ticks()
    seen = []  # (clock, rate) at each optimiser step
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append((ticks.now, opt.param_groups[0]["lr"])))
    settings = TrainSettings(steps=1000, minutes=20 / 60, batch_size=1)
    result = fit(unetr, optimizer, cases, [], labels=PAIRED, patch_size=(32, 32, 32), settings=settings, clock=ticks)
    assert result.stopped_by == "budget" and result.best_step is None
    assert 5 <= result.steps == len(seen) < 20
    rates = [rate for _, rate in seen]
    assert rates[0] == pytest.approx(1e-2 * loop._cosine(1 / 20))  # set at construction, one reading in
    assert all(later < earlier for earlier, later in zip(rates, rates[1:]))
    # each later rate was set by the schedule at a reading between the previous step's and this step's clock
    for (before, _), (clock, rate) in zip(seen, seen[1:]):
        assert 1e-2 * loop._cosine((clock - 1) / 20) <= rate <= 1e-2 * loop._cosine((before - 1) / 20)
    assert rates[-1] < 1e-2 * loop._cosine(0.75)


def test_the_steps_end_a_run_whose_budget_is_not_spent(data) -> None:
    unetr, trainable, cases = _head_only(data["base"])
    settings = TrainSettings(steps=3, minutes=60.0, batch_size=1)
    result = fit(unetr, adapter_optimizer([], trainable, 1e-2, 1e-3), cases, [], labels=PAIRED,
                 patch_size=(32, 32, 32), settings=settings, clock=Ticks())
    assert result.steps == 3 and result.stopped_by == "steps"


def test_a_budget_is_refused_when_processes_share_the_steps(data) -> None:
    unetr, trainable, cases = _head_only(data["base"])
    several = SimpleNamespace(processes=2, main=True)
    with pytest.raises(ValueError, match="--minutes works in one process only"):
        fit(unetr, adapter_optimizer([], trainable, 1e-2, 1e-3), cases, [], labels=PAIRED, patch_size=(32, 32, 32),
            settings=TrainSettings(steps=3, minutes=1.0), parallel=several)


@pytest.mark.parametrize("minutes", [0, -1.0, float("nan"), "10", True])
def test_bad_budgets_name_the_flag(minutes) -> None:
    with pytest.raises(ValueError, match="--minutes must be a positive number"):
        TrainSettings(minutes=minutes)


def test_settings_spell_the_new_options_on_the_command_line() -> None:
    assert TrainSettings(minutes=2.5, mirror=True).to_arguments() == ["--minutes", "2.5", "--mirror"]
    assert TrainSettings(mirror=False).to_arguments() == []
    with pytest.raises(ValueError, match="--mirror"):
        TrainSettings.for_pretraining(mirror=True)


def test_the_card_records_the_steps_run_and_the_budget(data, tmp_path) -> None:
    card = train.train_adapter(data["base"], data["cases"], PAIRED, tmp_path / "a.safetensors",
                               label_map=SIDED_MAP, unmapped="background", steps=40, minutes=1e-6, batch_size=1,
                               validate_every=20)
    record = card.training
    assert record["steps"] == 1 and record["max_steps"] == 40 and record["minutes"] == 1e-6
    assert record["stopped_by"] == "budget" and record["mirror"] is False
    assert card.metrics["validation"]["step"] in (0, 1)


# ---------------------------------------------------------------------------------------------------- --mirror


def test_mirror_trains_on_mirrored_cases_with_the_pair_swapped(data, tmp_path, monkeypatch) -> None:
    seen = {}
    real_fit = train.fit

    def spying_fit(model, optimizer, train_data, validation_data, **options):
        seen["train"], seen["validation"] = list(train_data), list(validation_data)
        return real_fit(model, optimizer, train_data, validation_data, **options)

    monkeypatch.setattr(train, "fit", spying_fit)
    events = []
    card = train.train_adapter(data["base"], data["cases"], PAIRED, tmp_path / "m.safetensors", label_map=SIDED_MAP,
                               unmapped="background", steps=1, batch_size=1, mirror=True,
                               progress=lambda kind, **fields: events.append((kind, fields)))
    originals, mirrored = seen["train"][:2], seen["train"][2:]
    assert len(seen["validation"]) == 1 and [case.name for case in mirrored] == [
        f"{case.name}-mirrored" for case in originals]
    axis = left_right_axis("RAS")
    for original, flipped in zip(originals, mirrored):
        np.testing.assert_array_equal(flipped.image, np.flip(original.image, axis))
        expected = np.flip(original.target, axis).copy()
        left, right = expected == 1, expected == 2
        expected[left], expected[right] = 2, 1
        np.testing.assert_array_equal(flipped.target, expected)
        assert (original.target == 1).any() and (original.target == 2).any()
    assert card.training["mirror"] is True and card.training["cases"] == 2  # the mirrored copies are no cases
    assert card.anatomy == {"left_right_pairs": [["left x", "right x"]]}
    assert any(kind == "log" and "left x <-> right x" in f["message"] for kind, f in events)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ENGINE_FOLDER)}
    return subprocess.run([sys.executable, "-m", "TCURLoRALib", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_mirror_without_pairs_exits_2_naming_the_flag(data, tmp_path) -> None:
    image, label = data["cases"][0]
    done = _cli("train", "--base", str(data["base"]), "--case", str(image), str(label), "--labels",
                "grey matter,white matter", "--unmapped", "background", "--mirror", "--steps", "1",
                "-o", str(tmp_path / "none.safetensors"), "--progress", "none")
    assert done.returncode == 2, done.stderr
    assert "--mirror needs left/right label pairs" in done.stderr and "'grey matter'" in done.stderr
    assert not (tmp_path / "none.safetensors").exists()


# ---------------------------------------------------------------------------------------------------- the card


def _card(**changes) -> AdapterCard:
    fields = dict(name="a", base_fingerprint="0" * 64, base_name="b", rank=4, groups=[], init="zero", labels=PAIRED,
                  training={"cases": 1, "steps": 1, "seconds": 0.0, "device": "cpu", "seed": 0})
    return AdapterCard(**{**fields, **changes})


def test_the_anatomy_survives_a_round_trip_and_an_empty_one_is_not_written() -> None:
    anatomy = {"one_piece": ["right x"], "left_right_pairs": [["left x", "right x"]]}
    card = _card(anatomy=anatomy)
    again = AdapterCard.from_json(json.dumps(card.to_json()))
    assert again.anatomy == anatomy and again.one_piece_channels() == [2] and again.declared_pairs() == [(1, 2)]
    plain = _card()
    assert "anatomy" not in plain.to_json() and plain.declared_pairs() is None and plain.one_piece_channels() == []
    assert AdapterCard.from_json(plain.to_json()).anatomy == {}


@pytest.mark.parametrize("anatomy, message", [
    ({"one_piece": ["middle x"]}, "not labels of the adapter"),
    ({"one_piece": ["background"]}, "not labels of the adapter"),
    ({"one_piece": "left x"}, "must be a list of label names"),
    ({"left_right_pairs": [["left x", "left x"]]}, "more than once"),
    ({"left_right_pairs": [["left x"]]}, "pairs"),
    ({"symmetric": True}, "unknown keys"),
])
def test_a_bad_anatomy_is_refused_with_what_is_wrong(anatomy, message) -> None:
    with pytest.raises(CardError, match=message):
        _card(anatomy=anatomy)


def test_one_piece_is_declared_at_training_and_inherited_by_a_child(data, tmp_path) -> None:
    parent = train.train_adapter(data["base"], data["cases"][:1], PAIRED, tmp_path / "p.safetensors",
                                 label_map=SIDED_MAP, unmapped="background", steps=0, one_piece="all")
    assert parent.anatomy["one_piece"] == ["left x", "right x"]
    child = train.train_adapter(data["base"], data["cases"][:1], None, tmp_path / "c.safetensors",
                                label_map=SIDED_MAP, unmapped="background", steps=0,
                                parent_adapter=tmp_path / "p.safetensors")
    assert child.anatomy == parent.anatomy
    with pytest.raises(ValueError, match=r"--one-piece names \['middle x'\]"):
        train.train_adapter(data["base"], data["cases"][:1], PAIRED, tmp_path / "bad.safetensors",
                            label_map=SIDED_MAP, unmapped="background", steps=0, one_piece=["middle x"])


# ---------------------------------------------------------------------------------------------------- segment


def _adapter(base_path: Path, path: Path, anatomy: dict) -> Path:
    base = load_base(base_path)
    attach_head(base.model, PAIRED)
    model = TCURLoRAModel(base.model, TCURLoRAConfig(rank=4))
    card = AdapterCard(name=path.stem, base_fingerprint=base.card.fingerprint, base_name=base.card.name, rank=4,
                       groups=list(model.groups), init="zero", labels=PAIRED, anatomy=anatomy,
                       training={"cases": 0, "steps": 0, "seconds": 0.0, "device": "cpu", "seed": 0})
    save_adapter(path, model, card, include_head=True)
    return path


def _model_grid_image() -> tuple:
    """An image on the tiny base's own grid (2 mm, RAS), so that model grid and input grid are one."""
    geometry = volumes.Geometry((40, 40, 40), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1))
    return np.full(geometry.shape, 50.0, np.float32), geometry


def _two_blobs_each(volume: torch.Tensor) -> torch.Tensor:
    """Logits (3, D, H, W): each label a large blob and a small far one (x is the last array axis)."""
    logits = torch.zeros((3,) + tuple(volume.shape))
    logits[1, 5:15, 5:15, 5:15] = logits[1, 30:33, 30:33, 30:33] = 5.0
    logits[2, 5:15, 20:30, 20:30] = logits[2, 30:33, 2:5, 30:33] = 5.0
    return logits


def _pieces(labels: np.ndarray, value: int) -> list[int]:
    components, count = ndimage.label(labels == value, structure=np.ones((3, 3, 3)))
    return sorted(np.bincount(components.ravel())[1:].tolist(), reverse=True)


def test_largest_component_removes_a_far_blob_only_for_one_piece_labels(data, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(segmentation, "sliding_window_logits",
                        lambda network, volume, *args, mirror_axis=None: _two_blobs_each(volume))
    array, geometry = _model_grid_image()
    declared = _adapter(data["base"], tmp_path / "one.safetensors", {"one_piece": ["left x"]})
    silent = _adapter(data["base"], tmp_path / "silent.safetensors", {})
    cleaned = segmentation.segment_volume(array, geometry, data["base"], adapter_path=declared).labels
    assert _pieces(cleaned, 1) == [1000] and _pieces(cleaned, 2) == [1000, 27]
    raw = segmentation.segment_volume(array, geometry, data["base"], adapter_path=declared, postprocess="none").labels
    assert _pieces(raw, 1) == [1000, 27]
    undeclared = segmentation.segment_volume(array, geometry, data["base"], adapter_path=silent).labels
    np.testing.assert_array_equal(undeclared, raw)
    with pytest.raises(ValueError, match="--postprocess must be one of largest-component, none"):
        segmentation.segment_volume(array, geometry, data["base"], postprocess="biggest")


def test_tta_averages_the_mirrored_pass_with_the_pair_swapped(data, tmp_path, monkeypatch) -> None:
    """The direct pass calls a region 'left x' a little; the mirrored pass (already mapped back) calls it 'right x'
    strongly, as a network does that saw it on the other side: swapped, both say 'left x'."""
    region = (slice(5, 15),) * 3

    def passes(network, volume, *args, mirror_axis=None):
        assert mirror_axis == left_right_axis("RAS")
        direct, mirrored = torch.zeros((3,) + tuple(volume.shape)), torch.zeros((3,) + tuple(volume.shape))
        direct[(1,) + region] = 1.0
        mirrored[(2,) + region] = 8.0
        return torch.stack([direct, mirrored])

    monkeypatch.setattr(segmentation, "sliding_window_logits", passes)
    array, geometry = _model_grid_image()
    adapter = _adapter(data["base"], tmp_path / "a.safetensors", {})
    result = segmentation.segment_volume(array, geometry, data["base"], adapter_path=adapter, tta=True,
                                         with_probabilities=True)
    assert _pieces(result.labels, 1) == [1000] and not (result.labels == 2).any()
    assert result.windows == 2 * segmentation.count_windows(array.shape, (32, 32, 32), 0.25)
    np.testing.assert_allclose(result.probabilities.sum(0), 1.0, atol=1e-5)


def test_tta_without_pairs_is_refused_before_any_window(data, tmp_path) -> None:
    array, geometry = _model_grid_image()
    image = tmp_path / "image.nrrd"
    sitk.WriteImage(geometry.image_from_array(array), str(image))
    done = _cli("segment", str(image), "-o", str(tmp_path / "out.nrrd"), "--base", str(data["base"]), "--tta",
                "--device", "cpu", "--progress", "json")
    assert done.returncode == 2, done.stderr
    assert "--tta needs left/right label pairs" in done.stderr and "'grey matter'" in done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert not any(event.get("event") == "step" for event in events) and not (tmp_path / "out.nrrd").exists()


def test_the_mirrored_pass_of_the_sliding_window_is_mapped_back() -> None:
    """A 'network' that calls every bright voxel channel 1: the flipped volume's pass, flipped back, matches."""
    def network(batch: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(batch), 10 * batch, torch.zeros_like(batch)], dim=1)

    volume = torch.zeros((32, 40, 36))
    volume[4:9, 10:14, 3:7] = 1.0  # asymmetric along every axis
    both = segmentation.sliding_window_logits(network, volume, (32, 32, 32), mirror_axis=2)
    assert both.shape == (2, 3, 32, 40, 36)
    torch.testing.assert_close(both[0], both[1])
    assert bool((both[0][1][volume > 0] > 5).all())


def test_the_segment_panel_passes_the_options_on() -> None:
    from TCURLoRALib.cli import build_parser
    from TCURLoRALib.panels import arguments

    args = build_parser().parse_args(arguments.segment_arguments("in.nii.gz", "out.nii.gz", postprocess="none",
                                                                 tta=True))
    assert args.postprocess == "none" and args.tta is True
    default = build_parser().parse_args(arguments.segment_arguments("in.nii.gz", "out.nii.gz"))
    assert default.postprocess == "largest-component" and default.tta is False
    trained = build_parser().parse_args(arguments.train_arguments("c.json", name="n", minutes=2.5, mirror=True))
    assert trained.minutes == 2.5 and trained.mirror is True
    with pytest.raises(ValueError, match="postprocess"):
        arguments.segment_arguments("in.nii.gz", "out.nii.gz", postprocess="biggest")
