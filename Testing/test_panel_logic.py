"""The panels' decisions (TCURLoRALib.panels) with plain values: imports without torch, MONAI and numpy; defaults;
CLI arguments; adapter lists where the entry shown is the adapter that runs; button states; progress text; label
mapping and case lists; dependency checks that never replace the user's PyTorch; the self-test runner.

Real MRML nodes (slicer-core) and real background jobs are in test_panel_runs.py.
"""
from __future__ import annotations

import ast
import importlib.metadata
import json
import sys
import unittest
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk

from TCURLoRALib.cards import Label
from TCURLoRALib.cases import find_cases
from TCURLoRALib.cli import build_parser
from TCURLoRALib.panels import (adapters, arguments, caselist, engine, export, requirements, selftest, settings,
                                tracking, view)

REPO_ROOT = Path(__file__).resolve().parents[1]
ENGINE_FOLDER = REPO_ROOT / "TCURLoRASegment"
PANEL_MODULES = sorted(f"TCURLoRALib.panels.{path.stem}" for path in (ENGINE_FOLDER / "TCURLoRALib" / "panels").glob("*.py")
                       if path.stem != "__init__")
BASE_LABELS = [Label(0, "background", (0, 0, 0)), Label(1, "grey", (128, 128, 128)), Label(2, "white", (250, 250, 250))]


def write_label_map(path: Path, array_zyx: np.ndarray) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(array_zyx.astype(np.uint16)), str(path))
    return path


# ------------------------------------------------------------------------------------------- imports


def engine_imports_of(path: Path) -> list[str]:
    """The TCURLoRALib modules that a module file (or TCURLoRAGui) imports, from its import statements."""
    modules = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("TCURLoRALib"):
            modules += [f"{node.module}.{alias.name}" for alias in node.names]
    return modules


def test_every_panel_module_imports_without_torch_monai_or_numpy() -> None:
    """In a fresh interpreter (torch is imported in this one already) that cannot import torch, MONAI or numpy."""
    ok, output = selftest.imports_without(sys.executable, PANEL_MODULES, ENGINE_FOLDER)
    assert ok, output
    assert f"imported {len(PANEL_MODULES)} modules" in output


@pytest.mark.parametrize("path", ["TCURLoRASegment/TCURLoRASegment.py", "TCURLoRATrain/TCURLoRATrain.py",
                                  "TCURLoRASegment/TCURLoRAGui/__init__.py"])
def test_the_engine_imports_of_the_slicer_side_need_no_torch_monai_or_numpy(path: str) -> None:
    modules = engine_imports_of(REPO_ROOT / path)
    assert modules and all(module.startswith("TCURLoRALib.panels.") for module in modules), modules
    ok, output = selftest.imports_without(sys.executable, modules, ENGINE_FOLDER)
    assert ok, output


def test_the_import_check_catches_a_module_that_needs_numpy(tmp_path: Path) -> None:
    (tmp_path / "needs_numpy.py").write_text("import json\nfrom numpy import linalg\n")
    ok, output = selftest.imports_without(sys.executable, ["needs_numpy"], tmp_path)
    assert not ok and "numpy is blocked by the import check" in output
    assert selftest.imports_without(sys.executable, ["needs_numpy"], tmp_path, blocked=("torch",))[0]


# ------------------------------------------------------------------------------------------- settings


def test_train_defaults_are_the_engines() -> None:
    """The Train panel's defaults (settings.train_defaults) are TrainSettings', and within the panel's ranges."""
    from TCURLoRALib.devices import check_device
    from TCURLoRALib.settings import TrainSettings

    engine = TrainSettings()
    defaults = settings.train_defaults()
    assert defaults == settings.TrainDefaults(rank=TrainSettings.NEW_RANK, steps=engine.steps, lr=engine.lr,
                                              minutes=settings.PANEL_MINUTES, mirror=engine.mirror)
    assert engine.minutes is None
    assert settings.MINUTES_RANGE[0] == 0 < settings.PANEL_MINUTES <= settings.MINUTES_RANGE[1]
    low, high = settings.RANK_RANGE
    assert low <= defaults.rank <= high and settings.LR_RANGE[0] <= defaults.lr <= settings.LR_RANGE[1]
    assert settings.STEPS_RANGE[0] <= defaults.steps <= settings.STEPS_RANGE[1]
    assert all(check_device(device) == device for device in settings.DEVICES)


