"""Dice and HD95 against answers computed by hand, empty masks, grids, label inference and the writers."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from TCURLoRALib import volumes
from TCURLoRALib.cards import Label
from TCURLoRALib.metrics import dice, evaluate, format_table, label_metrics, summarize, write_csv, write_json

SPACING = (0.8, 1.2, 3.0)  # x, y, z in mm
CUBE = Label(3, "cube", (200, 100, 50))
OTHER = Label(9, "other", (10, 20, 30))
BACKGROUND = Label(0, "background", (0, 0, 0))


def cubes(offset_z: int) -> tuple:
    """Two 10^3-voxel cubes (label 3), the second ``offset_z`` voxels further along z; arrays (z, y, x)."""
    prediction = np.zeros((20, 16, 16), np.uint8)
    reference = prediction.copy()
    prediction[3:13, 3:13, 3:13] = CUBE.value
    reference[3 + offset_z:13 + offset_z, 3:13, 3:13] = CUBE.value
    return prediction, reference


def write(path: Path, array: np.ndarray, spacing=SPACING, origin=(0.0, 0.0, 0.0)) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))
    return path


# ---------------------------------------------------------------------------------------------------- known answers


def test_identical_cubes() -> None:
    prediction, _ = cubes(0)
    (result,) = label_metrics(prediction, prediction, SPACING, [BACKGROUND, CUBE])
    assert (result.dice, result.hd95_mm, result.note) == (1.0, 0.0, "")
    assert result.prediction_voxels == result.reference_voxels == 1000


def test_cubes_offset_along_the_coarse_axis() -> None:
    # Offset k = 2 voxels along z (3 mm): overlap 8 of 10 layers, Dice = 2 * 800 / 2000 = 0.8.
    # Surfaces: 488 voxels each (10^3 - 8^3). The 100 voxels of the cube's end face lie k * 3 mm = 6 mm from the
    # other surface (its end face, straight along z); that is 20 % > 5 % of them, and no surface voxel is farther
    # (in-plane distances are at most 4 * 1.2 = 4.8 mm), so the 95th percentile is 6 mm in both directions.
    # In voxels it would be 2, with isotropic 1 mm spacing 2 mm: the value checks that spacing is applied per axis.
    prediction, reference = cubes(2)
    (result,) = label_metrics(prediction, reference, SPACING, [CUBE])
    assert result.dice == pytest.approx(0.8, rel=1e-6)
    assert result.hd95_mm == pytest.approx(6.0, rel=1e-6)


def test_hd95_is_the_95th_percentile_not_the_maximum() -> None:
    # Two 10 x 10 one-voxel-thick slabs in one z plane, the prediction 3 voxels further along x (0.8 mm), plus one
    # stray predicted voxel far away. Every slab voxel is a surface voxel; in each direction 30 of ~100 are 1, 2 or
    # 3 voxels from the other slab (10 each) and the farthest 10 % are at 3 * 0.8 = 2.4 mm: HD95 = 2.4 mm, while
    # the maximum (the stray voxel) is over 20 mm. Dice = 2 * 70 / (101 + 100).
    reference = np.zeros((12, 30, 30), np.uint8)
    prediction = reference.copy()
    reference[4, 5:15, 5:15] = CUBE.value
    prediction[4, 5:15, 8:18] = CUBE.value
    prediction[10, 28, 28] = CUBE.value
    (result,) = label_metrics(prediction, reference, SPACING, [CUBE])
    assert result.hd95_mm == pytest.approx(2.4, rel=1e-6)
    assert result.dice == pytest.approx(140 / 201, rel=1e-6)


def test_evaluate_and_training_validation_share_one_dice_and_its_rule_for_absent_labels() -> None:
    """One rule everywhere: a label absent from both maps has Dice 1.0 (``metrics.dice``), in ``evaluate`` and in
    the validation Dice a training writes into its card."""
    from TCURLoRALib.validation import dice_per_label

    prediction, reference = cubes(offset_z=2)
    prediction[15:17, 0:2, 0:2] = 4  # label 4: predicted only; label 9 (OTHER): in neither
    labels = [BACKGROUND, CUBE, Label(4, "stray", (1, 1, 1)), OTHER]
    evaluated = [item.dice for item in label_metrics(prediction, reference, SPACING, labels)]
    # Validation works on channel indices 0..C-1: the same maps with values renumbered as channels.
    channel = {0: 0, CUBE.value: 1, 4: 2, OTHER.value: 3}
    as_channels = [np.vectorize(channel.get)(array).astype(np.int64) for array in (prediction, reference)]
    validated = dice_per_label(as_channels[0], as_channels[1], len(labels))
    assert evaluated == validated == [pytest.approx(0.8, rel=1e-12), 0.0, 1.0]
    assert dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0
    assert dice(np.array([1, 1, 0, 0], bool), np.array([0, 1, 1, 1], bool)) == pytest.approx(2 * 1 / 5)


@pytest.mark.parametrize("in_prediction, in_reference, dice, note", [
    (False, False, 1.0, "absent from prediction and reference"),
    (True, False, 0.0, "absent from reference"),
    (False, True, 0.0, "absent from prediction"),
])
def test_empty_masks(in_prediction: bool, in_reference: bool, dice: float, note: str) -> None:
    full, _ = cubes(0)
    empty = np.zeros_like(full)
    (result,) = label_metrics(full if in_prediction else empty, full if in_reference else empty, SPACING, [CUBE])
    assert (result.dice, result.hd95_mm, result.note) == (dice, None, note)


def test_labels_are_evaluated_separately() -> None:
    prediction, reference = cubes(2)
    prediction[15:18, 1:4, 1:4] = OTHER.value
    reference[15:18, 1:4, 1:4] = OTHER.value
    cube, other = label_metrics(prediction, reference, SPACING, [BACKGROUND, CUBE, OTHER])
    assert (cube.value, cube.dice) == (3, pytest.approx(0.8, rel=1e-6))
    assert (other.value, other.dice, other.hd95_mm) == (9, 1.0, 0.0)


# ---------------------------------------------------------------------------------------------------- files


def test_evaluate_files_infers_labels_and_writes_json_csv_table(tmp_path: Path) -> None:
    prediction, reference = cubes(2)
    shifted = write(tmp_path / "shifted.nii.gz", prediction), write(tmp_path / "ref1.nii.gz", reference)
    reference_two = reference.copy()
    reference_two[15:18, 1:4, 1:4] = OTHER.value
    same = write(tmp_path / "same.nrrd", reference), write(tmp_path / "ref2.nrrd", reference_two)
    events = []
    cases = evaluate([shifted[0], same[0]], [shifted[1], same[1]],
                     progress=lambda event, **fields: events.append(event))
    assert events == ["start", "step", "step", "done"]
    assert [case.case for case in cases] == ["shifted", "same"]
    # Labels inferred from the references: 3 (both) and 9 (the second only), named as plain volumes name them.
    assert [(item.value, item.name) for item in cases[0].labels] == [(3, "Segment_3"), (9, "Segment_9")]
    assert cases[0].labels[0].dice == pytest.approx(0.8, rel=1e-6)
    assert cases[0].labels[1].note == "absent from prediction and reference"
    assert cases[1].labels[1].note == "absent from prediction"
    assert cases[0].mean_dice == pytest.approx(0.9, rel=1e-6)  # (0.8 + 1.0) / 2
    assert cases[0].mean_hd95_mm == pytest.approx(6.0, rel=1e-6)  # the label without HD95 is left out

    mean_cube, mean_other = summarize(cases)
    assert mean_cube["dice"] == pytest.approx(0.9, rel=1e-6) and mean_cube["hd95_mm"] == pytest.approx(3.0)
    assert (mean_other["dice"], mean_other["hd95_mm"], mean_other["hd95_count"]) == (0.5, None, 0)

    data = json.loads(write_json(tmp_path / "metrics.json", cases).read_text())
    assert data["cases"][1]["labels"][1] == {"value": 9, "name": "Segment_9", "dice": 0.0, "hd95_mm": None,
                                             "prediction_voxels": 0, "reference_voxels": 27,
                                             "note": "absent from prediction"}
    assert data["mean"][1]["hd95_mm"] is None

    with open(write_csv(tmp_path / "metrics.csv", cases), newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [(row["case"], row["label_value"]) for row in rows] == [
        ("shifted", "3"), ("shifted", "9"), ("same", "3"), ("same", "9"), ("mean", "3"), ("mean", "9")]
    assert float(rows[0]["hd95_mm"]) == pytest.approx(6.0) and rows[1]["hd95_mm"] == ""

    table = format_table(cases).splitlines()
    assert table[0].split() == ["case", "label", "Dice", "HD95", "mm", "note"]
    assert table[2].split()[:4] == ["shifted", "Segment_3", "0.8000", "6.00"]
    assert table[3].split()[:4] == ["shifted", "Segment_9", "1.0000", "-"]
    assert table[-1].split()[:4] == ["mean", "Segment_9", "0.5000", "-"]


def test_given_labels_and_slicer_segmentation_names(tmp_path: Path) -> None:
    prediction, reference = cubes(0)
    grid = volumes.Geometry(tuple(reversed(reference.shape)), SPACING, (0.0, 0.0, 0.0), np.eye(3))
    volumes.write_segmentation(tmp_path / "ref.seg.nrrd", reference, grid, [volumes.Segment(3, "liver", (1, 2, 3))])
    write(tmp_path / "pred.nii.gz", prediction)
    (inferred,) = evaluate([tmp_path / "pred.nii.gz"], [tmp_path / "ref.seg.nrrd"])
    assert [(item.name, item.dice) for item in inferred.labels] == [("liver", 1.0)]
    (given,) = evaluate([tmp_path / "pred.nii.gz"], [tmp_path / "ref.seg.nrrd"], [BACKGROUND, CUBE, OTHER],
                        case_names=["patient 1"])
    assert given.case == "patient 1"
    assert [(item.name, item.dice) for item in given.labels] == [("cube", 1.0), ("other", 1.0)]


# ---------------------------------------------------------------------------------------------------- errors


def test_different_grids_are_refused_naming_both(tmp_path: Path) -> None:
    prediction, reference = cubes(0)
    write(tmp_path / "pred.nii.gz", prediction)
    write(tmp_path / "ref.nii.gz", reference, spacing=(0.8, 1.2, 2.0))
    with pytest.raises(ValueError, match=r"prediction '.*pred\.nii\.gz' and reference '.*ref\.nii\.gz' are not on "
                                         r"the same grid: the prediction has size \(16, 16, 20\), spacing \(0\.8, "
                                         r"1\.2, 3\).*the reference has .*spacing \(0\.8, 1\.2, 2\)"):
        evaluate([tmp_path / "pred.nii.gz"], [tmp_path / "ref.nii.gz"])


def test_bad_evaluate_arguments(tmp_path: Path) -> None:
    prediction, reference = cubes(0)
    write(tmp_path / "pred.nii.gz", prediction)
    write(tmp_path / "empty.nii.gz", np.zeros_like(reference))
    with pytest.raises(ValueError, match=r"got 1 predictions but 2 references"):
        evaluate([tmp_path / "pred.nii.gz"], [tmp_path / "pred.nii.gz"] * 2)
    with pytest.raises(FileNotFoundError, match=r"no such label map: '.*missing\.nii\.gz'"):
        evaluate([tmp_path / "pred.nii.gz"], [tmp_path / "missing.nii.gz"])
    with pytest.raises(ValueError, match=r"no label to evaluate: the references .* hold no labelled voxel"):
        evaluate([tmp_path / "pred.nii.gz"], [tmp_path / "empty.nii.gz"])
    with pytest.raises(ValueError, match=r"no label to evaluate: only the background \(value 0\) was given"):
        evaluate([tmp_path / "pred.nii.gz"], [tmp_path / "pred.nii.gz"], [BACKGROUND])
    with pytest.raises(ValueError, match=r"prediction and reference must be 3-D arrays of one shape, got "
                                         r"\(20, 16, 16\) and \(20, 16\)"):
        label_metrics(prediction, reference[:, :, 0], SPACING, [CUBE])
