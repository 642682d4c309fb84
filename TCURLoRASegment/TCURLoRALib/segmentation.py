"""Segment a volume: a frozen UNETR (its adapter merged) by Gaussian-weighted sliding windows on the model grid.

One code path for every caller: :func:`segment` reads a file and writes files, :func:`segment_volume` takes an array
and its grid (the Slicer glue, the demo) and returns arrays; both run :func:`_predict`.

Steps: the image is reoriented, resampled and normalised as the model card says (``volumes.prepare_for_model``);
MONAI's ``sliding_window_inference`` runs the network on ``card.patch_size`` windows (``mode="gaussian"``) under
``torch.inference_mode``; the stitched logits are turned into label **values** (``Label.value`` of the winning
channel, not its index) and resampled (nearest neighbour) onto the exact input grid; softmax probabilities, when
asked for, are resampled linearly onto the input grid.

Two options make the label map cleaner (issue #15; measured in ``Testing/benchmarks/README.md``, quality benchmark):

- ``postprocess="largest-component"`` (the default): each label the adapter's card declares one connected piece
  (``anatomy["one_piece"]``) keeps only its largest connected component (26-connected, on the model grid, before
  resampling); labels not declared, and models whose card declares nothing (the base alone), are left as they are.
  Far blobs cost little Dice but set HD95 to their distance: on the MNI152 template with another labelling protocol
  the shipped ``hippocampus`` adapter went from HD95 34.2 to 13.0 mm with it. ``"none"``: the network's argmax.
- ``tta=True`` (off by default; twice the time): test-time mirroring; the softmax of the image and that of the image
  mirrored left/right (mapped back, the channels of each left/right pair exchanged) are averaged. The pairs: the
  card's ``anatomy["left_right_pairs"]``, else found from the label names; labels without a pair are refused.

The probabilities written are the network's (averaged over both passes with ``tta``), not post-processed.

Probability files: one multi-component (vector) image on the input grid, float32, component ``k`` = probability of
``labels[k]`` (background first), written by SimpleITK. ``.nrrd`` (recommended: the NRRD header holds
``kinds: vector domain domain domain`` and a ``TCURLoRA_labels`` field with the labels as JSON) is read by
SimpleITK as a vector image with ``GetNumberOfComponentsPerPixel() == C`` and by Slicer as a vector volume;
``.nii``/``.nii.gz`` (NIfTI vector intent, 5th dimension) and ``.mha`` hold the same voxels without the label list.
Because the label map is resampled by nearest neighbour and the probabilities linearly, the argmax of the written
probabilities may differ from the label map at a few boundary voxels where the model grid is not the input grid.
"""
from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence, Union

import numpy as np
import SimpleITK as sitk
import torch
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference
from torch import nn

from . import files, volumes
from .adapter import AdaptedUNETR
from .basemodel import BaseModel, load_base
from .cards import AdapterCard, Label, ModelCard
from .outputs import OutputFiles, atomic_write
from .devices import resolve_device
from .mirror import left_right_axis, required_pairs
from .postprocess import keep_largest_component
from .progress import EtaClock, Progress, silent
from .settings import POSTPROCESS_CHOICES

__all__ = ["POSTPROCESS_CHOICES", "PROBABILITY_EXTENSIONS", "SegmentationResult", "VolumePrediction", "count_windows", "segment",
           "segment_volume", "sliding_window_logits"]

PathLike = Union[str, "os.PathLike[str]"]
ModelLike = Union[BaseModel, AdaptedUNETR, str, "os.PathLike[str]"]
PROBABILITY_EXTENSIONS = (".nrrd", ".nii", ".nii.gz", ".mha")
LABELS_METADATA_KEY = "TCURLoRA_labels"
TASK = "segment"