def test_segment_defaults_and_devices_are_the_clis() -> None:
    segment = build_parser().parse_args(["segment", "in.nii.gz", "-o", "out.nii.gz"])
    assert settings.SEGMENT_OVERLAP == segment.overlap
    for device in settings.DEVICES:
        assert build_parser().parse_args(["segment", "in.nii.gz", "-o", "out.nii.gz", "--device", device]).device \
            == device
    assert settings.DEVICES == tuple(device.value for device in settings.Device)
    assert settings.Device.GPU.label() == "GPU (CUDA)"


# ------------------------------------------------------------------------------------------- CLI arguments


def test_segment_arguments_parse_with_the_real_cli() -> None:
    args = build_parser().parse_args(arguments.segment_arguments(
        "in.nii.gz", "out.nii.gz", adapter="hippo", device="cuda", overlap=0.5, base="base.safetensors"))
    assert (args.command, args.image, args.output, args.adapter) == ("segment", "in.nii.gz", "out.nii.gz", "hippo")
    assert (args.device, args.overlap, args.base) == ("cuda", 0.5, "base.safetensors")


@pytest.mark.parametrize("adapter", [None, ""])
def test_segment_arguments_base_only_and_shipped_base(adapter) -> None:
    args = build_parser().parse_args(arguments.segment_arguments("in.nii.gz", "out.nii.gz", adapter=adapter))
    assert args.adapter == settings.BASE_ONLY and args.base is None and args.overlap == 0.25


@pytest.mark.parametrize(("options", "match"), [
    ({"overlap": 1.0}, r"overlap must be in \[0, 1\), got 1.0"),
    ({"overlap": -0.1}, "got -0.1"),
    ({"device": "gpu"}, "device must be one of .* got 'gpu'"),
])
def test_segment_arguments_refuse_bad_settings(options, match) -> None:
    with pytest.raises(ValueError, match=match):
        arguments.segment_arguments("in.nii.gz", "out.nii.gz", **options)


def test_train_arguments_parse_with_the_real_cli_and_leave_unset_options_out() -> None:
    args = build_parser().parse_args(arguments.train_arguments(
        "cases.json", name=" mine ", rank=4, steps=3, lr=0.002, device="cpu", labels_json="labels.json"))
    assert (args.cases, args.name, args.rank, args.steps, args.lr) == ("cases.json", "mine", 4, 3, 0.002)
    assert (args.labels, args.device, args.parent, args.base) == ("labels.json", "cpu", None, None)
    minimal = arguments.train_arguments("cases.json", name="mine")
    assert "--rank" not in minimal and "--steps" not in minimal and "--lr" not in minimal


def test_train_arguments_for_improving_an_adapter() -> None:
    args = build_parser().parse_args(arguments.train_arguments("c.json", name="v2", parent="v1", steps=10))
    assert (args.parent, args.rank) == ("v1", None)
    with pytest.raises(ValueError, match="keeps the rank of its parent 'v1'"):
        arguments.train_arguments("c.json", name="v2", parent="v1", rank=8)


@pytest.mark.parametrize(("options", "match"), [
    ({"name": "  "}, "give the new adapter a name, got '  '"),
    ({"name": "a", "steps": 0}, "steps must be > 0, got 0"),
    ({"name": "a", "lr": -1.0}, "learning rate must be > 0"),
    ({"name": "a", "device": "tpu"}, "got 'tpu'"),
])
def test_train_arguments_refuse_bad_settings(options, match) -> None:
    with pytest.raises(ValueError, match=match):
        arguments.train_arguments("c.json", **options)


# ------------------------------------------------------------------------------------------- adapters


CARD = {
    "name": "hippo", "base_name": "tiny", "rank": 8, "groups": ["attention", "mlp_up"], "init": "pinv",
    "labels": [{"value": 0, "name": "background", "color": [0, 0, 0]},
               {"value": 5, "name": "left", "color": [1, 2, 3]}, {"value": 6, "name": "right", "color": [1, 2, 3]}],
    "training": {"cases": 3, "steps": 200, "seconds": 125.0, "device": "cpu", "seed": 0},
    "metrics": {"validation": {"dice": {"left": 0.8123, "right": 0.79}, "mean_dice": 0.8011, "cases": 1}},
    "parent": "hippo-v0", "created": "2025-01-01T00:00:00+00:00",
}


