"""The qt-free decisions of the Slicer panels (TCURLoRALib.panel): CLI arguments, adapter tooltips, progress
events, chart rows, label mapping, annotated slices and the case list the CLI reads (real files, real MRML)."""
from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from TCURLoRALib import panel
from TCURLoRALib.cards import Label
from TCURLoRALib.cases import find_cases
from TCURLoRALib.cli import build_parser

REPO_ROOT = Path(__file__).resolve().parents[1]
BASE_LABELS = [Label(0, "background", (0, 0, 0)), Label(1, "grey", (128, 128, 128)), Label(2, "white", (250, 250, 250))]


def write_label_map(path: Path, array_zyx: np.ndarray) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(array_zyx.astype(np.uint16)), str(path))
    return path


# ------------------------------------------------------------------------------------------- CLI arguments


def test_segment_arguments_parse_with_the_real_cli() -> None:
    arguments = panel.segment_arguments("in.nii.gz", "out.nii.gz", adapter="hippo", device="cuda", overlap=0.5,
                                        base="base.safetensors")
    args = build_parser().parse_args(arguments)
    assert (args.command, args.image, args.output, args.adapter) == ("segment", "in.nii.gz", "out.nii.gz", "hippo")
    assert (args.device, args.overlap, args.base) == ("cuda", 0.5, "base.safetensors")


def test_segment_arguments_base_only_and_shipped_base() -> None:
    args = build_parser().parse_args(panel.segment_arguments("in.nii.gz", "out.nii.gz"))
    assert args.adapter == panel.BASE_ONLY and args.base is None and args.overlap == 0.25


@pytest.mark.parametrize(("options", "match"), [
    ({"overlap": 1.0}, r"overlap must be in \[0, 1\), got 1.0"),
    ({"overlap": -0.1}, "got -0.1"),
    ({"device": "gpu"}, "device must be one of .* got 'gpu'"),
])
def test_segment_arguments_refuse_bad_settings(options, match) -> None:
    with pytest.raises(ValueError, match=match):
        panel.segment_arguments("in.nii.gz", "out.nii.gz", **options)


def test_train_arguments_parse_with_the_real_cli_and_leave_unset_options_out() -> None:
    arguments = panel.train_arguments("cases.json", name=" mine ", rank=4, steps=3, lr=0.002, device="cpu",
                                      labels_json="labels.json")
    args = build_parser().parse_args(arguments)
    assert (args.cases, args.name, args.rank, args.steps, args.lr) == ("cases.json", "mine", 4, 3, 0.002)
    assert (args.labels, args.device, args.parent, args.base) == ("labels.json", "cpu", None, None)
    minimal = panel.train_arguments("cases.json", name="mine")
    assert "--rank" not in minimal and "--steps" not in minimal and "--lr" not in minimal


def test_train_arguments_for_improving_an_adapter() -> None:
    args = build_parser().parse_args(panel.train_arguments("c.json", name="v2", parent="v1", steps=10))
    assert (args.parent, args.rank) == ("v1", None)
    with pytest.raises(ValueError, match="keeps the rank of its parent 'v1'"):
        panel.train_arguments("c.json", name="v2", parent="v1", rank=8)


@pytest.mark.parametrize(("options", "match"), [
    ({"name": "  "}, "give the new adapter a name, got '  '"),
    ({"name": "a", "steps": 0}, "steps must be > 0, got 0"),
    ({"name": "a", "lr": -1.0}, "learning rate must be > 0"),
    ({"name": "a", "device": "tpu"}, "got 'tpu'"),
])
def test_train_arguments_refuse_bad_settings(options, match) -> None:
    with pytest.raises(ValueError, match=match):
        panel.train_arguments("c.json", **options)