@dataclass(frozen=True)
class VolumePrediction:
    """A segmentation on the input grid.

    Args:
        labels: uint16 array (z, y, x) = geometry.shape of label values (``Label.value``; 0 = background).
        probabilities: float32 array (C, z, y, x), channel k = probability of ``label_set[k]``, or None.
        label_set: the model's labels, one per output channel, background first.
        geometry: the input grid.
        windows: number of sliding windows run.
    """

    labels: np.ndarray
    probabilities: Union[np.ndarray, None]
    label_set: tuple
    geometry: volumes.Geometry
    windows: int

    def volumes_ml(self) -> dict:
        """Volume of each labelled structure (background left out) in mL, keyed by label name, in label order."""
        voxel_ml = float(np.prod(self.geometry.spacing)) / 1000.0
        counts = np.bincount(self.labels.ravel(), minlength=max(label.value for label in self.label_set) + 1)
        return {label.name: float(counts[label.value]) * voxel_ml for label in self.label_set if label.value != 0}


@dataclass(frozen=True)
class SegmentationResult:
    """What :func:`segment` wrote.

    Args:
        output_path: the label map.
        seg_nrrd_path: the Slicer segmentation, or None.
        probabilities_path: the probability map, or None.
        labels: the labels of the model that ran (background first).
        volumes_ml: volume of each structure in mL, keyed by label name (background left out).
        seconds: wall-clock time of the whole call (reading, inference, writing).
        windows: number of sliding windows run.
        device: the torch device that ran the network, e.g. ``"cpu"`` or ``"cuda:0"``.
    """

    output_path: Path
    seg_nrrd_path: Union[Path, None]
    probabilities_path: Union[Path, None]
    labels: tuple
    volumes_ml: dict = field(default_factory=dict)
    seconds: float = 0.0
    windows: int = 0
    device: str = "cpu"


# ---------------------------------------------------------------------------------------------------- public API