def test_describe_adapter_lists_labels_base_training_and_dice() -> None:
    text = adapters.describe_adapter(CARD, "user")
    assert text.splitlines()[0] == "hippo (user adapter)"
    assert "Labels: left, right" in text and "Base: tiny" in text and "Improved from: hippo-v0" in text
    assert "Trained on 3 cases, 200 steps (cpu, 2 min 5 s)" in text
    assert "Validation mean Dice: 0.801 on 1 cases" in text and "left 0.812, right 0.790" in text


def test_describe_adapter_without_validation_says_so() -> None:
    text = adapters.describe_adapter({**CARD, "metrics": {}, "parent": None}, "shipped")
    assert "Validation: none recorded" in text and "Improved from" not in text and "(shipped adapter)" in text


STORE = [SimpleNamespace(name="hippo", card=CARD, source="shipped"), SimpleNamespace(name="mine", card=CARD,
                                                                                    source="user")]
BASE = adapters.AdapterChoice(None, adapters.BASE_ONLY_TEXT, "base tip")


def segment_list(problem: str | None = None, store=STORE) -> adapters.AdapterList:
    adapter_list = adapters.AdapterList(BASE)
    adapter_list.update(adapters.adapter_choices(store), problem)
    return adapter_list


def test_adapter_choices_mark_shipped_adapters() -> None:
    choices = adapters.adapter_choices(STORE)
    assert [(c.name, c.text, c.value) for c in choices] == [("hippo", "hippo (shipped)", "hippo"),
                                                           ("mine", "mine", "mine")]
    assert "Labels: left, right" in choices[1].tooltip and not any(c.missing for c in choices)


@pytest.mark.parametrize("value", ["", "hippo", "mine", "MINE", "deleted", "hippo-v0"])
@pytest.mark.parametrize("problem", [None, "PyTorch is not installed"])
def test_the_adapter_shown_is_the_adapter_that_runs(value, problem) -> None:
    """For every parameter value, listed or not, the entry selected names that value; picking any entry writes
    back a value whose entry is the one picked (finding 8: a stale name is shown as missing, not as the base)."""
    adapter_list = segment_list(problem, STORE if problem is None else [])
    entries = adapter_list.entries(value)
    shown = entries[adapter_list.index(value)]
    assert shown == adapter_list.selected(value)
    assert shown.value.casefold() == value.casefold()
    listed = problem is None and value.casefold() in {"", "hippo", "mine"}
    assert shown.missing == (value != "" and not listed)
    if shown.missing:
        assert shown.text == f"{value} (not found)" and (problem or "deleted or renamed") in shown.tooltip
    for picked in entries:
        assert adapter_list.selected(picked.value).text == picked.text


def test_a_stale_adapter_disables_apply_and_says_why() -> None:
    shown = segment_list().selected("deleted")
    state = view.segment_apply(running=False, cancelling=False, volume_usable=True, adapter=shown)
    assert not state.enabled and "'deleted' is not listed" in state.tooltip
    assert view.segment_apply(running=False, cancelling=False, volume_usable=True,
                              adapter=segment_list().selected("mine")).enabled


def test_improve_adapter_never_shows_an_adapter_it_would_not_train_from() -> None:
    """Finding 7: with no parent chosen, the parent list shows "Choose ..." (not the first adapter) and Start
    says so; once chosen, the parameter and the entry agree."""
    parents = adapters.AdapterList(adapters.AdapterChoice(None, adapters.CHOOSE_PARENT_TEXT, "tip"))
    parents.update(adapters.adapter_choices(STORE))
    shown = parents.selected("")
    assert shown.text == adapters.CHOOSE_PARENT_TEXT and shown.value == ""
    ready = dict(running=False, cancelling=False, cases=2, name="v2", pair_chosen=True, mapped=True)
    state = view.train_view(improve=True, parent=shown, **ready)
    assert not state.start.enabled and state.start.tooltip == "Choose the adapter to improve"
    assert view.train_view(improve=True, parent=parents.selected("mine"), **ready).start.enabled
    assert view.train_view(improve=False, parent=shown, **ready).start.enabled


def test_adapter_list_refuses_a_first_entry_that_names_an_adapter() -> None:
    with pytest.raises(ValueError, match="must name no adapter, got 'x'"):
        adapters.AdapterList(adapters.AdapterChoice("x", "x", ""))


# ------------------------------------------------------------------------------------------- buttons


