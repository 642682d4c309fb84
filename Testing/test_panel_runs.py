"""The panels' logic on real MRML nodes (the slicer-core wheel) and real background jobs: node descriptions, the
training chart, the self-tests' synthetic case, and segmentation and training runs from the scene to the engine and
back (a tiny base model from Testing/synthetic.py)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="the slicer-core wheel gives real MRML")
import vtk  # noqa: E402  (slicer-core brings its own vtk)
from vtk.util import numpy_support  # noqa: E402

from synthetic import BASE_LABELS, make_tiny_base  # noqa: E402
from TCURLoRALib.cards import Label  # noqa: E402
from TCURLoRALib.panels import caselist, engine, export, nodes, runs, selftest, tracking  # noqa: E402

TARGET = "target"


@pytest.fixture()
def scene():
    return slicer.vtkMRMLScene()


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_base(tmp_path_factory.mktemp("base") / "base.safetensors")


@pytest.fixture()
def home(tmp_path: Path, monkeypatch) -> Path:
    """A private adapter folder for this test and the jobs it starts."""
    monkeypatch.setenv("TCURLORA_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def column(table_node, name: str) -> list[float]:
    array = table_node.GetTable().GetColumnByName(name)
    return [array.GetValue(i) for i in range(array.GetNumberOfTuples())]


# ------------------------------------------------------------------------------------------- nodes


def test_volume_and_segmentation_descriptions(scene) -> None:
    volume, segmentation = selftest.synthetic_case(scene, 1, "blob", shape=(4, 5, 6))
    assert nodes.describe_volume(volume) == "6 x 5 x 4 voxels, 2.00 x 2.00 x 2.00 mm"
    assert nodes.volume_summary(volume) == (True, "6 x 5 x 4 voxels, 2.00 x 2.00 x 2.00 mm")
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    assert nodes.volume_summary(empty) == (False, "The volume holds no image data")
    assert nodes.volume_summary(None) == (False, "No volume selected")
    with pytest.raises(ValueError, match="'empty' holds no image data"):
        nodes.describe_volume(empty)

    assert nodes.describe_segmentation(segmentation) == "1 segment: blob"
    segmentation.GetSegmentation().AddEmptySegment("wm", "WM", [0.0, 0.5, 1.0])
    assert nodes.describe_segmentation(segmentation) == "2 segments: blob, WM"
    assert nodes.segment_colors(segmentation)["WM"] == (0.0, 0.5, 1.0)
    assert nodes.describe_segmentation(scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "none")) == "no segments"
    _, other = selftest.synthetic_case(scene, 2, "GM", shape=(4, 5, 6))
    other.GetSegmentation().AddEmptySegment("wm2", "WM")
    assert nodes.segment_names([segmentation, other]) == ["blob", "WM", "GM"]
    rows = caselist.case_rows([(volume, segmentation)])
    assert rows == [caselist.CaseRow("case1", "labels1", "2 segments: blob, WM")]


def test_synthetic_case_is_a_blob_and_its_segment(scene) -> None:
    volume, segmentation = selftest.synthetic_case(scene, 3, TARGET)
    voxels = numpy_support.vtk_to_numpy(volume.GetImageData().GetPointData().GetScalars()).reshape(24, 28, 32)
    assert volume.GetSpacing() == (2.0, 2.0, 2.0) and voxels.max() > 80
    assert nodes.segment_names([segmentation]) == [TARGET]
    assert scene.GetNodesByClass("vtkMRMLLabelMapVolumeNode").GetNumberOfItems() == 0, "the helper node is gone"


def test_training_chart_has_a_loss_and_a_dice_series_and_follows_the_curves(scene) -> None:
    chart = tracking.TrainingChart(scene, "mine")
    assert chart.chart_node.GetName() == "mine training" and chart.chart_node.GetNumberOfPlotSeriesNodes() == 2
    series = [chart.chart_node.GetNthPlotSeriesNode(i) for i in range(2)]
    assert [s.GetYColumnName() for s in series] == ["loss", "dice"]
    assert {s.GetPlotType() for s in series} == {slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter}
    assert column(chart.table_nodes["loss"], "loss") == []
    curves = tracking.TrainingCurves()
    for event in ({"event": "step", "step": 1, "loss": 0.75}, {"event": "step", "step": 2, "loss": 0.5},
                  {"event": "metric", "name": "validation_mean_dice", "value": 0.4, "step": 2}):
        curves.add(event)
    chart.update(curves)
    assert column(chart.table_nodes["loss"], "step") == [1, 2] and column(chart.table_nodes["loss"], "loss") == [
        0.75, 0.5]
    assert column(chart.table_nodes["dice"], "dice") == [0.4]


# ------------------------------------------------------------------------------------------- export


def test_export_cases_writes_label_maps_and_annotated_slices_from_real_mrml(scene, tmp_path: Path) -> None:
    shape = (6, 7, 8)
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "T1")
    image = vtk.vtkImageData()
    image.SetDimensions(shape[2], shape[1], shape[0])
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.arange(np.prod(shape), dtype=np.int16), deep=True))
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

    base = [Label(0, "background", (0, 0, 0)), Label(1, "grey", (1, 1, 1)), Label(2, "white", (2, 2, 2))]
    labels, by_segment = export.adapter_labels({"lesion": "lesion"}, base, nodes.segment_colors(segmentation_node))
    assert labels[1] == Label(3, "lesion", (255, 0, 0))
    path = export.export_cases([(volume, segmentation_node)], by_segment, tmp_path, annotated_slices_only=True)
    (entry,) = json.loads(path.read_text())
    assert entry["annotated_slices"] == {"axis": "z", "indices": [2, 4]}
    assert entry["name"] == "case01 T1"
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / entry["label"])))
    np.testing.assert_array_equal(written, mask * 3)
    with pytest.raises(ValueError, match=r"has none of the mapped segments \['tumour'\]"):
        export.export_cases([(volume, segmentation_node)], {"tumour": labels[1]}, tmp_path)


# ------------------------------------------------------------------------------------------- runs


def test_segmentation_run_from_a_volume_node_to_named_segments(scene, tiny_base: Path) -> None:
    volume, _ = selftest.synthetic_case(scene, 1, TARGET)
    run = runs.SegmentationRun.start(volume, None, device="cpu", overlap=0.0, base=tiny_base)
    work = run.job.work_dir
    assert run.wait(timeout=300) == "done", run.failure()
    assert run.outcome.finished and run.outcome.state == "done"
    existing = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "fill me")
    existing.GetSegmentation().AddEmptySegment("old", "old")
    node = run.finish(existing)
    assert node is existing
    assert nodes.segment_names([node]) == [label.name for label in BASE_LABELS[1:]]
    assert node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()).GetID() == volume.GetID()
    assert not run.output_folder.exists() and not work.exists(), "both temporary folders are gone"


def test_segment_panel_options_reach_the_engine_and_its_refusal_reaches_the_panel(scene, tiny_base: Path) -> None:
    """"Keep largest piece" off and "Mirror and average" on: the job runs ``--postprocess none --tta``; the tiny
    base's labels hold no left/right pair, so the engine refuses the mirroring and the run says why."""
    volume, _ = selftest.synthetic_case(scene, 1, TARGET)
    run = runs.SegmentationRun.start(volume, None, device="cpu", overlap=0.0, base=tiny_base, postprocess="none",
                                     tta=True)
    arguments = run.job.arguments
    assert arguments[arguments.index("--postprocess") + 1] == "none" and "--tta" in arguments
    assert run.wait(timeout=300) == "failed"
    assert "--tta" in run.failure() and "left/right" in run.failure()
    run.discard()