def segment(image_path: PathLike, base: ModelLike, output_path: PathLike, *,
            adapter_path: Union[PathLike, None] = None, seg_nrrd_path: Union[PathLike, None] = None,
            probabilities_path: Union[PathLike, None] = None, overlap: float = 0.25, sw_batch_size: int = 1,
            device: Union[str, torch.device] = "auto", postprocess: str = POSTPROCESS_CHOICES[0], tta: bool = False,
            overwrite: bool = False, progress: Progress = silent) -> SegmentationResult:
    """Segment an image file and write the label map (and optionally a .seg.nrrd and probabilities) on its grid.

    Every output is checked before the network runs (folder writable, room on the disk, an existing file only with
    ``overwrite``, never an input or a shipped file), and the outputs are published together or not at all (see
    :class:`TCURLoRALib.outputs.OutputFiles`): a failed or cancelled run leaves no file, nor some of them.

    Args:
        image_path: 3-D scalar image (.nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd).
        base: a base-model file, a loaded :class:`BaseModel`, or an :class:`AdaptedUNETR` session (its active
            adapter, if any, is used).
        output_path: label map to write (.nii, .nii.gz, .nrrd, .mha), uint8 or uint16 label values.
        adapter_path: adapter file to merge for this run. On a ``BaseModel`` or a path it is merged for this call
            only (the base's weights are restored afterwards); on an ``AdaptedUNETR`` it becomes the session's
            active adapter and stays active.
        seg_nrrd_path: also write a Slicer segmentation (.seg.nrrd) with the labels' names and colours.
        probabilities_path: also write the softmax probabilities (see the module docstring for the format).
        overlap: sliding-window overlap in [0, 1) (default 0.25).
        sw_batch_size: windows per forward pass, >= 1 (default 1).
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``, or ``"auto"``: for a base file CUDA if available, else CPU
            (:func:`resolve_device`); a loaded model stays where it is. A ``BaseModel`` elsewhere is moved to the
            device in place; an ``AdaptedUNETR`` elsewhere is refused (load its base on that device).
        overwrite: replace output files that exist (default: refuse them before any work).
        progress: receives ``start`` (task, total windows), one ``step`` per window, and ``done`` (output,
            seconds).

    Returns:
        SegmentationResult with the written paths, labels, per-label volumes in mL and the time taken.

    Raises:
        FileNotFoundError: no image, adapter or base file.
        FileExistsError: an output exists and ``overwrite`` is False.
        ValueError: bad arguments (overlap, batch size, device, output extensions, an output path given twice or
            equal to an input), an image that is not a 3-D scalar volume (see ``volumes.read_image``) or too small
            or too large for the model, or a network output that is not finite (damaged or diverged weights).
        OutputError: an output folder that does not take the files or lacks the room (before the work), or
            publishing failed (after it; the results were kept where the message says).
        CardError, TCURLoRAFileError: the base or adapter file is invalid or they do not belong together.
    """
    started = time.monotonic()
    _check_arguments(overlap, sw_batch_size, device, postprocess, tta)
    output, seg_nrrd, probabilities = _check_outputs(output_path, seg_nrrd_path, probabilities_path)
    image = volumes.read_image(image_path)
    outputs = _planned_outputs(image, base, adapter_path, output, seg_nrrd, probabilities, overwrite,
                               inputs=[image_path, adapter_path, _file_of(base)])
    with _active_model(base, adapter_path, device) as (network, card, adapter_card, model_name):
        prediction = _predict(image, network, card, adapter_card, model_name,
                              with_probabilities=probabilities is not None, overlap=overlap,
                              sw_batch_size=sw_batch_size, postprocess=postprocess, tta=tta, progress=progress)
        labels = prediction.label_set
        device_name = str(_device_of(network))
    writers = {output: lambda temporary: volumes.write_label_map(temporary, prediction.labels, prediction.geometry)}
    if seg_nrrd is not None:
        segments = [volumes.Segment(label.value, label.name, label.color) for label in labels if label.value != 0]
        writers[seg_nrrd] = lambda temporary: volumes.write_segmentation(temporary, prediction.labels,
                                                                         prediction.geometry, segments)
    if probabilities is not None:
        writers[probabilities] = lambda temporary: write_probabilities(temporary, prediction.probabilities,
                                                                       prediction.geometry, labels)
    outputs.publish(writers)
    seconds = time.monotonic() - started
    progress("done", output=str(output), seconds=round(seconds, 3))
    return SegmentationResult(output_path=output, seg_nrrd_path=seg_nrrd, probabilities_path=probabilities,
                              labels=tuple(labels), volumes_ml=prediction.volumes_ml(), seconds=seconds,
                              windows=prediction.windows, device=device_name)


def segment_volume(array: np.ndarray, geometry: volumes.Geometry, base: ModelLike, *,
                   adapter_path: Union[PathLike, None] = None, with_probabilities: bool = False,
                   overlap: float = 0.25, sw_batch_size: int = 1, device: Union[str, torch.device] = "auto",
                   postprocess: str = POSTPROCESS_CHOICES[0], tta: bool = False,
                   progress: Progress = silent) -> VolumePrediction:
    """Segment an image already in memory; the same computation as :func:`segment`, without files.

    Args:
        array: real array (z, y, x) of shape ``geometry.shape`` (e.g. ``slicer.util.arrayFromVolume``).
        geometry: the image's grid in LPS (see ``volumes.Geometry``).
        base, adapter_path, overlap, sw_batch_size, device, postprocess, tta: as for :func:`segment`.
        with_probabilities: also return the softmax probabilities on the input grid.
        progress: receives ``start``, one ``step`` per window, and ``done`` (seconds).

    Returns:
        VolumePrediction: label values (z, y, x) and optionally probabilities (C, z, y, x) on ``geometry``.

    Raises:
        ValueError: an array that is not 3-D, not real, not finite, or not of the grid's shape; bad arguments.
    """
    started = time.monotonic()
    _check_arguments(overlap, sw_batch_size, device, postprocess, tta)
    image = _image_from_array(array, geometry)
    with _active_model(base, adapter_path, device) as (network, card, adapter_card, model_name):
        prediction = _predict(image, network, card, adapter_card, model_name, with_probabilities=with_probabilities,
                              overlap=overlap, sw_batch_size=sw_batch_size, postprocess=postprocess, tta=tta,
                              progress=progress)
    progress("done", seconds=round(time.monotonic() - started, 3))
    return prediction