@pytest.mark.parametrize(("state", "expected"), [
    ({"running": True, "cancelling": False, "volume_usable": False}, (True, "Cancel")),
    ({"running": True, "cancelling": True, "volume_usable": True}, (False, "Cancelling...")),
    ({"running": False, "cancelling": False, "volume_usable": False}, (False, "Apply")),
    ({"running": False, "cancelling": False, "volume_usable": True}, (True, "Apply")),
])
def test_apply_button(state, expected) -> None:
    button = view.segment_apply(adapter=BASE, **state)
    assert (button.enabled, button.text) == expected


@pytest.mark.parametrize(("changes", "reason"), [
    ({"cases": 0}, "Add at least one training case"),
    ({"name": " "}, "Give the new adapter a name"),
    ({"mapped": False}, "Give at least one segment an adapter label in the table"),
    ({"improve": True, "parent": adapters.AdapterChoice("gone", "gone (not found)", "", missing=True)},
     "The adapter 'gone' is not listed: choose another one"),
])
def test_start_button_says_what_is_missing(changes, reason) -> None:
    values = dict(running=False, cancelling=False, cases=1, name="new", improve=False, parent=BASE, pair_chosen=True,
                  mapped=True)
    state = view.train_view(**{**values, **changes})
    assert (state.start.enabled, state.start.tooltip) == (False, reason)


def test_while_training_only_cancel_is_enabled_and_an_improved_adapter_keeps_its_rank() -> None:
    running = view.train_view(running=True, cancelling=False, cases=1, name="n", improve=True, parent=BASE,
                              pair_chosen=True, mapped=True)
    assert (running.start.enabled, running.start.text) == (True, "Cancel")
    assert not (running.add_case or running.parent or running.rank)
    idle = view.train_view(running=False, cancelling=False, cases=1, name="n", improve=True, parent=BASE,
                           pair_chosen=True, mapped=True)
    assert idle.parent and not idle.rank and idle.add_case


# ------------------------------------------------------------------------------------------- progress


def test_progress_tracker_turns_events_into_percent_status_and_log() -> None:
    tracker = tracking.ProgressTracker()
    start = tracker.update({"event": "start", "task": "train", "total": 4})
    assert (start.percent, start.status) == (0, "train: started")
    step = tracker.update({"event": "step", "step": 1, "loss": 0.51234, "eta_s": 95.0})
    assert step.percent == 25 and step.status == "train: step 1/4, loss 0.5123, about 1 min 35 s left"
    metric = tracker.update({"event": "metric", "name": "validation_mean_dice", "value": 0.5, "step": 1})
    assert metric.log == "validation_mean_dice = 0.500 at step 1" and metric.percent is None
    assert tracker.update({"event": "log", "message": "hello"}).log == "hello"
    done = tracker.update({"event": "done", "seconds": 3.2})
    assert done.percent == 100 and done.status == "train: done in 3 s"
    finished = tracker.update({"event": "finished", "state": "done", "returncode": 0, "error": None})
    assert finished.finished and finished.state == "done" and finished.error is None


def test_progress_tracker_reports_failure_and_cancel() -> None:
    tracker = tracking.ProgressTracker()
    failed = tracker.update({"event": "finished", "state": "failed", "returncode": 2, "error": "bad volume"})
    assert failed.finished and failed.state == "failed" and failed.error == "bad volume"
    assert failed.status == "Failed: bad volume"
    assert tracker.update({"event": "finished", "state": "failed", "returncode": 3, "error": None}).error == \
        "exit code 3"
    cancelled = tracker.update({"event": "finished", "state": "cancelled", "returncode": 130, "error": None})
    assert cancelled.state == "cancelled" and cancelled.error is None and cancelled.status == "Cancelled"


@pytest.mark.parametrize(("seconds", "text"), [(None, ""), (0.4, "0 s"), (59, "59 s"), (75, "1 min 15 s"),
                                               (3700, "1 h 1 min"), (float("nan"), "")])
def test_format_duration(seconds, text) -> None:
    assert tracking.format_duration(seconds) == text


