"""The engine's public calls, as ``TCURLoRALib`` exports them: segment, train, evaluate, load a base, list adapters.

One argument order everywhere: the inputs first, then ``output_path``; everything else by keyword. Models are
named as users name them: ``base=None`` is the one shipped base model, ``adapter="hippocampus"`` an adapter of the
store (shipped or the user's), and a path names a file. Outputs are checked before the work and published all or
none; an existing output is replaced only with ``overwrite=True``. ``progress`` receives the events of
:mod:`TCURLoRALib.progress`.

Importing this module needs no torch (so the package imports, and lists adapters, before PyTorch is installed);
the calls that compute import it.

Example:
    >>> import TCURLoRALib as tcurlora
    >>> result = tcurlora.segment("t1.nii.gz", "labels.nii.gz", adapter="hippocampus")
    >>> result.volumes_ml
    {'left hippocampus': 3.9, 'right hippocampus': 4.1}
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence, Union

from .progress import Progress, silent
from .settings import POSTPROCESS_CHOICES, TrainSettings
from .store import adapter_store, resolve_adapter, resolve_base

if TYPE_CHECKING:  # torch-based types, imported only to name them
    from .adapter import AdaptedUNETR
    from .basemodel import BaseModel
    from .cards import AdapterCard, ModelCard
    from .demo import DemoRun
    from .metrics import CaseMetrics
    from .segmentation import SegmentationResult

__all__ = ["TrainingResult", "evaluate", "load_base", "pretrain", "run_demo", "segment", "train_adapter"]

PathLike = Union[str, "os.PathLike[str]"]
BaseLike = Union[PathLike, "BaseModel", "AdaptedUNETR", None]


@dataclass(frozen=True)
class TrainingResult:
    """What :func:`train_adapter` and :func:`pretrain` wrote: the file and its card."""

    output_path: Path
    card: Union[AdapterCard, ModelCard]


def load_base(base: PathLike | None = None, device: str = "cpu") -> BaseModel:
    """The frozen base model: the file ``base`` names, or the shipped one when ``base`` is None.

    Args:
        base: a base-model file, or None for the one shipped base.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``.

    Raises:
        FileNotFoundError, ValueError, TCURLoRAFileError: no such file, no (or several) shipped bases, a damaged
            or foreign file.
    """
    from . import basemodel
    from .devices import resolve_device

    return basemodel.load_base(resolve_base(base), resolve_device(device))


def segment(
    image_path: PathLike,
    output_path: PathLike,
    *,
    adapter: PathLike | None = None,
    base: BaseLike = None,
    seg_nrrd_path: PathLike | None = None,
    probabilities_path: PathLike | None = None,
    overlap: float = 0.25,
    sw_batch_size: int = 1,
    device: str = "auto",
    threads: int | None = None,
    postprocess: str = POSTPROCESS_CHOICES[0],
    tta: bool = False,
    overwrite: bool = False,
    progress: Progress = silent,
) -> SegmentationResult:
    """Segment an image with the base and an adapter; write the label map (and more) on the image's grid.

    Args:
        image_path: 3-D scalar image (.nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd).
        output_path: label map to write (.nii.gz, .nii, .nrrd, .mha).
        adapter: an adapter's name in the store or its file; None (or ``"none"``) for the base alone.
        base: a base-model file, None for the shipped base, or a loaded :class:`BaseModel` / :class:`AdaptedUNETR`
            (to segment many images with one load).
        seg_nrrd_path: also write a Slicer segmentation with the labels' names and colours.
        probabilities_path: also write the softmax probabilities.
        overlap: sliding-window overlap in [0, 1).
        sw_batch_size: windows per forward pass.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        threads: torch CPU threads for this call (None: torch's setting).
        postprocess: ``"largest-component"`` (default): each label the adapter's card declares one connected piece
            keeps only its largest component (nothing changes for a card that declares none); ``"none"``: the
            network's own label map. The default is what the quality benchmark measured best (HD95 of the shipped
            hippocampus adapter on another template and protocol 34.2 -> 13.0 mm; Testing/benchmarks/README.md).
        tta: test-time left/right mirroring: twice the time; needs left/right label pairs.
        overwrite: replace outputs that exist.
        progress: receives ``start``, a ``step`` a window, ``done``.

    Returns:
        the written paths, the labels and each label's volume in mL.
    """
    from . import segmentation

    model = base if _is_loaded(base) else resolve_base(base)
    with _torch_threads(threads):
        return segmentation.segment(image_path, model, output_path, adapter_path=resolve_adapter(adapter),
                                    seg_nrrd_path=seg_nrrd_path, probabilities_path=probabilities_path,
                                    overlap=overlap, sw_batch_size=sw_batch_size, device=device,
                                    postprocess=postprocess, tta=tta, overwrite=overwrite, progress=progress)


def train_adapter(
    cases: PathLike | Sequence[Any],
    output_path: PathLike | None = None,
    *,
    name: str | None = None,
    base: PathLike | None = None,
    labels: Sequence[Any] | None = None,
    label_map: Mapping[str, Any] | str | None = None,
    parent: PathLike | None = None,
    one_piece: Sequence[str] | str | None = None,
    settings: TrainSettings | None = None,
    overwrite: bool = False,
    progress: Progress = silent,
    parallel: Any = None,
    **changes: Any,
) -> TrainingResult | None:
    """Train a tCURLoRA adapter on a few cases and write it.

    Args:
        cases: a folder of cases, a JSON case list, or a list of ``(image, label)`` pairs, dicts or TrainingCases.
        output_path: the adapter file to write; None: ``name`` in the user's adapter folder.
        name: the adapter's name (default: the file name of ``output_path``).
        base: a base-model file; None for the shipped base.
        labels: the adapter's labels: names (``["left hippocampus", "right hippocampus"]``: values 1, 2, ...), a
            full list of ``{value, name, color}``, or None (new names in ``label_map``, else the parent's or the
            base's labels).
        label_map: case structure (label value or segment name) -> adapter label.
        parent: an adapter (name or file) to continue from.
        one_piece: labels that are one connected piece (names, or ``"all"``), recorded in the card so that
            :func:`segment` keeps only their largest component; None: the parent's declaration, else none.
        settings: :class:`TrainSettings`; ``**changes`` replace single fields (``steps=100``).
        overwrite: replace an existing adapter of that name or file.
        progress: receives ``log``, ``start``, ``step``, ``metric`` and ``done`` events.
        parallel: under torchrun, the :func:`torchrun_session`'s processes (default: this process alone).

    Returns:
        the file and its card; None in a torchrun process other than the first (which alone writes).

    Raises:
        ValueError: neither ``output_path`` nor ``name``; bad settings, cases or labels (the message says which).
    """
    from . import train

    output, name = _adapter_output(output_path, name, overwrite)
    card = train.train_adapter(resolve_base(base), cases, labels, output, name=name, label_map=label_map,
                               parent_adapter=resolve_adapter(parent), one_piece=one_piece, settings=settings,
                               overwrite=overwrite,
                               progress=progress, **_parallel(parallel), **changes)
    return None if card is None else TrainingResult(output, card)


def pretrain(cases: PathLike | Sequence[Any], card_fields: Mapping[str, Any], output_path: PathLike,
             **options: Any) -> TrainingResult | None:
    """Train a whole UNETR from scratch into a base-model file.

    Args:
        cases: training cases, as for :func:`train_adapter`.
        card_fields: every model-card field but the fingerprint; its labels are the network's outputs.
        output_path: the base-model file to write.
        **options: ``label_map``, ``settings`` (default :meth:`TrainSettings.for_pretraining`), ``overwrite``,
            ``progress``, ``parallel`` and single settings fields, as :func:`TCURLoRALib.train.pretrain` takes them.

    Returns:
        as :func:`train_adapter`.
    """
    from . import train

    card = train.pretrain(cases, card_fields, output_path, **options)
    return None if card is None else TrainingResult(Path(output_path), card)


def evaluate(
    prediction_paths: Sequence[PathLike],
    reference_paths: Sequence[PathLike],
    *,
    json_path: PathLike | None = None,
    csv_path: PathLike | None = None,
    labels: Sequence[Any] | None = None,
    case_names: Sequence[str] | None = None,
    threads: int | None = None,
    overwrite: bool = False,
    progress: Progress = silent,
) -> list[CaseMetrics]:
    """Dice and HD95 (mm) per label of each prediction against its reference; optionally written as JSON and CSV.

    A label absent from both maps counts as Dice 1.0 (as in training's validation). The metric files are checked
    before the work and written together.

    Raises:
        ValueError: different numbers of predictions and references, maps on different grids, no label.
    """
    from . import metrics
    from .outputs import OutputFiles

    if len(prediction_paths) != len(reference_paths):
        raise ValueError(f"{len(prediction_paths)} predictions but {len(reference_paths)} references: give one "
                         "reference per prediction, in the same order")
    outputs = OutputFiles(overwrite=overwrite, inputs=[*prediction_paths, *reference_paths])
    reports = {}
    if json_path:
        reports[outputs.add(json_path, "metrics JSON")] = metrics.write_json
    if csv_path:
        reports[outputs.add(csv_path, "metrics CSV")] = metrics.write_csv
    with _torch_threads(threads):
        cases = metrics.evaluate(prediction_paths, reference_paths, labels, case_names=case_names,
                                 progress=progress)
    outputs.publish({path: lambda temporary, write=write: write(temporary, cases) for path, write in reports.items()})
    return cases


def run_demo(
    output_folder: PathLike = "tcurlora-demo",
    *,
    image_path: PathLike | None = None,
    reference_path: PathLike | None = None,
    base: PathLike | None = None,
    device: str = "auto",
    threads: int | None = None,
    overwrite: bool = False,
    progress: Progress = silent,
) -> list[DemoRun]:
    """Segment the shipped sample (or ``image_path``) with the base alone and each shipped adapter.

    Writes each model's label map, .seg.nrrd and PNG overlays into ``output_folder``; reports volumes and, against
    the reference (the shipped sample's tissue map by default), Dice.
    """
    from .demo import run_models
    from .paths import SAMPLE_IMAGE, SAMPLE_REFERENCE, shipped_samples_dir

    samples = shipped_samples_dir()
    image = Path(image_path) if image_path else samples / SAMPLE_IMAGE
    reference = reference_path or (None if image_path else samples / SAMPLE_REFERENCE)
    shipped = [entry for entry in adapter_store().list() if entry.source == "shipped"]
    with _torch_threads(threads):
        return run_models(resolve_base(base), shipped, image, output_folder, reference_path=reference, device=device,
                        overwrite=overwrite, progress=progress)


def _adapter_output(output_path: PathLike | None, name: str | None, overwrite: bool) -> tuple[Path, str | None]:
    if output_path:
        output = Path(output_path)
        return output, name or output.name.removesuffix(".safetensors")
    if not name:
        raise ValueError("give the new adapter a name (--name: saved in your adapter folder) or an output file "
                         "(-o/--output)")
    return adapter_store().path_for_new(name, overwrite=overwrite), name


def _parallel(parallel: Any) -> dict[str, Any]:
    """``parallel`` for train's calls, left out when None so that their default (one process) holds."""
    return {} if parallel is None else {"parallel": parallel}


def _is_loaded(base: Any) -> bool:
    return base is not None and not isinstance(base, (str, os.PathLike))


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """torch's CPU thread count set to ``threads`` for a call, and restored after it."""
    if threads is None:
        yield
        return
    TrainSettings(threads=threads)  # the one check of the value
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