def test_train_module_defaults_are_the_engines() -> None:
    """The Train panel hard-codes its defaults (it may not import the engine at load): they must match it."""
    from TCURLoRALib.settings import TrainSettings

    tree = ast.parse((REPO_ROOT / "TCURLoRATrain" / "TCURLoRATrain.py").read_text(encoding="utf-8"))
    (node,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TCURLoRATrainParameterNode"]
    defaults = {}
    for field in node.body:
        if isinstance(field, ast.AnnAssign):
            for call in ast.walk(field.annotation):
                if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "Default":
                    defaults[field.target.id] = ast.literal_eval(call.args[0])
    engine = TrainSettings()
    assert defaults == {"rank": engine.NEW_RANK, "steps": engine.steps, "learningRate": engine.lr}


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
    text = panel.describe_adapter(CARD, "user")
    assert text.splitlines()[0] == "hippo (user adapter)"
    assert "Labels: left, right" in text and "Base: tiny" in text and "Improved from: hippo-v0" in text
    assert "Trained on 3 cases, 200 steps (cpu, 2 min 5 s)" in text
    assert "Validation mean Dice: 0.801 on 1 cases" in text and "left 0.812, right 0.790" in text


def test_describe_adapter_without_validation_says_so() -> None:
    card = {**CARD, "metrics": {}, "parent": None}
    text = panel.describe_adapter(card, "shipped")
    assert "Validation: none recorded" in text and "Improved from" not in text and "(shipped adapter)" in text


def test_adapter_choices_put_the_base_first_and_mark_shipped(tmp_path) -> None:
    from types import SimpleNamespace

    entries = [SimpleNamespace(name="a", card=CARD, source="shipped"), SimpleNamespace(name="b", card=CARD,
                                                                                       source="user")]
    choices = panel.adapter_choices(entries, "base tip")
    assert [(c.name, c.text) for c in choices] == [(None, "Base model only"), ("a", "a (shipped)"), ("b", "b")]
    assert choices[0].tooltip == "base tip" and "Labels: left, right" in choices[2].tooltip


# ------------------------------------------------------------------------------------------- progress


def test_progress_tracker_turns_events_into_percent_status_and_log() -> None:
    tracker = panel.ProgressTracker()
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
    tracker = panel.ProgressTracker()
    failed = tracker.update({"event": "finished", "state": "failed", "returncode": 2, "error": "bad volume"})
    assert failed.finished and failed.state == "failed" and failed.error == "bad volume"
    assert failed.status == "Failed: bad volume"
    no_message = tracker.update({"event": "finished", "state": "failed", "returncode": 3, "error": None})
    assert no_message.error == "exit code 3"
    cancelled = tracker.update({"event": "finished", "state": "cancelled", "returncode": 130, "error": None})
    assert cancelled.state == "cancelled" and cancelled.error is None and cancelled.status == "Cancelled"


@pytest.mark.parametrize(("seconds", "text"), [(None, ""), (0.4, "0 s"), (59, "59 s"), (75, "1 min 15 s"),
                                               (3700, "1 h 1 min"), (float("nan"), "")])
def test_format_duration(seconds, text) -> None:
    assert panel.format_duration(seconds) == text


def test_training_curves_collect_loss_and_validation_dice_rows() -> None:
    curves = panel.TrainingCurves()
    events = [{"event": "start", "task": "train", "total": 3},
              {"event": "metric", "name": "validation_mean_dice", "value": 0.2, "step": 0},
              {"event": "step", "step": 1, "total": 3, "loss": 1.5, "eta_s": 4.0},
              {"event": "step", "step": 2, "total": 3, "loss": 1.25, "eta_s": 2.0},
              {"event": "metric", "name": "validation_dice/left", "value": 0.9, "step": 2},
              {"event": "metric", "name": "validation_mean_dice", "value": 0.6, "step": 2},
              {"event": "step", "step": 3, "total": 3, "eta_s": 0.0}]
    added = [curves.add(event) for event in events]
    assert added == [False, True, True, True, False, True, False]
    np.testing.assert_array_equal(curves.loss_table(), [[1, 1.5], [2, 1.25]])
    np.testing.assert_array_equal(curves.dice_table(), [[0, 0.2], [2, 0.6]])
    assert curves.eta_s == 0.0
    assert panel.TrainingCurves().loss_table().shape == (0, 2)


# ------------------------------------------------------------------------------------------- labels


def test_default_label_mapping_matches_names_case_insensitively() -> None:
    mapping = panel.default_label_mapping(["Grey", "tumour"], ["background", "grey", "white"])
    assert mapping == {"Grey": "grey", "tumour": "tumour"}


def test_adapter_labels_keep_base_values_and_number_new_ones_after_them() -> None:
    labels, by_segment = panel.adapter_labels({"GM": "Grey", "lesion": "lesion", "edge": "lesion", "skip": ""},
                                              BASE_LABELS, {"lesion": (1.0, 0.0, 0.5)})
    assert [(label.value, label.name) for label in labels] == [(0, "background"), (1, "grey"), (3, "lesion")]
    assert labels[2].color == (255, 0, 128)
    assert by_segment == {"GM": BASE_LABELS[1], "lesion": labels[2], "edge": labels[2]}


def test_adapter_labels_equal_to_the_base_when_every_base_label_is_mapped() -> None:
    labels, _ = panel.adapter_labels({"grey": "grey", "white": "white"}, BASE_LABELS)
    assert labels == BASE_LABELS


@pytest.mark.parametrize(("mapping", "match"), [
    ({"a": "", "b": " "}, "no segment is mapped"),
    ({"a": "Background"}, "segment 'a' is mapped to the background 'Background'"),
])
def test_adapter_labels_refuse(mapping, match) -> None:
    with pytest.raises(ValueError, match=match):
        panel.adapter_labels(mapping, BASE_LABELS)


# ------------------------------------------------------------------------------------------- cases


def test_annotated_slices_are_the_k_indices_holding_a_voxel(tmp_path) -> None:
    array = np.zeros((6, 4, 5), np.uint16)
    array[1, 2, 3] = 1
    array[4, 0, 0] = 7
    assert panel.annotated_slices(array) == [1, 4]
    path = write_label_map(tmp_path / "l.nii.gz", array)
    assert panel.read_annotated_slices(path) == [1, 4]
    with pytest.raises(ValueError, match=r"3-D \(z, y, x\) array, got shape \(4, 5\)"):
        panel.annotated_slices(array[0])
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        panel.read_annotated_slices(tmp_path / "missing.nii.gz")


def test_cases_json_is_read_back_by_the_engine_with_annotated_slices(tmp_path) -> None:
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
    cases = [panel.CaseFiles(job / "a_image.nii.gz", job / "a_label.nii.gz", "a"),
             panel.CaseFiles(outside / "b_image.nii.gz", outside / "b_label.nii.gz", "b")]
    path = job / "cases.json"
    written = panel.write_cases_json(path, cases, annotated_slices_only=True)
    assert written[0] == {"image": "a_image.nii.gz", "label": "a_label.nii.gz", "name": "a",
                          "annotated_slices": {"axis": "z", "indices": [2, 3]}}
    assert written[1]["image"] == str((outside / "b_image.nii.gz").resolve())
    assert json.loads(path.read_text()) == written
    read = find_cases(path)
    assert [c.name for c in read] == ["a", "b"]
    assert read[0].image.resolve() == (job / "a_image.nii.gz").resolve()
    assert read[1].annotated_slices.indices == (1, 2)


def test_cases_json_without_annotated_slices_and_its_errors(tmp_path) -> None:
    label = write_label_map(tmp_path / "l.nii.gz", np.zeros((3, 3, 3)))
    case = panel.CaseFiles(tmp_path / "i.nii.gz", label, "empty")
    assert "annotated_slices" not in panel.write_cases_json(tmp_path / "c.json", [case])[0]
    with pytest.raises(ValueError, match="case 'empty' has no annotated voxel"):
        panel.write_cases_json(tmp_path / "c.json", [case], annotated_slices_only=True)
    with pytest.raises(ValueError, match=r"these repeat: \['empty'\]"):
        panel.write_cases_json(tmp_path / "c.json", [case, case])
    with pytest.raises(ValueError, match="no training cases"):
        panel.write_cases_json(tmp_path / "c.json", [])


# ------------------------------------------------------------------------------------------- installation


def test_requirements_file_is_found_in_the_checkout_and_the_installed_layout(tmp_path) -> None:
    assert panel.requirements_file(REPO_ROOT / "TCURLoRASegment") == REPO_ROOT / "Resources" / "requirements.txt"
    installed = tmp_path / "qt-scripted-modules"
    (installed / "Resources").mkdir(parents=True)
    (installed / "Resources" / "requirements.txt").write_text("monai\n")
    assert panel.requirements_file(installed) == installed / "Resources" / "requirements.txt"
    with pytest.raises(FileNotFoundError, match="requirements.txt not found"):
        panel.requirements_file(tmp_path / "lonely" / "module")


def test_the_module_cmake_installs_the_requirements_where_the_logic_looks() -> None:
    text = (REPO_ROOT / "TCURLoRASegment" / "CMakeLists.txt").read_text()
    assert "${CMAKE_CURRENT_SOURCE_DIR}/../Resources/requirements.txt" in text
    assert "${Slicer_QTSCRIPTEDMODULES_LIB_DIR}/Resources/requirements.txt" in text
    assert "DESTINATION ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}/Resources" in text


def test_read_requirements_drops_comments_and_refuses_torch(tmp_path) -> None:
    listed = panel.read_requirements(REPO_ROOT / "Resources" / "requirements.txt")
    assert listed and all(not line.startswith("#") for line in listed)
    assert any(line.startswith("monai") for line in listed)
    bad = tmp_path / "r.txt"
    bad.write_text("# x\nnumpy>=1\ntorch>=2 ; python_version>'3'\n")
    with pytest.raises(ValueError, match="lists torch"):
        panel.read_requirements(bad)


def test_missing_modules_uses_import_names() -> None:
    looked_up = []

    def find_spec(name):
        looked_up.append(name)
        return None if name == "nrrd" else object()

    assert panel.missing_modules(["pynrrd>=1.0", "SimpleITK>=2.3", "my-package[extra]"], find_spec) == ["pynrrd>=1.0"]
    assert looked_up == ["nrrd", "SimpleITK", "my_package"]
    assert panel.missing_modules(panel.read_requirements(REPO_ROOT / "Resources" / "requirements.txt")) == []


def test_python_for_jobs_prefers_python_slicer(tmp_path) -> None:
    assert panel.python_for_jobs("/x/Slicer", lambda name: "/bin/PythonSlicer") == "/bin/PythonSlicer"
    (tmp_path / "PythonSlicer").write_text("")
    assert panel.python_for_jobs(str(tmp_path / "SlicerApp-real"), lambda name: None) == str(tmp_path / "PythonSlicer")
    assert panel.python_for_jobs(sys.executable, lambda name: None) == sys.executable


# ------------------------------------------------------------------------------------------- MRML export


def test_export_cases_writes_label_maps_and_annotated_slices_from_real_mrml(tmp_path) -> None:
    slicer = pytest.importorskip("slicer", reason="the slicer-core wheel gives real MRML")
    import vtk
    from vtk.util import numpy_support

    scene = slicer.vtkMRMLScene()
    shape = (6, 7, 8)
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "T1")
    image = vtk.vtkImageData()
    image.SetDimensions(shape[2], shape[1], shape[0])
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.arange(np.prod(shape), dtype=np.int16),
                                                                deep=True))
    volume.SetAndObserveImageData(image)
    volume.SetSpacing(1.0, 1.0, 2.0)
    segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "labels")
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    mask = np.zeros(shape, np.uint8)
    mask[2, 1:3, 1:3] = 1
    mask[4, 3:5, 3:5] = 1
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "mask")
    mask_image = vtk.vtkImageData()
    mask_image.SetDimensions(shape[2], shape[1], shape[0])
    mask_image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(mask.ravel(), deep=True))
    labelmap.SetAndObserveImageData(mask_image)
    labelmap.SetSpacing(1.0, 1.0, 2.0)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation_node)
    segment = segmentation_node.GetSegmentation().GetNthSegment(0)
    segment.SetName("lesion")
    segment.SetColor(1.0, 0.0, 0.0)

    assert panel.segment_colors(segmentation_node) == {"lesion": (1.0, 0.0, 0.0)}
    labels, by_segment = panel.adapter_labels({"lesion": "lesion"}, BASE_LABELS,
                                              panel.segment_colors(segmentation_node))
    assert labels[1] == Label(3, "lesion", (255, 0, 0))
    path = panel.export_cases([(volume, segmentation_node)], by_segment, tmp_path, annotated_slices_only=True)
    (entry,) = json.loads(path.read_text())
    assert entry["annotated_slices"] == {"axis": "z", "indices": [2, 4]}
    assert entry["name"] == "case01 T1"
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / entry["label"])))
    np.testing.assert_array_equal(written, mask * 3)
    with pytest.raises(ValueError, match=r"has none of the mapped segments \['tumour'\]"):
        panel.export_cases([(volume, segmentation_node)], {"tumour": labels[1]}, tmp_path)