def test_training_curves_collect_loss_and_validation_dice_rows() -> None:
    curves = tracking.TrainingCurves()
    events = [{"event": "start", "task": "train", "total": 3},
              {"event": "metric", "name": "validation_mean_dice", "value": 0.2, "step": 0},
              {"event": "step", "step": 1, "total": 3, "loss": 1.5, "eta_s": 4.0},
              {"event": "step", "step": 2, "total": 3, "loss": 1.25, "eta_s": 2.0},
              {"event": "metric", "name": "validation_dice/left", "value": 0.9, "step": 2},
              {"event": "metric", "name": "validation_mean_dice", "value": 0.6, "step": 2},
              {"event": "step", "step": 3, "total": 3, "eta_s": 0.0}]
    assert [curves.add(event) for event in events] == [False, True, True, True, False, True, False]
    assert (curves.loss_steps, curves.losses) == ([1, 2], [1.5, 1.25])
    assert (curves.dice_steps, curves.dices) == ([0, 2], [0.2, 0.6])
    assert curves.eta_s == 0.0


# ------------------------------------------------------------------------------------------- cases and labels


class Node:
    """A stand-in MRML node with an ID and a name (the real ones are in test_panel_runs.py)."""

    def __init__(self, node_id: str):
        self.node_id = node_id

    def GetID(self) -> str:  # noqa: N802  (MRML's spelling)
        return self.node_id

    def GetName(self) -> str:  # noqa: N802
        return self.node_id


def test_case_list_pairs_adds_once_and_removes_rows() -> None:
    v1, v2, s1, s2 = Node("v1"), Node("v2"), Node("s1"), Node("s2")
    assert caselist.case_pairs([v1, None, v2], [s1, s2, None]) == [(v1, s1)], "a deleted node drops its pair"
    pairs = caselist.add_case([(v1, s1)], v2, s2)
    assert pairs == [(v1, s1), (v2, s2)]
    assert caselist.add_case(pairs, Node("v2"), Node("s2")) is None, "the same nodes (by ID) are listed already"
    assert caselist.add_case(pairs, v2, s1) == [*pairs, (v2, s1)]
    assert caselist.remove_rows(pairs, [0, 7]) == [(v2, s2)]
    with pytest.raises(ValueError, match="choose a volume and its segmentation"):
        caselist.add_case(pairs, v1, None)


def test_mapping_rows_keep_edits_of_segments_still_present() -> None:
    assert caselist.default_label_mapping(["Grey", "tumour"], ["background", "grey", "white"]) == {
        "Grey": "grey", "tumour": "tumour"}
    rows = caselist.mapping_rows(["Grey", "tumour", "new"], ["background", "grey"],
                                 {"tumour": "lesion", "gone": "x", "Grey": ""})
    assert rows == {"Grey": "", "tumour": "lesion", "new": "new"}


def test_adapter_labels_keep_base_values_and_number_new_ones_after_them() -> None:
    labels, by_segment = export.adapter_labels({"GM": "Grey", "lesion": "lesion", "edge": "lesion", "skip": ""},
                                               BASE_LABELS, {"lesion": (1.0, 0.0, 0.5)})
    assert [(label.value, label.name) for label in labels] == [(0, "background"), (1, "grey"), (3, "lesion")]
    assert labels[2].color == (255, 0, 128)
    assert by_segment == {"GM": BASE_LABELS[1], "lesion": labels[2], "edge": labels[2]}
    assert export.adapter_labels({"grey": "grey", "white": "white"}, BASE_LABELS)[0] == BASE_LABELS


@pytest.mark.parametrize(("mapping", "match"), [
    ({"a": "", "b": " "}, "no segment is mapped"),
    ({"a": "Background"}, "segment 'a' is mapped to the background 'Background'"),
])
def test_adapter_labels_refuse(mapping, match) -> None:
    with pytest.raises(ValueError, match=match):
        export.adapter_labels(mapping, BASE_LABELS)


def test_labels_json_is_what_train_reads(tmp_path: Path) -> None:
    path = export.write_labels_json(tmp_path / "labels.json", BASE_LABELS)
    assert [Label.from_json(item) for item in json.loads(path.read_text())] == BASE_LABELS


def test_annotated_slices_are_the_k_indices_holding_a_voxel(tmp_path: Path) -> None:
    array = np.zeros((6, 4, 5), np.uint16)
    array[1, 2, 3] = 1
    array[4, 0, 0] = 7
    assert export.annotated_slices(array) == [1, 4]
    assert export.read_annotated_slices(write_label_map(tmp_path / "l.nii.gz", array)) == [1, 4]
    with pytest.raises(ValueError, match=r"3-D \(z, y, x\) array, got shape \(4, 5\)"):
        export.annotated_slices(array[0])
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        export.read_annotated_slices(tmp_path / "missing.nii.gz")


