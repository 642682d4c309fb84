"""Training: cases and label mapping, the masked loss, adapter training end to end, seeds, parents, pretraining."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from synthetic import BASE_LABELS, TARGET, case_arrays, make_tiny_base, tiny_card_fields, write_case
from TCURLoRALib import tensorfiles, volumes
from TCURLoRALib.adapter import AdaptedUNETR
from TCURLoRALib.basemodel import load_base
from TCURLoRALib.cards import ModelCard
from TCURLoRALib.cases import (IGNORE_INDEX, IGNORE_VALUE, AnnotatedSlices, LabelMapping, TrainingCase, find_cases,
                               parse_annotated_slices, prepare_case, prepare_cases)
from TCURLoRALib.progress import Cancelled
from TCURLoRALib.tcur import TCURLoRAConfig, TCURLoRAModel
from TCURLoRALib.loss import masked_dice_ce
from TCURLoRALib.train import pretrain, train_adapter
from TCURLoRALib.validation import split_cases

TARGET_LABELS = [BASE_LABELS[0], TARGET]
# At 1.6 mm a synthetic case covers about 30 x 32 x 29 voxels of the 2 mm model grid: one sliding window instead of
# 8, which keeps validation cheap where what is learnt does not matter.
SMALL_SPACING = (1.6, 1.6, 1.6)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("train")
    small = tmp_path_factory.mktemp("small")
    return {"base": make_tiny_base(folder / "base.safetensors"),
            "cases": [write_case(folder, seed) for seed in range(3)], "small": write_case(small, 3, SMALL_SPACING)}


def tiny_card() -> ModelCard:
    return ModelCard.from_json({**tiny_card_fields(), "fingerprint": "0" * 64})


def adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    return tensorfiles.load(path, kind="adapter")[0]


# ---------------------------------------------------------------- end to end


def test_adapter_learns_a_label_the_base_never_saw(data: dict, tmp_path: Path) -> None:
    """Honest baseline: the starting state, i.e. the frozen base with a fresh untrained head for the new label set
    (the base itself has no "target" output at all). Both Dice values are on a case that is not trained on, and
    validate_every > steps, so no state was chosen by it but the final one or the start (best_step says which)."""
    card = train_adapter(data["base"], data["cases"][:2], TARGET_LABELS, tmp_path / "target.safetensors", steps=12,
                         lr=1e-2, batch_size=1, unmapped="background", validation=[data["cases"][2]],
                         validate_every=1000, seed=0)
    validation = card.metrics["validation"]
    before, after = validation["initial"]["dice"]["target"], validation["dice"]["target"]
    assert validation["step"] == 12 and after > 0.4 and after > before + 0.3, (before, after)
    assert card.training["cases"] == 2 and card.training["steps"] == 12 and card.training["seed"] == 0
    # The card keeps how the case structures were mapped and which cases validated.
    assert card.training["label_mapping"] == [
        {"value": 1, "segment": "Segment_1", "label": "background", "rule": "--unmapped background"},
        {"value": 2, "segment": "Segment_2", "label": "background", "rule": "--unmapped background"},
        {"value": 5, "segment": "Segment_5", "label": "target", "rule": "same value"}]
    assert card.training["validation_split"] == {"train": ["case0_image", "case1_image"],
                                                 "validation": ["case2_image"],
                                                 "rule": "validation cases given with --validation"}
    assert card.training["trainable"]["head"] > 0  # new label set: the head trained
    # U itself trained: it left U0 in every group, so its gradient was non-zero, and ΔW != 0.
    tensors = adapter_tensors(tmp_path / "target.safetensors")
    for group in card.groups:
        assert not torch.equal(tensors[f"tcur.{group}.u"], tensors[f"tcur.{group}.u_init"]), group
    adapted = AdaptedUNETR(load_base(data["base"]))
    adapted.set_adapter(tmp_path / "target.safetensors")
    assert adapted.labels == TARGET_LABELS
    with torch.no_grad():
        assert all(float(group.delta_weight().abs().max()) > 0 for group in adapted.adapter.groups.values())


def test_u_receives_a_gradient_from_the_training_loss(data: dict) -> None:
    base = load_base(data["base"])
    model = TCURLoRAModel(base.model, TCURLoRAConfig(rank=4))
    model.mark_trainable(train_head=False)
    target = torch.from_numpy(case_arrays(0)[1][:32, :32, :32].astype(np.int64)).clamp(max=2)[None]
    masked_dice_ce(model(torch.randn(1, 1, 32, 32, 32)), target).backward()
    for name, group in model.groups.items():
        assert group.u.grad is not None and float(group.u.grad.abs().max()) > 0, name


def test_same_seed_gives_a_bit_identical_adapter(data: dict, tmp_path: Path) -> None:
    settings = dict(unmapped="background", validation="none", steps=2, seed=3, groups=["attention"], rank=4,
                    threads=1)
    for name in ("a", "b"):
        train_adapter(data["base"], data["cases"][:2], TARGET_LABELS, tmp_path / f"{name}.safetensors", **settings)
    first, second = adapter_tensors(tmp_path / "a.safetensors"), adapter_tensors(tmp_path / "b.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert not torch.equal(first["tcur.attention.u"], first["tcur.attention.u_init"])  # not trivially equal


def test_continuing_an_adapter_starts_from_it_and_records_the_parent(data: dict, tmp_path: Path) -> None:
    parent_path = tmp_path / "parent.safetensors"
    train_adapter(data["base"], data["cases"][:1], TARGET_LABELS, parent_path, unmapped="background", steps=1,
                  groups=["attention", "mlp_up"], rank=4)
    child = train_adapter(data["base"], data["cases"][:1], None, tmp_path / "child.safetensors", steps=0,
                          unmapped="background", parent_adapter=parent_path)
    assert child.parent == "parent"
    assert child.labels == TARGET_LABELS and child.rank == 4 and child.groups == ["attention", "mlp_up"]
    parent, continued = adapter_tensors(parent_path), adapter_tensors(tmp_path / "child.safetensors")
    assert parent.keys() == continued.keys()
    assert all(torch.equal(parent[key], continued[key]) for key in parent)  # 0 steps: exactly the parent's state
    # Back to the base's labels: the base's own head (frozen), none in the file.
    back = train_adapter(data["base"], data["cases"][:1], BASE_LABELS, tmp_path / "back.safetensors", steps=1,
                         unmapped="background", parent_adapter=parent_path)
    assert back.training["trainable"]["head"] == 0
    assert not any(key.startswith("out.") for key in adapter_tensors(tmp_path / "back.safetensors"))
    with pytest.raises(ValueError, match=r"keeps its settings; got --rank 8 \(parent: 4\)"):
        train_adapter(data["base"], data["cases"][:1], None, tmp_path / "bad.safetensors", steps=0, rank=8,
                      unmapped="background", parent_adapter=parent_path)


def test_a_cancelled_training_writes_nothing(data: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()

    def cancel_at_step_two(event: str, **fields) -> None:
        if event == "step" and fields["step"] == 2:
            raise Cancelled("SIGTERM")

    with pytest.raises(Cancelled):
        train_adapter(data["base"], data["cases"][:1], TARGET_LABELS, out / "a.safetensors", steps=5,
                      unmapped="background", groups=["attention"], rank=4, progress=cancel_at_step_two)
    assert list(out.iterdir()) == []


def test_pretrain_writes_a_loadable_base_with_validation_dice(data: dict, tmp_path: Path) -> None:
    out = tmp_path / "pretrained.safetensors"
    events = []
    card = pretrain([data["small"]], tiny_card_fields("pre"), out, steps=2, validation=[data["small"]],
                    label_map={"5": "white matter"}, progress=lambda event, **fields: events.append(event))
    base = load_base(out)
    assert base.card == card and base.card.name == "pre"
    assert set(card.metrics["validation"]["dice"]) == {"grey matter", "white matter"}
    assert card.provenance["training"]["steps"] == 2
    # The split and the mapping are reported before the first step.
    assert events[:3] == ["log", "log", "start"] and events.count("step") == 2 and events[-1] == "done"


# ---------------------------------------------------------------- loss and sparse annotation


def test_masked_voxels_do_not_change_the_loss() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, 8, generator=generator)
    target = torch.randint(0, 3, (2, 8, 8, 8), generator=generator)
    target[:, :4] = IGNORE_INDEX
    loss = masked_dice_ce(logits, target)
    # What a masked voxel's label would be, or what the network predicts there, does not matter.
    changed_logits = logits.clone()
    changed_logits[:, :, :4] = torch.randn(2, 3, 4, 8, 8, generator=generator) * 10
    assert torch.allclose(masked_dice_ce(changed_logits, target), loss, rtol=0, atol=1e-6)
    # An annotated voxel's label does.
    relabelled = target.clone()
    relabelled[0, 6, 6, 6] = (int(relabelled[0, 6, 6, 6]) + 1) % 3
    assert not torch.allclose(masked_dice_ce(logits, relabelled), loss)
    # Same as the unmasked loss on the annotated half alone (with batch Dice, both sum over the same voxels).
    assert torch.allclose(loss, masked_dice_ce(logits[:, :, 4:], target[:, 4:]), atol=1e-6)


def test_annotated_slices_and_the_ignore_value_leave_other_voxels_out(tmp_path: Path) -> None:
    image_path, label_path = write_case(tmp_path, 0)  # 2 mm like the model grid, so no resampling
    mapping = LabelMapping(BASE_LABELS + [TARGET])
    sparse = prepare_case(TrainingCase(image_path, label_path, annotated_slices=AnnotatedSlices("z", (5, 17))),
                          tiny_card(), mapping)
    annotated_z = np.flatnonzero((sparse.target != IGNORE_INDEX).any(axis=(1, 2)))
    assert annotated_z.tolist() == [5, 17]  # the model grid's z is the image's z here (RAS keeps S)
    labels = sitk.ReadImage(str(label_path))
    array = sitk.GetArrayFromImage(labels)
    array[:10] = IGNORE_VALUE
    marked = sitk.GetImageFromArray(array)
    marked.CopyInformation(labels)
    sitk.WriteImage(marked, str(tmp_path / "marked.nii.gz"))
    dense = prepare_case(TrainingCase(image_path, tmp_path / "marked.nii.gz"), tiny_card(), mapping)
    assert (dense.target[:10] == IGNORE_INDEX).all() and (dense.target[10:] != IGNORE_INDEX).all()
    assert parse_annotated_slices("z:3, 10,17") == AnnotatedSlices("z", (3, 10, 17))
    with pytest.raises(ValueError, match=r"annotated slices \[99\] lie outside the image, which has 36 slices"):
        prepare_case(TrainingCase(image_path, label_path, annotated_slices=AnnotatedSlices("z", (3, 99))),
                     tiny_card(), mapping)


# ---------------------------------------------------------------- label mapping and bad input


def test_unmapped_label_values_are_listed(tmp_path: Path) -> None:
    case = TrainingCase(*write_case(tmp_path, 0))
    with pytest.raises(ValueError, match=r"map to no adapter label: 1, 2\. Adapter labels: "
                                         r"0 'background', 5 'target'"):
        prepare_case(case, tiny_card(), LabelMapping(TARGET_LABELS))
    as_background = prepare_case(case, tiny_card(), LabelMapping(TARGET_LABELS, unmapped="background"))
    assert set(np.unique(as_background.target).tolist()) == {0, 1}  # value 5 -> channel 1 by its value
    renamed = prepare_case(case, tiny_card(), LabelMapping(TARGET_LABELS, {"1": "target", "2": 0, "5": 0}))
    assert np.count_nonzero(renamed.target == 1) == np.count_nonzero(case_arrays(0)[1] == 1)


def test_segment_names_map_to_adapter_labels(tmp_path: Path) -> None:
    image_path, _ = write_case(tmp_path, 0)
    labels = case_arrays(0)[1]
    grid = volumes.Geometry.from_image(sitk.ReadImage(str(image_path)))
    segments = [volumes.Segment(1, "Cortex"), volumes.Segment(2, "Deep white"), volumes.Segment(5, "Left hippocampus")]
    volumes.write_segmentation(tmp_path / "case.seg.nrrd", labels, grid, segments)
    case = TrainingCase(image_path, tmp_path / "case.seg.nrrd")
    mapping = LabelMapping(TARGET_LABELS, {"left HIPPOCAMPUS": "target"}, unmapped="background")
    prepared = prepare_cases([case], tiny_card(), mapping)[0]
    assert np.count_nonzero(prepared.target == 1) == np.count_nonzero(labels == 5)
    # Named segments never match by value alone: "Cortex" (value 1) is not "grey matter" (value 1).
    with pytest.raises(ValueError, match=r"1 'Cortex', 2 'Deep white'"):
        prepare_case(case, tiny_card(), LabelMapping(BASE_LABELS + [TARGET], {"Left hippocampus": "target"}))
    # Nor by a value key onto a label of another name: refused, with the case's mapping shown.
    with pytest.raises(ValueError, match=r"--label-map sends named segments by their value to labels of another "
                                         r"name: 5 'Left hippocampus' -> 'target'\. The mapping of this case:\n"
                                         r"  1 'Cortex' +-> 0 background +\(--unmapped background\)\n(.|\n)*"
                                         r"--label-map '\{\"Left hippocampus\": \"target\"\}'"):
        prepare_case(case, tiny_card(), LabelMapping(TARGET_LABELS, {"5": "target"}, unmapped="background"))
    assert mapping.describe().splitlines() == [
        "label mapping (case label value [segment name] -> adapter label):",
        "  1 'Cortex'           -> 0 background  (--unmapped background)",
        "  2 'Deep white'       -> 0 background  (--unmapped background)",
        "  5 'Left hippocampus' -> 5 target      (--label-map by name)"]


def test_label_mapping_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"label mapping '5' -> 'tumour': the adapter has no label 'tumour'"):
        LabelMapping(TARGET_LABELS, {"5": "tumour"})
    with pytest.raises(ValueError, match=r"unmapped must be one of"):
        LabelMapping(TARGET_LABELS, unmapped="drop")
    case = TrainingCase(*write_case(tmp_path, 0))
    with pytest.raises(ValueError, match=r"label mapping keys \['Left hipocampus'\] match no label value or segment"):
        prepare_cases([case], tiny_card(), LabelMapping(TARGET_LABELS, {"Left hipocampus": "target"},
                                                        unmapped="background"))


@pytest.mark.parametrize("problem, message", [
    ("empty", r"is empty: it has no labelled"),
    ("off_grid", r"does not lie on the grid of image"),
    ("nan", r"non-finite voxels \(1 NaN"),
])
def test_bad_cases_are_refused(tmp_path: Path, problem: str, message: str) -> None:
    image_path, label_path = write_case(tmp_path, 0)
    image, labels = sitk.ReadImage(str(image_path)), sitk.ReadImage(str(label_path))
    if problem == "empty":
        labels = sitk.Image(labels) * 0
    elif problem == "off_grid":
        labels.SetOrigin((0.0, 0.0, 0.0))
    else:
        array = sitk.GetArrayFromImage(image)
        array[3, 4, 5] = np.nan
        restored = sitk.GetImageFromArray(array)
        restored.CopyInformation(image)
        image = restored
    sitk.WriteImage(image, str(image_path))
    sitk.WriteImage(labels, str(label_path))
    with pytest.raises(ValueError, match=message):
        prepare_case(TrainingCase(image_path, label_path), tiny_card(), LabelMapping(BASE_LABELS + [TARGET]))


# ---------------------------------------------------------------- finding cases and splitting them


def touch(*paths: Path) -> None:
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def test_cases_from_folders_and_json(tmp_path: Path) -> None:
    touch(tmp_path / "flat" / "b_image.nii.gz", tmp_path / "flat" / "b_label.seg.nrrd",
          tmp_path / "flat" / "a_image.nrrd", tmp_path / "flat" / "a_label.nrrd")
    assert [(c.name, c.label.name) for c in find_cases(tmp_path / "flat")] == [("a", "a_label.nrrd"),
                                                                               ("b", "b_label.seg.nrrd")]
    touch(tmp_path / "msd" / "imagesTr" / "hip_001_0000.nii.gz", tmp_path / "msd" / "labelsTr" / "hip_001.nii.gz")
    (found,) = find_cases(tmp_path / "msd")
    assert found.name == "hip_001" and found.image.name == "hip_001_0000.nii.gz"
    listing = tmp_path / "lists" / "cases.json"
    touch(listing)
    listing.write_text(json.dumps({"training": [{"image": "../flat/a_image.nrrd", "label": "../flat/a_label.nrrd",
                                                 "annotated_slices": {"axis": "z", "indices": [4, 9]}}]}))
    (listed,) = find_cases(listing)
    assert listed.image == tmp_path / "lists" / "../flat/a_image.nrrd"
    assert listed.annotated_slices == AnnotatedSlices("z", (4, 9))
    touch(tmp_path / "lonely" / "c_image.nii.gz")
    with pytest.raises(FileNotFoundError, match=r"cases \['c'\] have an image without a label map"):
        find_cases(tmp_path / "lonely")
    with pytest.raises(ValueError, match=r"case entry has unknown keys \['mask'\]"):
        find_cases([{"image": "a.nii", "label": "b.nii", "mask": "c.nii"}])


def test_automatic_validation_split_rule() -> None:
    cases = [TrainingCase(Path(f"c{i}.nii"), Path(f"l{i}.nii")) for i in range(5)]
    one = split_cases(cases[:1], "auto", seed=7)
    assert (one.train, one.validation) == (cases[:1], []) and "one case: nothing to hold out" in one.reason
    for seed in range(3):  # N = 3: case seed % 3 is held out, so seeds 0, 1, 2 rotate through the cases
        split = split_cases(cases[:3], "auto", seed)
        assert split.validation == [cases[seed]] and split.train == [c for c in cases[:3] if c != cases[seed]]
        assert f"number --seed % 3 = {seed}" in split.reason
    assert split_cases(cases[:2], "auto", seed=1).validation == [cases[1]]
    split = split_cases(cases, "auto", seed=0)  # N >= 4: ceil(N / 5) held out
    assert len(split.validation) == 1
    assert sorted(c.name for c in split.train + split.validation) == sorted(c.name for c in cases)
    assert "ceil(5 / 5) = 1 of 5 cases, drawn with --seed 0" in split.reason
    split = split_cases(cases, "none", seed=0)
    assert (split.train, split.validation) == (cases, [])
