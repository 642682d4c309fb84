"""A segmentation or a training from the scene's nodes to a background job, and the job's result back into MRML.

These are the panels' logic: the Slicer modules' Logic classes and widgets call them, scripts and tests may too.
A run returns as soon as its job has started; the panel polls it from a timer, scripts call ``wait``.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

from . import engine
from .arguments import segment_arguments, train_arguments
from .export import adapter_labels, export_cases, write_labels_json
from .nodes import segment_colors
from .requirements import python_for_jobs
from .tracking import ProgressTracker, ProgressUpdate, TrainingChart, TrainingCurves

__all__ = ["Run", "SegmentationRun", "TrainingRun"]


class Run:
    """A started job and the tracker of its progress.

    Args:
        job: a started :class:`~TCURLoRALib.jobs.Job`.
    """

    def __init__(self, job: Any):
        self.job = job
        self.tracker = ProgressTracker()
        self.outcome: ProgressUpdate | None = None

    def poll(self) -> list[ProgressUpdate]:
        """The updates of the events that arrived since the last call (never blocks); the last one is ``finished``
        when the job ended, and is kept as :attr:`outcome`."""
        updates = []
        for event in self.job.poll_events():
            self.take(event)
            update = self.tracker.update(event)
            updates.append(update)
            if update.finished:
                self.outcome = update
        return updates

    def take(self, event: Mapping[str, Any]) -> None:
        """Hook for subclasses that record events (the training curves)."""

    def cancel(self, grace_seconds: float = 10.0) -> None:
        """Asks the job to stop; returns at once (see :meth:`~TCURLoRALib.jobs.Job.cancel`)."""
        self.job.cancel(grace_seconds)

    def wait(self, timeout: float | None = None) -> str:
        """Blocks until the job ended (scripts and tests; the GUI polls); returns its state's name.

        A job still running after ``timeout`` seconds is killed (and reported ``"cancelled"``): a script that gave
        up waiting must not leave it running.
        """
        if self.job.wait(timeout).value == "running":
            self.job.cancel(grace_seconds=0)
            self.job.wait()
        self.poll()
        return self.job.state.value

    def failure(self, lines: int = 20) -> str:
        """The state, the error and the last log lines, for an exception or an error dialog."""
        return f"{self.job.state.value}: {self.job.error}\n" + "\n".join(self.job.log[-lines:])


class SegmentationRun(Run):
    """Segmenting one volume: exported to a work folder, segmented by ``python -m TCURLoRALib segment``, imported.

    Attributes:
        volume: the input volume node; labels: the adapter's (or base's) labels; adapter: its store name or None.
    """

    def __init__(self, job: Any, volume: Any, labels: Sequence[Any], output_folder: Path, adapter: str | None):
        super().__init__(job)
        self.volume = volume
        self.labels = list(labels)
        self.output_folder = output_folder
        self.adapter = adapter

    @property
    def output_path(self) -> Path:
        # Outside the job's work folder, which the job removes when it succeeds.
        return self.output_folder / "labels.nii.gz"

    @classmethod
    def start(cls, volume: Any, adapter: str | None, device: str = "auto", overlap: float = 0.25,
              base: str | os.PathLike | None = None, python: str | None = None, *, postprocess: str | None = None,
              tta: bool = False) -> SegmentationRun:
        """Exports ``volume`` and starts the segmentation; returns at once.

        Args:
            volume: a scalar volume node with image data.
            adapter: store name of the adapter; None or ``""`` for the base alone.
            device, overlap, base, postprocess, tta: see :func:`~.arguments.segment_arguments`.
            python: the interpreter (default: :func:`~.requirements.python_for_jobs`).

        Raises:
            ValueError: no volume, bad settings, a volume that cannot be exported.
            FileNotFoundError: an unknown adapter.
        """
        from .. import jobs, mrml

        if volume is None:
            raise ValueError("Select an input volume")
        adapter = adapter or None
        labels = engine.labels_of(adapter, base)
        work = Path(tempfile.mkdtemp(prefix="tcurlora-segment-"))
        output = Path(tempfile.mkdtemp(prefix="tcurlora-result-"))
        try:
            image = mrml.export_volume(volume, work / "input.nii.gz")
            arguments = segment_arguments(image, output / "labels.nii.gz", adapter=adapter, device=device,
                                          overlap=overlap, base=base, postprocess=postprocess, tta=tta)
            job = jobs.Job(arguments, python=python or python_for_jobs(sys.executable), work_dir=work)
            job.start()
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(output, ignore_errors=True)
            raise
        return cls(job, volume, labels, output, adapter)

    def finish(self, segmentation_node: Any = None) -> Any:
        """Imports the finished job's label map as segments over the input volume; the output folder goes.

        Returns:
            the segmentation node (``segmentation_node`` when given, its segments replaced, else a new one named
            after the volume and the adapter).
        """
        from .. import mrml

        try:
            name = f"{self.volume.GetName()} {self.adapter or 'base'}"
            node = mrml.import_label_map(self.output_path, self.labels, self.volume,
                                         segmentation_node=segmentation_node, name=name)
        finally:
            self.discard()
        node.CreateDefaultDisplayNodes()
        return node

    def discard(self) -> None:
        """Removes the output folder (the job keeps its own work folder after a failure, for the log)."""
        shutil.rmtree(self.output_folder, ignore_errors=True)


class TrainingRun(Run):
    """Training an adapter: cases exported, ``python -m TCURLoRALib train`` run, the adapter saved in the store.

    Attributes:
        name: the new adapter's name; curves: the loss and Dice rows so far; chart: a :class:`TrainingChart` the
            panel attached (updated by :meth:`poll`), or None.
    """

    def __init__(self, job: Any, name: str):
        super().__init__(job)
        self.name = name
        self.curves = TrainingCurves()
        self.chart: TrainingChart | None = None
        self._curves_changed = False

    def take(self, event: Mapping[str, Any]) -> None:
        self._curves_changed = self.curves.add(event) or self._curves_changed

    def poll(self) -> list[ProgressUpdate]:
        updates = super().poll()
        if self._curves_changed and self.chart is not None:
            self.chart.update(self.curves)
        self._curves_changed = False
        return updates

    @classmethod
    def start(
        cls,
        cases: Sequence[tuple[Any, Any]],
        mapping: Mapping[str, str],
        name: str,
        *,
        parent: str | None = None,
        base: str | os.PathLike | None = None,
        rank: int | None = None,
        steps: int | None = None,
        lr: float | None = None,
        device: str = "auto",
        annotated_slices_only: bool = False,
        seed: int | None = None,
        minutes: float | None = None,
        mirror: bool = False,
        python: str | None = None,
    ) -> TrainingRun:
        """Exports the cases and starts the training; returns at once.

        Args:
            cases: (volume node, segmentation node) pairs.
            mapping: segment name -> adapter label name (``""`` leaves the segment out).
            name: the new adapter's name; it must be free in the store (checked before any export).
            parent: store name of the adapter to improve (its labels and rank are kept), or None.
            base: base-model file, None for the shipped base.
            rank, steps, lr, device, seed: training settings (None: the engine's defaults); no rank with a parent.
            annotated_slices_only: train on the slices that hold a segment voxel only.
            minutes: wall-time budget of the training (None: ``steps`` alone decides).
            mirror: also train on the cases mirrored left/right (the labels need left/right pairs, or the job exits
                with the engine's message naming them).
            python: the interpreter (default: :func:`~.requirements.python_for_jobs`).

        Raises:
            ValueError, FileExistsError, FileNotFoundError: bad settings, a name that is taken, an unknown parent.
        """
        from .. import jobs

        name = engine.check_new_adapter_name(name)
        parent = parent or None
        start_labels = engine.labels_of(parent, base)
        colors: dict[str, tuple[float, float, float]] = {}
        for _volume, segmentation in cases:
            colors.update(segment_colors(segmentation))
        labels, by_segment = adapter_labels(mapping, start_labels, colors)
        work = Path(tempfile.mkdtemp(prefix="tcurlora-train-"))
        try:
            cases_json = export_cases(cases, by_segment, work, annotated_slices_only)
            labels_json = write_labels_json(work / "labels.json", labels) if labels != start_labels else None
            arguments = train_arguments(cases_json, name=name, base=base, parent=parent, labels_json=labels_json,
                                        rank=rank, steps=steps, lr=lr, device=device, seed=seed, minutes=minutes,
                                        mirror=mirror)
            job = jobs.Job(arguments, python=python or python_for_jobs(sys.executable), work_dir=work)
            job.start()
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        return cls(job, name)