def test_cases_json_is_read_back_by_the_engine_with_annotated_slices(tmp_path: Path) -> None:
    image = np.zeros((5, 4, 3), np.float32)
    label = np.zeros((5, 4, 3), np.uint16)
    label[2, 1, 1] = 1
    label[3, 0, 0] = 2
    job, outside = tmp_path / "job", tmp_path / "other"
    job.mkdir()
    outside.mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(image), str(job / "a_image.nii.gz"))
    write_label_map(job / "a_label.nii.gz", label)
    sitk.WriteImage(sitk.GetImageFromArray(image), str(outside / "b_image.nii.gz"))
    write_label_map(outside / "b_label.nii.gz", label[::-1])
    cases = [export.CaseFiles(job / "a_image.nii.gz", job / "a_label.nii.gz", "a"),
             export.CaseFiles(outside / "b_image.nii.gz", outside / "b_label.nii.gz", "b")]
    written = export.write_cases_json(job / "cases.json", cases, annotated_slices_only=True)
    assert written[0] == {"image": "a_image.nii.gz", "label": "a_label.nii.gz", "name": "a",
                          "annotated_slices": {"axis": "z", "indices": [2, 3]}}
    assert written[1]["image"] == str((outside / "b_image.nii.gz").resolve())
    assert json.loads((job / "cases.json").read_text()) == written
    read = find_cases(job / "cases.json")
    assert [c.name for c in read] == ["a", "b"]
    assert read[0].image.resolve() == (job / "a_image.nii.gz").resolve()
    assert read[1].annotated_slices.indices == (1, 2)


def test_cases_json_without_annotated_slices_and_its_errors(tmp_path: Path) -> None:
    label = write_label_map(tmp_path / "l.nii.gz", np.zeros((3, 3, 3)))
    case = export.CaseFiles(tmp_path / "i.nii.gz", label, "empty")
    assert "annotated_slices" not in export.write_cases_json(tmp_path / "c.json", [case])[0]
    with pytest.raises(ValueError, match="case 'empty' has no annotated voxel"):
        export.write_cases_json(tmp_path / "c.json", [case], annotated_slices_only=True)
    with pytest.raises(ValueError, match=r"these repeat: \['empty'\]"):
        export.write_cases_json(tmp_path / "c.json", [case, case])
    with pytest.raises(ValueError, match="no training cases"):
        export.write_cases_json(tmp_path / "c.json", [])


# ------------------------------------------------------------------------------------------- the engine's door


def test_shipped_adapters_and_base_are_listed_for_the_panels() -> None:
    listing = engine.list_adapters()
    assert listing.problem is None
    assert {"hippocampus", "deep-grey-structures"} <= {choice.name for choice in listing.choices}
    assert "Labels:" in listing.base.tooltip and listing.base.name is None
    names, problem = engine.start_label_names(None)
    assert names[0] == "background" and problem == ""
    assert engine.shipped_sample() is not None


def test_a_store_that_cannot_be_listed_is_reported_not_raised(monkeypatch) -> None:
    def no_torch():
        raise ModuleNotFoundError("No module named 'torch'", name="torch")

    monkeypatch.setattr(engine, "adapter_store", no_torch)
    listing = engine.list_adapters()
    assert listing.choices == [] and listing.base == engine.AdapterListing.base
    assert "not installed (No module named 'torch')" in listing.problem
    names, problem = engine.start_label_names("hippocampus")
    assert names == [] and "not installed" in problem