def test_an_unknown_adapter_is_refused_before_anything_is_written(scene, tiny_base: Path, home: Path) -> None:
    volume, _ = selftest.synthetic_case(scene, 1, TARGET)
    with pytest.raises(FileNotFoundError, match="no adapter named 'gone'"):
        runs.SegmentationRun.start(volume, "gone", base=tiny_base)
    with pytest.raises(ValueError, match="Select an input volume"):
        runs.SegmentationRun.start(None, None, base=tiny_base)


def test_training_run_from_scene_cases_to_a_stored_adapter_with_its_chart(scene, tiny_base: Path, home: Path) -> None:
    cases = [selftest.synthetic_case(scene, seed, TARGET) for seed in (1, 2)]
    run = runs.TrainingRun.start(cases, {TARGET: TARGET}, " blob ", base=tiny_base, steps=2, device="cpu",
                                 annotated_slices_only=True, seed=0, minutes=30.0)
    assert run.name == "blob"
    labels_json = json.loads((run.job.work_dir / "labels.json").read_text())
    # Only the mapped labels: the base's others are not annotated here, so they are not taught as background either.
    assert [(label["value"], label["name"]) for label in labels_json] == [(0, "background"), (3, TARGET)]
    run.chart = tracking.TrainingChart(scene, run.name)
    assert run.wait(timeout=600) == "done", run.failure()
    assert (home / "adapters" / "blob.safetensors").is_file()
    card = engine.adapter_store().find("blob").card
    assert card.training["steps"] == 2 and card.labels[-1].name == TARGET
    assert (card.training["minutes"], card.training["stopped_by"]) == (30.0, "steps")
    assert column(run.chart.table_nodes["loss"], "step") == [1, 2]
    assert [choice.name for choice in engine.list_adapters().choices if choice.name == "blob"] == ["blob"]
    with pytest.raises(FileExistsError, match="'BLOB' exists already"):
        runs.TrainingRun.start(cases, {TARGET: TARGET}, "BLOB", base=tiny_base, steps=2)


def test_mirroring_labels_without_a_left_right_pair_fails_with_the_engines_reason(scene, tiny_base: Path,
                                                                                   home: Path) -> None:
    cases = [selftest.synthetic_case(scene, seed, TARGET) for seed in (1, 2)]
    run = runs.TrainingRun.start(cases, {TARGET: TARGET}, "mirrored", base=tiny_base, steps=2, device="cpu",
                                 mirror=True)
    assert "--mirror" in run.job.arguments
    assert run.wait(timeout=300) == "failed"
    assert "--mirror needs left/right label pairs" in run.failure()
    assert not (home / "adapters" / "mirrored.safetensors").exists()


def test_a_script_that_stops_waiting_does_not_leave_the_job_running(scene, tiny_base: Path, home: Path) -> None:
    cases = [selftest.synthetic_case(scene, seed, TARGET) for seed in (1, 2)]
    run = runs.TrainingRun.start(cases, {TARGET: TARGET}, "slow", base=tiny_base, steps=5000, device="cpu")
    assert run.wait(timeout=0) == "cancelled"
    assert run.job.finished and (run.outcome.state, run.outcome.status) == ("cancelled", "Cancelled")
    assert not (home / "adapters" / "slow.safetensors").exists()
