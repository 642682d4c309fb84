"""Segmenting a volume: exact input grid, label values, .seg.nrrd, probabilities, progress, adapters, bad input."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from synthetic import BASE_LABELS, TARGET, TINY_UNETR, make_tiny_base, tiny_card_fields, tiny_unetr, write_case
from TCURLoRALib import volumes
from TCURLoRALib.adapter import AdaptedUNETR, attach_head, save_adapter
from TCURLoRALib.basemodel import load_base, save_base
from TCURLoRALib.cards import AdapterCard, Label
from TCURLoRALib.progress import Cancelled
from TCURLoRALib.segmentation import count_windows, segment, segment_volume, sliding_window_logits
from TCURLoRALib.tcur import TCURLoRAConfig, TCURLoRAModel

SPACING = (1.5, 2.5, 3.0)  # x, y, z in mm: anisotropic, and none of it the tiny base's 2 mm


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def base_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_base(tmp_path_factory.mktemp("base") / "tiny.safetensors")


def oblique_geometry(shape_zyx: tuple = (18, 20, 16)) -> volumes.Geometry:
    """An oblique, anisotropic grid: rotated 25 degrees about z and 10 about x, odd origin."""
    a, b = math.radians(25), math.radians(10)
    about_z = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    about_x = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return volumes.Geometry(tuple(reversed(shape_zyx)), SPACING, (-21.3, 14.7, -5.1), about_z @ about_x)


def blob(shape_zyx: tuple) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape_zyx], indexing="ij"))
    radius = np.sqrt((grid ** 2).sum(0))
    return np.where(radius < 0.8, 100.0 - 60 * radius, 0.0).astype(np.float32)


@pytest.fixture(scope="module")
def oblique_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    geometry = oblique_geometry()
    path = tmp_path_factory.mktemp("image") / "oblique.nrrd"
    sitk.WriteImage(geometry.image_from_array(blob(geometry.shape)), str(path))
    return path


def read_geometry(path: Path) -> volumes.Geometry:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return volumes.Geometry(reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())


def base_with_constant_head(path: Path, bias: list, labels: list) -> Path:
    """A tiny base whose head has zero weights: its logits are ``bias`` at every voxel, whatever the input."""
    unetr = tiny_unetr(seed=0, out_channels=len(labels))
    with torch.no_grad():
        unetr.out.conv.conv.weight.zero_()
        unetr.out.conv.conv.bias.copy_(torch.tensor(bias))
    fields = tiny_card_fields("constant")
    fields["unetr"] = {**TINY_UNETR, "out_channels": len(labels)}
    fields["labels"] = [label.to_json() for label in labels]
    save_base(path, unetr, fields)
    return path


def random_adapter(base_path: Path, path: Path, labels: list) -> Path:
    """An adapter with a new head for ``labels`` and a random (non-zero) update of every group."""
    base = load_base(base_path)
    attach_head(base.model, labels)
    model = TCURLoRAModel(base.model, TCURLoRAConfig(rank=4))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for group in model.groups.values():
            group.u.add_(0.5 * torch.randn(group.u.shape, generator=generator))
        for name, parameter in model.base.named_parameters():
            if name.startswith(("decoder", "out")):
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    card = AdapterCard(name=path.stem, base_fingerprint=base.card.fingerprint, base_name=base.card.name, rank=4,
                       groups=list(model.groups), init="pinv", labels=labels,
                       training={"cases": 0, "steps": 0, "seconds": 0.0, "device": "cpu", "seed": 1})
    save_adapter(path, model, card, include_head=True)
    return path


# ---------------------------------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("extension", [".nrrd", ".nii.gz"])
def test_outputs_lie_on_the_exact_oblique_input_grid(base_path: Path, oblique_image: Path, tmp_path: Path,
                                                     extension: str) -> None:
    result = segment(oblique_image, base_path, tmp_path / f"labels{extension}", seg_nrrd_path=tmp_path / "s.seg.nrrd",
                     probabilities_path=tmp_path / "p.nrrd", device="cpu")
    grid = read_geometry(oblique_image)
    written = read_geometry(result.output_path)
    assert written.size == grid.size
    if extension == ".nrrd":  # NRRD stores doubles: the very same grid
        np.testing.assert_allclose(written.spacing + written.origin + written.direction,
                                   grid.spacing + grid.origin + grid.direction, rtol=0, atol=1e-12)
    else:  # NIfTI stores its affine in float32
        assert written.matches(grid)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(result.output_path)))
    assert set(np.unique(labels).tolist()) <= {label.value for label in BASE_LABELS}
    voxel_ml = np.prod(SPACING) / 1000
    assert result.volumes_ml == pytest.approx({label.name: np.count_nonzero(labels == label.value) * voxel_ml
                                               for label in BASE_LABELS[1:]})

    segmentation = volumes.read_label_map(tmp_path / "s.seg.nrrd", allow_empty=True)
    assert [(s.value, s.name, s.color) for s in segmentation.segments] == \
        [(label.value, label.name, label.color) for label in BASE_LABELS[1:]]
    assert segmentation.geometry.matches(grid)
    np.testing.assert_array_equal(segmentation.array(), labels)

    probabilities = sitk.ReadImage(str(tmp_path / "p.nrrd"))
    assert probabilities.GetNumberOfComponentsPerPixel() == len(BASE_LABELS)
    assert probabilities.GetPixelID() == sitk.sitkVectorFloat32
    assert volumes.Geometry.from_image(probabilities).matches(grid)
    values = sitk.GetArrayFromImage(probabilities)  # (z, y, x, C)
    assert values.min() >= 0 and values.max() <= 1
    np.testing.assert_allclose(values.sum(-1), 1.0, rtol=0, atol=1e-5)
    assert '"white matter"' in probabilities.GetMetaData("TCURLoRA_labels")


def test_constant_logits_give_that_label_value_and_known_probabilities(tmp_path: Path, oblique_image: Path) -> None:
    labels = [Label(0, "background", (0, 0, 0)), Label(3, "three", (10, 20, 30)), Label(7, "seven", (1, 2, 3))]
    base = base_with_constant_head(tmp_path / "constant.safetensors", [0.0, 1.0, 4.0], labels)
    result = segment(oblique_image, base, tmp_path / "labels.nii.gz", probabilities_path=tmp_path / "p.nii.gz")
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(result.output_path)))
    assert np.all(written == 7), "the label value of channel 2, not the channel index"
    expected = np.exp([0.0, 1.0, 4.0]) / np.exp([0.0, 1.0, 4.0]).sum()
    probabilities = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "p.nii.gz")))
    np.testing.assert_allclose(probabilities, np.broadcast_to(expected, probabilities.shape), rtol=0, atol=1e-5)
    assert result.volumes_ml["seven"] == pytest.approx(written.size * np.prod(SPACING) / 1000)
    assert result.volumes_ml["three"] == 0.0


def test_segment_volume_is_the_same_computation_as_segment(base_path: Path, oblique_image: Path,
                                                          tmp_path: Path) -> None:
    result = segment(oblique_image, base_path, tmp_path / "labels.nrrd")
    image = sitk.ReadImage(str(oblique_image))
    prediction = segment_volume(sitk.GetArrayFromImage(image), volumes.Geometry.from_image(image), load_base(base_path))
    np.testing.assert_array_equal(prediction.labels, sitk.GetArrayFromImage(sitk.ReadImage(str(result.output_path))))
    assert prediction.probabilities is None
    assert prediction.volumes_ml() == pytest.approx(result.volumes_ml)


# ---------------------------------------------------------------------------------------------------- windows


@pytest.mark.parametrize("shape, roi, overlap, windows", [
    ((36, 40, 38), (32, 32, 32), 0.25, 8),  # step 24: 2 per axis
    ((20, 20, 20), (32, 32, 32), 0.25, 1),  # smaller than the window: padded
    ((32, 64, 33), (32, 32, 32), 0.5, 6),   # equal size: 1; step 16: 3; one voxel over: 2
    ((70, 16, 16), (16, 16, 16), 0.0, 5),   # no overlap: starts 0, 16, 32, 48 and 54 (shifted back)
])
def test_window_count_and_gaussian_stitching_of_a_constant(shape, roi, overlap, windows) -> None:
    calls = []

    def constant(windows: torch.Tensor) -> torch.Tensor:
        calls.append(windows.shape[0])
        return torch.full((windows.shape[0], 2) + tuple(windows.shape[2:]), 3.0)

    events = []
    logits = sliding_window_logits(constant, torch.zeros(shape), roi, overlap, sw_batch_size=2,
                                   progress=lambda event, **fields: events.append((event, fields)))
    assert count_windows(shape, roi, overlap) == windows == sum(calls)
    assert calls == [2] * (windows // 2) + [1] * (windows % 2)
    assert events[0] == ("start", {"task": "segment", "total": windows})
    assert [fields["step"] for event, fields in events[1:]] == list(range(1, windows + 1))
    assert logits.shape == (2,) + shape
    torch.testing.assert_close(logits, torch.full_like(logits, 3.0))


def test_progress_one_step_per_window_then_done(base_path: Path, tmp_path: Path) -> None:
    image, _ = write_case(tmp_path, seed=0)  # 38 x 40 x 36 voxels of 2 mm: two windows of 32 along each axis
    base = load_base(base_path)
    windows_run = []
    hook = base.model.register_forward_pre_hook(lambda module, args: windows_run.append(args[0].shape[0]))
    events = []
    result = segment(image, base, tmp_path / "labels.nii.gz", sw_batch_size=3,
                     progress=lambda event, **fields: events.append((event, fields)))
    hook.remove()
    names = [event for event, _ in events]
    assert names == ["start"] + ["step"] * sum(windows_run) + ["done"]
    assert sum(windows_run) == 8 == events[0][1]["total"] == result.windows
    assert windows_run == [3, 3, 2]
    assert [fields["step"] for _, fields in events[1:-1]] == list(range(1, 9))
    assert events[-1][1]["output"] == str(tmp_path / "labels.nii.gz")


def test_cancel_during_inference_writes_nothing(base_path: Path, tmp_path: Path, oblique_image: Path) -> None:
    def cancel(event: str, **fields) -> None:
        if event == "step":
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        segment(oblique_image, base_path, tmp_path / "labels.nii.gz", seg_nrrd_path=tmp_path / "s.seg.nrrd",
                progress=cancel)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------- adapters


def test_adapter_session_without_adapter_equals_base(base_path: Path, oblique_image: Path) -> None:
    image = sitk.ReadImage(str(oblique_image))
    array, grid = sitk.GetArrayFromImage(image), volumes.Geometry.from_image(image)
    plain = segment_volume(array, grid, load_base(base_path), with_probabilities=True)
    session = segment_volume(array, grid, AdaptedUNETR(load_base(base_path)), with_probabilities=True)
    np.testing.assert_array_equal(session.labels, plain.labels)
    np.testing.assert_allclose(session.probabilities, plain.probabilities, rtol=0, atol=1e-6)


def test_adapter_is_merged_for_the_call_and_the_base_restored(base_path: Path, oblique_image: Path,
                                                              tmp_path: Path) -> None:
    labels = [BASE_LABELS[0], TARGET]
    adapter = random_adapter(base_path, tmp_path / "target.safetensors", labels)
    image = sitk.ReadImage(str(oblique_image))
    array, grid = sitk.GetArrayFromImage(image), volumes.Geometry.from_image(image)
    base = load_base(base_path)
    before = {name: value.clone() for name, value in base.model.state_dict().items()}
    with_adapter = segment_volume(array, grid, base, adapter_path=adapter, with_probabilities=True)
    assert with_adapter.label_set == tuple(labels)
    assert set(np.unique(with_adapter.labels).tolist()) <= {0, TARGET.value}
    assert with_adapter.probabilities.shape == (2,) + grid.shape
    after = base.model.state_dict()
    assert set(after) == set(before)
    for name, value in before.items():
        torch.testing.assert_close(after[name], value, rtol=0, atol=1e-5, msg=name)

    session = AdaptedUNETR(load_base(base_path))
    session.set_adapter(adapter)
    merged = segment_volume(array, grid, session, with_probabilities=True)
    np.testing.assert_array_equal(merged.labels, with_adapter.labels)
    np.testing.assert_allclose(merged.probabilities, with_adapter.probabilities, rtol=0, atol=1e-5)
    plain = segment_volume(array, grid, base, with_probabilities=True)
    assert not np.allclose(plain.probabilities[0], merged.probabilities[0], atol=1e-3), "the adapter changed nothing"


# ---------------------------------------------------------------------------------------------------- bad input


def test_missing_image(base_path: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no such file: '.*missing\.nii\.gz'"):
        segment(tmp_path / "missing.nii.gz", base_path, tmp_path / "labels.nii.gz")


def test_two_dimensional_image(base_path: Path, tmp_path: Path) -> None:
    flat = sitk.GetImageFromArray(np.ones((20, 30), np.float32))
    sitk.WriteImage(flat, str(tmp_path / "flat.nrrd"))
    with pytest.raises(ValueError, match=r"is 2-D \(size \(30, 20\)\); a 3-D scalar volume is needed"):
        segment(tmp_path / "flat.nrrd", base_path, tmp_path / "labels.nii.gz")
    with pytest.raises(ValueError, match=r"image array must be 3-D \(z, y, x\), got shape \(20, 30\)"):
        segment_volume(np.ones((20, 30)), oblique_geometry(), base_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu(base_path: Path, oblique_image: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"device 'cuda' was asked for, but CUDA is not available here"):
        segment(oblique_image, base_path, tmp_path / "labels.nii.gz", device="cuda")
    with pytest.raises(ValueError, match=r"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"):
        segment(oblique_image, base_path, tmp_path / "labels.nii.gz", device="gpu")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs, message", [
    ({"output_path": "labels.seg.nrrd"}, r"output label map '.*labels\.seg\.nrrd' must end with one of \.nii"),
    ({"output_path": "labels.png"}, r"output label map '.*labels\.png' must end with one of"),
    ({"seg_nrrd_path": "s.nrrd"}, r"Slicer segmentation '.*s\.nrrd' must end with '\.seg\.nrrd'"),
    ({"probabilities_path": "p.seg.nrrd"}, r"probability map '.*p\.seg\.nrrd' must end with one of \.nrrd"),
    ({"probabilities_path": "labels.nii.gz"}, r"probability map '.*labels\.nii\.gz' is the same file as the label map"),
    ({"overlap": 1.0}, r"overlap must be a number in \[0, 1\), got 1\.0"),
    ({"sw_batch_size": 0}, r"--sw-batch-size must be an integer >= 1, got 0"),
])
def test_bad_arguments_are_refused_before_any_work(base_path: Path, oblique_image: Path, tmp_path: Path,
                                                   kwargs: dict, message: str) -> None:
    arguments = {"output_path": "labels.nii.gz", **kwargs}
    for key in ("output_path", "seg_nrrd_path", "probabilities_path"):
        if key in arguments:
            arguments[key] = tmp_path / arguments[key]
    output = arguments.pop("output_path")
    with pytest.raises(ValueError, match=message):
        segment(oblique_image, base_path, output, **arguments)
    assert list(tmp_path.iterdir()) == []


def test_output_onto_the_input_image_is_refused(base_path: Path, oblique_image: Path) -> None:
    with pytest.raises(ValueError, match=r"label map '.*oblique\.nrrd' is the file .* that this command reads"):
        segment(oblique_image, base_path, oblique_image)