def test_a_new_adapter_name_must_be_valid_and_free(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TCURLORA_HOME", str(tmp_path))
    assert engine.check_new_adapter_name(" mine ") == "mine"
    with pytest.raises(FileExistsError, match="'HIPPOCAMPUS' exists already"):
        engine.check_new_adapter_name("HIPPOCAMPUS")
    with pytest.raises(ValueError, match="path separators"):
        engine.check_new_adapter_name("a/b")


def test_engine_status_describes_what_imports() -> None:
    status = engine.engine_status()
    assert set(status) == {"location", "version", "torch", "monai"}
    assert Path(status["location"]) == ENGINE_FOLDER / "TCURLoRALib"
    assert status["torch"].startswith(importlib.metadata.version("torch").split("+")[0])
    assert engine.import_problem(OSError("libcudart.so missing")) == "broken (OSError: libcudart.so missing)"


# ------------------------------------------------------------------------------------------- dependencies


def fake_environment(torch: str | None, missing: set[str]):
    """``version_of`` and ``find_spec`` of a Python where ``torch`` (a version or None) and all but ``missing``
    import names are installed."""
    def version_of(name: str) -> str:
        if torch is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return torch

    return version_of, (lambda name: None if name in missing else object())


def test_requirements_file_is_found_in_the_checkout_and_the_installed_layout(tmp_path: Path) -> None:
    assert requirements.requirements_file(ENGINE_FOLDER) == REPO_ROOT / "Resources" / "requirements.txt"
    installed = tmp_path / "qt-scripted-modules"
    (installed / "Resources").mkdir(parents=True)
    (installed / "Resources" / "requirements.txt").write_text("monai\n")
    assert requirements.requirements_file(installed) == installed / "Resources" / "requirements.txt"
    with pytest.raises(FileNotFoundError, match="requirements.txt not found"):
        requirements.requirements_file(tmp_path / "lonely" / "module")


def test_read_requirements_drops_comments_and_refuses_torch(tmp_path: Path) -> None:
    listed = requirements.read_requirements(REPO_ROOT / "Resources" / "requirements.txt")
    assert listed and all(not line.startswith("#") for line in listed)
    assert any(line.startswith("monai") for line in listed)
    bad = tmp_path / "r.txt"
    bad.write_text("# x\nnumpy>=1\ntorch>=2 ; python_version>'3'\n")
    with pytest.raises(ValueError, match="lists torch"):
        requirements.read_requirements(bad)


def test_missing_modules_uses_import_names() -> None:
    looked_up = []

    def find_spec(name):
        looked_up.append(name)
        return None if name == "nrrd" else object()

    assert requirements.missing_modules(["pynrrd>=1.0", "SimpleITK>=2.3", "my-package[extra]"], find_spec) == [
        "pynrrd>=1.0"]
    assert looked_up == ["nrrd", "SimpleITK", "my_package"]
    assert requirements.missing_modules(requirements.read_requirements(REPO_ROOT / "Resources" / "requirements.txt")) \
        == []


@pytest.mark.parametrize(("version", "release"), [("2.1.0+cu118", (2, 1, 0)), ("2.0.0a0", (2, 0, 0)), ("10", (10,)),
                                                  ("v1.13.1", (1, 13, 1))])
def test_release_numbers(version, release) -> None:
    assert requirements.release(version) == release
    assert requirements.release("1.13.1") < requirements.release(requirements.MINIMUM_TORCH) <= \
        requirements.release("2.0.0a0")


def test_dependency_check_names_what_is_missing_and_an_old_torch() -> None:
    ready = requirements.check_dependencies(ENGINE_FOLDER, *fake_environment("2.3.0+cpu", set()))
    assert ready.ready and ready.reason() == "everything is installed"
    old = requirements.check_dependencies(ENGINE_FOLDER, *fake_environment("1.13.1", {"monai"}))
    assert not old.ready and old.torch == "1.13.1" and old.missing == ("monai>=1.4,<1.7",)
    assert "PyTorch 1.13.1 is older than 2.0" in old.reason() and "monai>=1.4,<1.7" in old.reason()
    none = requirements.check_dependencies(ENGINE_FOLDER, *fake_environment(None, set()))
    assert none.torch is None and "PyTorch is not installed" in none.reason()
    installed = requirements.check_dependencies(ENGINE_FOLDER)
    assert installed.ready and installed.torch == importlib.metadata.version("torch")


class Installer:
    """Fake install_torch, confirm and pip_install that record their calls and change the fake environment."""

    def __init__(self, torch: str | None, missing: set[str], answer: bool = True, pip_works: bool = True):
        self.torch, self.missing, self.answer, self.pip_works = torch, set(missing), answer, pip_works
        self.calls: list[tuple] = []

    def environment(self):
        return fake_environment(self.torch, self.missing)

    def install_torch(self, requirement: str) -> bool:
        self.calls.append(("torch", requirement))
        self.torch = "2.4.0+cu121" if self.answer else None
        return self.answer

    def confirm(self, question: str) -> bool:
        self.calls.append(("confirm", question))
        return self.answer

    def pip_install(self, args: list[str]) -> None:
        constraint = Path(args[args.index("--constraint") + 1]).read_text() if "--constraint" in args else None
        self.calls.append(("pip", [a for a in args if not a.endswith("constraints.txt")], constraint))
        if self.pip_works:
            self.missing.clear()

    def ensure(self) -> bool:
        version_of = lambda name: self.environment()[0](name)  # noqa: E731  (reads the state at call time)
        find_spec = lambda name: self.environment()[1](name)  # noqa: E731
        return requirements.ensure_dependencies(ENGINE_FOLDER, self.install_torch, self.confirm, self.pip_install,
                                                version_of, find_spec)


def test_packages_are_installed_with_the_installed_torch_pinned() -> None:
    """Finding 9: MONAI's own torch requirement must not upgrade the user's PyTorch from the registry."""
    installer = Installer("2.1.0+cu118", {"monai", "einops"})
    assert installer.ensure()
    (confirm, pip) = installer.calls
    assert confirm[0] == "confirm" and "monai>=1.4,<1.7" in confirm[1] and "einops>=0.7" in confirm[1]
    assert pip == ("pip", ["--constraint", "monai>=1.4,<1.7", "einops>=0.7"], "torch==2.1.0+cu118\n")


def test_an_old_torch_is_reported_not_replaced() -> None:
    installer = Installer("1.13.1", {"monai"})
    with pytest.raises(RuntimeError, match="PyTorch 1.13.1 is older than 2.0: install PyTorch >=2.0 with the"):
        installer.ensure()
    assert installer.calls == [], "neither torch nor anything else was installed"


def test_a_missing_torch_comes_from_the_pytorch_extension_first() -> None:
    installer = Installer(None, {"monai"})
    assert installer.ensure()
    assert [call[0] for call in installer.calls] == ["torch", "confirm", "pip"]
    assert installer.calls[0] == ("torch", ">=2.0") and installer.calls[2][2] == "torch==2.4.0+cu121\n"


@pytest.mark.parametrize("torch", [None, "2.2.0"])
def test_a_declined_install_installs_nothing(torch) -> None:
    installer = Installer(torch, {"monai"}, answer=False)
    assert installer.ensure() is False
    assert not [call for call in installer.calls if call[0] == "pip"]


def test_an_install_that_leaves_something_missing_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="Installing the dependencies failed: .*monai"):
        Installer("2.2.0", {"monai"}, pip_works=False).ensure()
    assert Installer("2.2.0", set()).ensure() and Installer("2.2.0", set()).calls == []


