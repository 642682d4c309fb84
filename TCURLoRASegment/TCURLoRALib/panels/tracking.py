"""Progress of a background job as the panels show it: percent, status line and log lines, and the training chart.

Events are those of :mod:`TCURLoRALib.progress` (one JSON object a line from the child) plus the job runner's own
``log`` and ``finished`` events (:class:`~TCURLoRALib.jobs.Job`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ..progress import format_duration

__all__ = ["ProgressTracker", "ProgressUpdate", "TrainingChart", "TrainingCurves", "format_duration"]


def _format_number(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


@dataclass
class ProgressUpdate:
    """What the panel shows after one event; a None field leaves that widget as it is.

    Args:
        percent: progress bar value 0-100.
        status: the status line.
        log: a line for the log.
        finished: the job ended (``state`` then says how: ``"done"``, ``"failed"`` or ``"cancelled"``).
        error: the error message of a failed job.
    """

    percent: int | None = None
    status: str | None = None
    log: str | None = None
    finished: bool = False
    state: str | None = None
    error: str | None = None


class ProgressTracker:
    """Turns a job's events into :class:`ProgressUpdate` objects.

    It remembers the task and total of the latest ``start`` event, which the ``step`` events do not repeat.
    """

    def __init__(self) -> None:
        self.task = ""
        self.total: int | None = None

    def update(self, event: Mapping[str, Any]) -> ProgressUpdate:
        kind = event.get("event")
        if kind == "start":
            self.task = str(event.get("task") or "")
            self.total = event.get("total")
            return ProgressUpdate(percent=0, status=f"{self.task}: started",
                                  log=f"{self.task}: started ({self.total} steps)")
        if kind == "step":
            return self._step(event)
        if kind == "metric":
            at = f" at step {event['step']}" if event.get("step") is not None else ""
            return ProgressUpdate(log=f"{event.get('name')} = {_format_number(event.get('value'))}{at}")
        if kind == "done":
            seconds = event.get("seconds")
            took = f" in {format_duration(seconds)}" if isinstance(seconds, (int, float)) else ""
            return ProgressUpdate(percent=100, status=f"{self.task or 'job'}: done{took}", log=f"done{took}")
        if kind == "error":
            return ProgressUpdate(log=f"error ({event.get('kind', 'internal')}): {event.get('message')}")
        if kind == "log":
            return ProgressUpdate(log=str(event.get("message", "")))
        if kind == "finished":
            return self._finished(event)
        return ProgressUpdate(log=json.dumps(dict(event)))

    def _step(self, event: Mapping[str, Any]) -> ProgressUpdate:
        step = int(event.get("step") or 0)
        total = event.get("total") or self.total
        percent = min(100, int(100 * step / total)) if total else None
        parts = [f"{self.task or 'job'}: step {step}" + (f"/{total}" if total else "")]
        if event.get("loss") is not None:
            parts.append(f"loss {event['loss']:.4f}")
        eta = format_duration(event.get("eta_s"))
        if eta:
            parts.append(f"about {eta} left")
        return ProgressUpdate(percent=percent, status=", ".join(parts))

    @staticmethod
    def _finished(event: Mapping[str, Any]) -> ProgressUpdate:
        state = str(event.get("state"))
        if state == "done":
            return ProgressUpdate(percent=100, finished=True, state=state)
        if state == "cancelled":
            return ProgressUpdate(status="Cancelled", log="cancelled", finished=True, state=state)
        message = str(event.get("error") or f"exit code {event.get('returncode')}")
        return ProgressUpdate(status=f"Failed: {message}", log=f"failed: {message}", finished=True, state=state,
                              error=message)


@dataclass
class TrainingCurves:
    """The rows of the training chart: loss at every step, validation mean Dice when measured.

    Attributes:
        loss_steps, losses: one row per ``step`` event that carried a loss.
        dice_steps, dices: one row per ``metric`` event named ``validation_mean_dice``.
        eta_s: the latest estimate of the seconds left.
    """

    loss_steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    dice_steps: list[int] = field(default_factory=list)
    dices: list[float] = field(default_factory=list)
    eta_s: float | None = None

    DICE_METRIC = "validation_mean_dice"

    def add(self, event: Mapping[str, Any]) -> bool:
        """Records one event; returns whether a chart row was added (other events are ignored)."""
        kind = event.get("event")
        if kind == "step":
            if event.get("eta_s") is not None:
                self.eta_s = float(event["eta_s"])
            if event.get("loss") is None or event.get("step") is None:
                return False
            self.loss_steps.append(int(event["step"]))
            self.losses.append(float(event["loss"]))
            return True
        if kind == "metric" and event.get("name") == self.DICE_METRIC and event.get("value") is not None:
            # The initial validation of an improved adapter comes at step 0.
            self.dice_steps.append(int(event.get("step") or 0))
            self.dices.append(float(event["value"]))
            return True
        return False


class TrainingChart:
    """A plot chart of training loss and validation mean Dice against the step, in a given scene.

    Creates two table nodes (columns ``step`` and ``loss`` / ``dice``), a scatter series on each and the chart node;
    showing the chart in the view layout is the module's job (it needs Slicer's application).

    Args:
        scene: the MRML scene (``slicer.mrmlScene`` in Slicer, any ``vtkMRMLScene`` elsewhere).
        name: the adapter's name, used in the node names and the title.
    """

    SERIES = (("loss", "training loss", (0.85, 0.3, 0.1)), ("dice", "validation mean Dice", (0.1, 0.45, 0.85)))

    def __init__(self, scene: Any, name: str):
        self.chart_node = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{name} training")
        self.chart_node.SetTitle(f"Training {name}")
        self.chart_node.SetXAxisTitle("step")
        self.chart_node.SetYAxisTitle("loss / Dice")
        self.table_nodes = {}
        for column, title, color in self.SERIES:
            table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{name} {column}")
            series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", title)
            series.SetAndObserveTableNodeID(table_node.GetID())
            series.SetXColumnName("step")
            series.SetYColumnName(column)
            series.SetPlotType(series.PlotTypeScatter)
            series.SetMarkerStyle(series.MarkerStyleNone if column == "loss" else series.MarkerStyleCircle)
            series.SetColor(*color)
            self.chart_node.AddAndObservePlotSeriesNodeID(series.GetID())
            self.table_nodes[column] = table_node
            _set_columns(table_node, {"step": [], column: []})

    def update(self, curves: TrainingCurves) -> None:
        """Puts the curves' rows into the tables (all rows, replacing what was there)."""
        _set_columns(self.table_nodes["loss"], {"step": curves.loss_steps, "loss": curves.losses})
        _set_columns(self.table_nodes["dice"], {"step": curves.dice_steps, "dice": curves.dices})


def _set_columns(table_node: Any, columns: Mapping[str, Sequence[float]]) -> None:
    """Replaces a table node's columns, as ``slicer.util.updateTableFromArray`` does, without numpy."""
    import vtk

    table_node.RemoveAllColumns()
    for name, values in columns.items():
        array = vtk.vtkDoubleArray()
        array.SetName(name)
        array.SetNumberOfTuples(len(values))
        for index, value in enumerate(values):
            array.SetValue(index, float(value))
        table_node.AddColumn(array)