def count_windows(image_shape: Sequence[int], roi_size: Sequence[int], overlap: float) -> int:
    """Number of windows MONAI's ``sliding_window_inference`` runs on one image (same rule as MONAI 1.x).

    An axis shorter than the window is padded to the window; the step is ``int(roi * (1 - overlap))`` (at least 1),
    or the whole window where image and window are equal.

    Args:
        image_shape: spatial shape (D, H, W) of the image.
        roi_size: window size (D, H, W).
        overlap: overlap in [0, 1).
    """
    if len(image_shape) != len(roi_size):
        raise ValueError(f"image shape {tuple(image_shape)} and window {tuple(roi_size)} differ in dimensions")
    padded = tuple(max(int(n), int(r)) for n, r in zip(image_shape, roi_size))
    interval = tuple(int(r) if int(r) == n else max(int(int(r) * (1 - overlap)), 1) for n, r in zip(padded, roi_size))
    return len(dense_patch_slices(padded, tuple(int(r) for r in roi_size), interval))


def sliding_window_logits(network: Callable[[torch.Tensor], torch.Tensor], volume: torch.Tensor,
                          roi_size: Sequence[int], overlap: float = 0.25, sw_batch_size: int = 1,
                          progress: Progress = silent, mirror_axis: Union[int, None] = None) -> torch.Tensor:
    """Gaussian-weighted sliding-window logits of one volume, with ``start`` and one ``step`` event per window.

    Args:
        network: maps ``B x 1 x roi`` to logits ``B x C x roi``.
        volume: float tensor (D, H, W) on the network's device.
        roi_size: window (D, H, W), the network's input size.
        overlap: overlap of neighbouring windows in [0, 1).
        sw_batch_size: windows per forward pass.
        progress: the Progress callable (no ``done``: the caller finishes the job).
        mirror_axis: also run the volume flipped along this axis (0-2, of D, H, W) as a second pass, one job of
            twice the windows; None: one pass.

    Returns:
        Logits tensor (C, D, H, W) on the volume's device; with ``mirror_axis`` (2, C, D, H, W): the volume's, and
        the flipped volume's flipped back (its channels as the network gave them).
    """
    passes = 1 if mirror_axis is None else 2
    total = count_windows(volume.shape, roi_size, overlap) * passes
    progress("start", task=TASK, total=total)
    clock = EtaClock(total)
    done = 0

    def counted(windows: torch.Tensor) -> torch.Tensor:
        nonlocal done
        logits = network(windows)
        # One event a window (a batch holds up to sw_batch_size of them), so totals do not depend on batching.
        for _ in range(windows.shape[0]):
            done += 1
            progress("step", step=done, total=total, **clock.tick(done))
        return logits

    def stitched(image: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return sliding_window_inference(image[None, None], roi_size=tuple(roi_size), sw_batch_size=sw_batch_size,
                                            predictor=counted, overlap=overlap, mode="gaussian")[0]

    logits = stitched(volume)
    if mirror_axis is not None:
        logits = torch.stack([logits, stitched(volume.flip(mirror_axis)).flip(mirror_axis + 1)])
    if done != total:
        raise RuntimeError(f"sliding window ran {done} windows where {total} were expected: the window count rule "
                           f"of this MONAI version differs from count_windows")
    return logits


def write_probabilities(path: PathLike, probabilities: np.ndarray, geometry: volumes.Geometry,
                        labels: Sequence[Label]) -> Path:
    """Write per-label probabilities as one vector image on ``geometry`` (see the module docstring), atomically.

    Args:
        path: destination ending in one of PROBABILITY_EXTENSIONS.
        probabilities: float array (C, z, y, x), (z, y, x) = geometry.shape, C = len(labels).
        geometry: the grid (normally the input image's).
        labels: one per channel; stored as JSON in the NRRD header field ``TCURLoRA_labels``.

    Raises:
        ValueError: unsupported extension, or an array of another shape.
    """
    path = Path(path)
    _probability_extension(path)
    probabilities = np.asarray(probabilities)
    expected = (len(labels),) + geometry.shape
    if probabilities.shape != expected:
        raise ValueError(f"probabilities must have shape {expected} (C, z, y, x), got {probabilities.shape}")
    image = geometry.image_from_array(np.moveaxis(probabilities.astype(np.float32, copy=False), 0, -1),
                                      is_vector=True)
    image.SetMetaData(LABELS_METADATA_KEY, json.dumps([label.to_json() for label in labels]))
    atomic_write(path, lambda temporary: sitk.WriteImage(image, temporary, True), what="probability map")
    return path


# ---------------------------------------------------------------------------------------------------- the work


def _predict(image: sitk.Image, network: nn.Module, card: ModelCard, adapter_card: Union[AdapterCard, None],
             model_name: str, *, with_probabilities: bool, overlap: float, sw_batch_size: int, postprocess: str,
             tta: bool, progress: Progress) -> VolumePrediction:
    """The one segmentation path: prepare, sliding window (twice with ``tta``), post-processing on the model grid,
    label values and probabilities on the input grid."""
    labels = list(adapter_card.labels if adapter_card is not None else card.labels)
    mirror_axis, order = None, None
    if tta:  # the pairs are checked before any window runs
        declared = adapter_card.declared_pairs() if adapter_card is not None else None
        order = list(range(len(labels)))
        for left, right in required_pairs([label.name for label in labels], declared, "--tta"):
            order[left], order[right] = right, left
        mirror_axis = left_right_axis(card.orientation)
    prepared = volumes.prepare_for_model(image, card.spacing, card.orientation, card.intensity)
    volume = torch.from_numpy(prepared.array).to(_device_of(network))
    logits = sliding_window_logits(network, volume, card.patch_size, overlap, sw_batch_size, progress,
                                   mirror_axis=mirror_axis)
    if logits.shape[-4] != len(labels):
        raise RuntimeError(f"the network gives {logits.shape[-4]} output channels but has {len(labels)} labels")
    _require_finite_output(logits, model_name)
    # with tta the two passes' probabilities are averaged (as the benchmark measured it), else the logits decide
    scores = (torch.softmax(logits[0].float(), dim=0) + torch.softmax(logits[1][order].float(), dim=0)) / 2 \
        if tta else logits
    winners = scores.argmax(dim=0).cpu().numpy()
    if postprocess == "largest-component" and adapter_card is not None and adapter_card.one_piece_channels():
        winners = keep_largest_component(winners, adapter_card.one_piece_channels())
    values = np.array([label.value for label in labels], dtype=np.uint16)
    labels_on_input = prepared.mapping.labels_to_input(values[winners])
    probabilities = None
    if with_probabilities:
        softmax = scores if tta else torch.softmax(logits.float(), dim=0)
        probabilities = prepared.mapping.probabilities_to_input(softmax.cpu().numpy())
    windows = count_windows(prepared.array.shape, card.patch_size, overlap) * (2 if tta else 1)
    return VolumePrediction(labels=labels_on_input, probabilities=probabilities, label_set=tuple(labels),
                            geometry=prepared.mapping.input_grid, windows=windows)


def _require_finite_output(logits: torch.Tensor, model_name: str) -> None:
    """A NaN logit loses every argmax to nothing in particular (all background, typically): refuse, never write."""
    bad = int((~torch.isfinite(logits)).sum())
    if bad:
        raise ValueError(f"the output of {model_name} holds {bad} non-finite values (NaN or infinity) of "
                         f"{logits.numel()}: the model cannot segment this image (its weights are damaged or its "
                         f"training diverged, or the image's intensities overflow it); nothing was written")


@contextmanager
def _active_model(base: ModelLike, adapter_path: Union[PathLike, None],
                  device: Union[str, torch.device]) -> Iterator[tuple]:
    """``(network, base card, adapter card or None, model name)`` ready for inference on the asked device; on exit,
    undoes what it changed on a caller's model (an adapter merged for this call only, train mode)."""
    if isinstance(base, (str, os.PathLike)):
        base = load_base(base, resolve_device(device))
    elif isinstance(base, BaseModel):
        _move(base.model, device)
    elif isinstance(base, AdaptedUNETR):
        _require_on(base.model, device)
    else:
        raise ValueError(f"base must be a base-model file, a BaseModel or an AdaptedUNETR, got {base!r:.200}")
    card = base.base.card if isinstance(base, AdaptedUNETR) else base.card
    if card.unetr["in_channels"] != 1:
        raise ValueError(f"base model {card.name!r} takes {card.unetr['in_channels']} input channels; "
                         f"segmenting feeds it one image")
    session = base if isinstance(base, AdaptedUNETR) else None
    temporary = session is None and adapter_path is not None
    if temporary:
        session = AdaptedUNETR(base)
    if adapter_path is not None:
        session.set_adapter(adapter_path)
    network = session.model if session is not None else base.model
    adapter_card = session.adapter_card if session is not None else None
    model_name = f"base model {card.name!r}"
    if session is not None and session.adapter_card is not None:
        model_name += f" with adapter {session.adapter_card.name!r}"
    was_training = network.training
    network.eval()
    try:
        yield network, card, adapter_card, model_name
    finally:
        network.train(was_training)
        if temporary:
            session.set_adapter(None)  # unmerge: the caller's BaseModel gets its own weights back


def _device_of(network: nn.Module) -> torch.device:
    return next(network.parameters()).device


def _same_device(actual: torch.device, wanted: torch.device) -> bool:
    return actual.type == wanted.type and (wanted.index is None or actual.index == wanted.index)


def _move(network: nn.Module, device: Union[str, torch.device]) -> None:
    """Move a BaseModel's network (in place) to ``device``; ``"auto"`` leaves an in-memory model where it is."""
    if isinstance(device, str) and device.strip().lower() == "auto":
        return
    wanted = resolve_device(device)
    if not _same_device(_device_of(network), wanted):
        network.to(wanted)


def _require_on(network: nn.Module, device: Union[str, torch.device]) -> None:
    """An AdaptedUNETR keeps the base's own decoder and the adapter's tensors beside the network, so it cannot be
    moved piecemeal: refuse a device other than its own."""
    if isinstance(device, str) and device.strip().lower() == "auto":
        return
    wanted, actual = resolve_device(device), _device_of(network)
    if not _same_device(actual, wanted):
        raise ValueError(f"the AdaptedUNETR's network is on {str(actual)!r} but device {device!r} was asked for: "
                         f"load the base on that device (load_base(path, {str(wanted)!r})) before wrapping it")


# ---------------------------------------------------------------------------------------------------- checks


def _check_arguments(overlap: float, sw_batch_size: int, device: Union[str, torch.device], postprocess: str,
                     tta: bool) -> None:
    resolve_device(device)
    if postprocess not in POSTPROCESS_CHOICES:
        raise ValueError(f"--postprocess must be one of {', '.join(POSTPROCESS_CHOICES)}, got {postprocess!r}")
    if not isinstance(tta, bool):
        raise ValueError(f"--tta must be true or false, got {tta!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0 <= overlap < 1 \
            or not math.isfinite(overlap):
        raise ValueError(f"--overlap must be a number in [0, 1), got {overlap!r}")
    if isinstance(sw_batch_size, bool) or not isinstance(sw_batch_size, (int, np.integer)) or sw_batch_size < 1:
        raise ValueError(f"--sw-batch-size must be an integer >= 1, got {sw_batch_size!r}")


def _check_outputs(output_path: PathLike, seg_nrrd_path: Union[PathLike, None],
                   probabilities_path: Union[PathLike, None]) -> tuple:
    """The output paths with their extensions checked (the rest is :func:`_planned_outputs`)."""
    output = Path(output_path)
    name = output.name.lower()
    if name.endswith(volumes.SEGMENTATION_EXTENSION) or not name.endswith(volumes.LABEL_WRITE_EXTENSIONS):
        raise ValueError(f"output label map {str(output)!r} must end with one of "
                         f"{', '.join(volumes.LABEL_WRITE_EXTENSIONS)} (use seg_nrrd_path for "
                         f"{volumes.SEGMENTATION_EXTENSION})")
    seg_nrrd = None if seg_nrrd_path is None else Path(seg_nrrd_path)
    if seg_nrrd is not None and not seg_nrrd.name.lower().endswith(volumes.SEGMENTATION_EXTENSION):
        raise ValueError(f"Slicer segmentation {str(seg_nrrd)!r} must end with {volumes.SEGMENTATION_EXTENSION!r}")
    probabilities = None if probabilities_path is None else Path(probabilities_path)
    if probabilities is not None:
        _probability_extension(probabilities)
    return output, seg_nrrd, probabilities


def _planned_outputs(image: sitk.Image, base: ModelLike, adapter_path: Union[PathLike, None], output: Path,
                     seg_nrrd: Union[Path, None], probabilities: Union[Path, None], overwrite: bool,
                     inputs: Sequence[Union[PathLike, None]]) -> OutputFiles:
    """Every output checked before the work: not an input, not twice, writable, room for its uncompressed size."""
    voxels = int(np.prod(image.GetSize()))
    outputs = OutputFiles(overwrite=overwrite, inputs=inputs)
    outputs.add(output, "label map", expected_bytes=2 * voxels)
    if seg_nrrd is not None:
        outputs.add(seg_nrrd, "Slicer segmentation", expected_bytes=2 * voxels)
    if probabilities is not None:
        outputs.add(probabilities, "probability map", expected_bytes=4 * voxels * _label_count(base, adapter_path))
    return outputs


def _file_of(base: ModelLike) -> Union[Path, None]:
    """The base-model file behind ``base``, if known."""
    if isinstance(base, AdaptedUNETR):
        return base.base.path
    if isinstance(base, BaseModel):
        return base.path
    return Path(base)


def _label_count(base: ModelLike, adapter_path: Union[PathLike, None]) -> int:
    """Output channels of the model that will run, from the cards (headers only: nothing is loaded)."""
    if adapter_path is not None:
        return len(files.read_card(adapter_path, "adapter")["labels"])
    if isinstance(base, AdaptedUNETR):
        return len(base.labels)
    if isinstance(base, BaseModel):
        return len(base.card.labels)
    return len(files.read_card(base, "base")["labels"])


def _probability_extension(path: Path) -> str:
    name = path.name.lower()
    matches = [ext for ext in PROBABILITY_EXTENSIONS if name.endswith(ext)]
    if not matches or name.endswith(volumes.SEGMENTATION_EXTENSION):
        raise ValueError(f"probability map {str(path)!r} must end with one of {', '.join(PROBABILITY_EXTENSIONS)}")
    return max(matches, key=len)


def _image_from_array(array: np.ndarray, geometry: volumes.Geometry) -> sitk.Image:
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"image array must be 3-D (z, y, x), got shape {array.shape}")
    if array.shape != geometry.shape:
        raise ValueError(f"image array has shape {array.shape} but its grid needs {geometry.shape} (z, y, x)")
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"image array must hold real numbers, got dtype {array.dtype}")
    values = array.astype(np.float32, copy=False)
    if not np.all(np.isfinite(values)):
        raise ValueError(f"image array has {int(np.count_nonzero(~np.isfinite(values)))} non-finite voxels")
    return geometry.image_from_array(values)