def test_python_for_jobs_prefers_python_slicer(tmp_path: Path) -> None:
    assert requirements.python_for_jobs("/x/Slicer", lambda name: "/bin/PythonSlicer") == "/bin/PythonSlicer"
    (tmp_path / "PythonSlicer").write_text("")
    assert requirements.python_for_jobs(str(tmp_path / "SlicerApp-real"), lambda name: None) == \
        str(tmp_path / "PythonSlicer")
    assert requirements.python_for_jobs(sys.executable, lambda name: None) == sys.executable


# ------------------------------------------------------------------------------------------- self-tests


class Recorded(unittest.TestCase):
    """A self-test class whose methods run_tests runs (pytest must not collect it itself)."""

    __test__ = False
    log: list[str] = []

    def setUp(self) -> None:
        self.log.append("setUp")

    def tearDown(self) -> None:
        self.log.append("tearDown")

    def test_skips(self) -> None:
        raise unittest.SkipTest("PyTorch is not installed")

    def test_passes(self) -> None:
        self.log.append("passes")

    def test_fails(self) -> None:
        self.assertEqual(1, 2)


def test_a_skipped_self_test_is_reported_and_the_next_one_runs() -> None:
    """Finding 5: Slicer calls runTest directly; a SkipTest must not end it as "Reload and Test failed"."""
    Recorded.log = []
    reports: list[str] = []
    skipped = selftest.run_tests(Recorded(), ["test_skips", "test_passes"], report=reports.append)
    assert skipped == reports == ["test_skips skipped: PyTorch is not installed"]
    assert Recorded.log == ["setUp", "tearDown", "setUp", "passes", "tearDown"]


def test_a_failing_self_test_still_fails() -> None:
    Recorded.log = []
    with pytest.raises(AssertionError):
        selftest.run_tests(Recorded(), ["test_fails", "test_passes"], report=lambda text: None)
    assert Recorded.log == ["setUp", "tearDown"]


def test_the_keep_largest_piece_box_gives_the_segment_rules() -> None:
    from TCURLoRALib.settings import POSTPROCESS_CHOICES

    assert settings.postprocess_rule(True) == POSTPROCESS_CHOICES[0] == "largest-component"
    assert settings.postprocess_rule(False) == "none" in POSTPROCESS_CHOICES
