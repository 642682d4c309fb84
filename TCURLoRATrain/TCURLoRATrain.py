"""TCURLoRA Train: fine-tune a new tCURLoRA adapter on a few locally annotated cases.

This file holds only the Slicer classes. The engine package ``TCURLoRALib`` lives in the TCURLoRASegment module's
folder; it and its dependencies (PyTorch, MONAI) are imported when a button needs them, never when Slicer loads
the module.
"""
from __future__ import annotations

import enum
import logging
import os
import shutil
import sys
import tempfile
import unittest
from typing import Annotated

import ctk
import qt
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Decimals, Default, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

ENGINE_PACKAGE = "TCURLoRALib"


def _findEngineFolder() -> str | None:
    """Returns the folder that holds the ``TCURLoRALib`` package, or None where it is missing.

    In an installed extension every scripted module of the extension lands in one ``qt-scripted-modules`` folder,
    so the package sits next to this file; in the source tree it sits in the sibling ``TCURLoRASegment/`` folder.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (here, os.path.normpath(os.path.join(here, os.pardir, "TCURLoRASegment"))):
        if os.path.isfile(os.path.join(candidate, ENGINE_PACKAGE, "__init__.py")):
            return candidate
    return None


def _addEngineToPath() -> None:
    """Puts the engine folder first on ``sys.path`` so that ``import TCURLoRALib`` finds this copy.

    Only the path is changed here: importing the package would import torch at Slicer startup.
    """
    folder = _findEngineFolder()
    if folder is None:
        # Loading the module must not fail: the panel then reports the missing engine when asked.
        logging.warning(f"{ENGINE_PACKAGE} not found near {__file__!r}")
        return
    if folder not in sys.path:
        sys.path.insert(0, folder)


_addEngineToPath()


#
# TCURLoRATrain
#


class TCURLoRATrain(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("TCURLoRA Train")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        # The engine check of this panel reuses the Segment module's logic.
        self.parent.dependencies = ["TCURLoRASegment"]
        self.parent.contributors = ["TCURLoRA contributors"]
        self.parent.helpText = _("""
Fine-tune a new tCURLoRA adapter of the frozen UNETR on a few locally annotated cases, in a background process.
Trained adapters become selectable in the <b>TCURLoRA Segment</b> module.
The <b>Engine</b> section shows where the engine package lives and whether PyTorch and MONAI can be imported.
""")
        self.parent.acknowledgementText = _("""
The adapter method is tCURLoRA: He, Cheng, Zhu, Cai, Yu, "tCURLoRA: Tensor CUR Decomposition Based Low-Rank
Parameter Adaptation and Its Application in Medical Image Segmentation", MICCAI 2025.
The segmentation network is MONAI's UNETR.
""")


#
# TCURLoRATrainParameterNode
#


class Device(enum.Enum):
    """Where the background process trains; values are the CLI's ``--device`` spellings."""

    AUTO = "auto"
    CPU = "cpu"
    GPU = "cuda"

    def label(self) -> str:
        """Text of the device combo box (read by the parameter node's combo-box connector)."""
        return {"auto": _("Auto (GPU if available)"), "cpu": _("CPU"), "cuda": _("GPU (CUDA)")}[self.value]


@parameterNodeWrapper
class TCURLoRATrainParameterNode:
    """Choices of the Train panel, saved with the scene.

    trainingVolume, trainingSegmentation - the pair that "Add case" appends to the case list.
    caseVolumes, caseSegmentations - the training cases, pairwise.
    adapterName - name of the new adapter (saved in the user's adapter folder).
    improveAdapter, parentAdapter - continue from an existing adapter (its store name).
    rank, steps, learningRate - training settings; defaults are the engine's (Testing checks they agree).
    annotatedSlicesOnly - train only on the slices (k axis) that hold a segment voxel.
    device - where training runs.
    """

    trainingVolume: vtkMRMLScalarVolumeNode
    trainingSegmentation: vtkMRMLSegmentationNode
    caseVolumes: list[vtkMRMLScalarVolumeNode]
    caseSegmentations: list[vtkMRMLSegmentationNode]
    adapterName: str
    improveAdapter: bool
    parentAdapter: str
    rank: Annotated[int, WithinRange(1, 64), Default(16)]
    steps: Annotated[int, WithinRange(1, 100000), Default(200)]
    learningRate: Annotated[float, WithinRange(1e-6, 1.0), Default(1e-2), Decimals(6)]
    annotatedSlicesOnly: bool
    device: Device


#
# TCURLoRATrainWidget
#


class TCURLoRATrainWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The Train panel: gathers inputs and shows results; all work is done by the logic."""

    POLL_INTERVAL_MS = 200

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic: TCURLoRATrainLogic | None = None
        self._parameterNode: TCURLoRATrainParameterNode | None = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._tracker = None
        self._curves = None
        self._chart = None
        self._timer = None

    def setup(self) -> None:
        """Builds the panel from its .ui file; called once, when the user first opens the module."""
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/TCURLoRATrain.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        # The .ui file connects the top-level mrmlSceneChanged signal to every node selector.
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = TCURLoRATrainLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.checkEngineButton.connect("clicked(bool)", self.onCheckEngineButton)
        self.ui.addCaseButton.connect("clicked(bool)", self.onAddCase)
        self.ui.removeCaseButton.connect("clicked(bool)", self.onRemoveCase)
        self.ui.refreshMappingButton.connect("clicked(bool)", self.refreshMapping)
        self.ui.parentAdapterComboBox.connect("currentIndexChanged(int)", self.onParentAdapterChanged)
        self.ui.startButton.connect("clicked(bool)", self.onStartButton)
        # Found on disk only: the import (and with it torch) waits for the button.
        engineFolder = self.logic.engineFolder()
        self.ui.engineLocationLabel.text = (
            os.path.join(engineFolder, ENGINE_PACKAGE) if engineFolder else _("not found")
        )
        self.ui.baseModelPathLineEdit.filters = ctk.ctkPathLineEdit.Files
        self.ui.baseModelPathLineEdit.nameFilters = ["Base model (*.safetensors)"]

        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPollJob)
        self.ui.progressBar.setValue(0)

        self.initializeParameterNode()
        self.refreshParentAdapters()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        if self._timer is not None:
            self._timer.stop()
        if self._job is not None and not self._job.finished:
            self._job.cancel(grace_seconds=2.0)
        self.removeObservers()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        self.initializeParameterNode()

    def exit(self) -> None:
        """Called each time the user opens a different module."""
        # The GUI is brought up to date again on enter(); until then it need not follow the parameter node.
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)

    def onSceneStartClose(self, caller, event) -> None:
        """Called just before the scene is closed: the parameter node is about to go away."""
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        """Called just after the scene is closed: a shown panel needs a new parameter node at once."""
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Makes sure a parameter node exists and is observed; preselects the first volume and segmentation."""
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.trainingVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.trainingVolume = firstVolumeNode
        if not self._parameterNode.trainingSegmentation:
            firstSegmentationNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
            if firstSegmentationNode:
                self._parameterNode.trainingSegmentation = firstSegmentationNode

    def setParameterNode(self, inputParameterNode: TCURLoRATrainParameterNode | None) -> None:
        """Connects the GUI to a parameter node (widgets carry a SlicerParameterName property in the .ui)."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
        self._updateGui()

    def _updateGui(self, caller=None, event=None) -> None:
        p = self._parameterNode
        segmentationNode = p.trainingSegmentation if p else None
        if segmentationNode is None:
            self.ui.trainingSegmentsLabel.text = _("No segmentation selected")
        else:
            self.ui.trainingSegmentsLabel.text = self.logic.describeSegmentation(segmentationNode)
        self._updateCasesTable()
        running = self._job is not None
        improving = bool(p and p.improveAdapter)
        self.ui.parentAdapterComboBox.enabled = improving and not running
        # An improved adapter keeps its parent's rank.
        self.ui.rankSpinBox.enabled = not improving and not running
        self.ui.addCaseButton.enabled = bool(p and p.trainingVolume and p.trainingSegmentation) and not running
        ready = bool(p and p.caseVolumes and p.adapterName.strip())
        self.ui.startButton.enabled = running or ready
        self.ui.startButton.text = _("Cancel") if running else _("Start training")
        if p:
            index = self.ui.parentAdapterComboBox.findData(p.parentAdapter)
            if index >= 0 and index != self.ui.parentAdapterComboBox.currentIndex:
                self.ui.parentAdapterComboBox.currentIndex = index

    # -------------------------------------------------------------------------------- cases and mapping

    def _cases(self) -> list:
        p = self._parameterNode
        if not p:
            return []
        return [(v, s) for v, s in zip(p.caseVolumes, p.caseSegmentations) if v is not None and s is not None]

    def _updateCasesTable(self) -> None:
        table = self.ui.casesTableWidget
        cases = self._cases()
        table.setRowCount(len(cases))
        for row, (volumeNode, segmentationNode) in enumerate(cases):
            for column, text in enumerate((volumeNode.GetName(), segmentationNode.GetName(),
                                           self.logic.describeSegmentation(segmentationNode))):
                item = qt.QTableWidgetItem(text)
                item.setFlags(qt.Qt.ItemIsSelectable | qt.Qt.ItemIsEnabled)
                table.setItem(row, column, item)

    def onAddCase(self) -> None:
        """Appends the chosen volume and segmentation to the cases (a pair already listed is not added twice)."""
        p = self._parameterNode
        pair = (p.trainingVolume, p.trainingSegmentation)
        if any(v.GetID() == pair[0].GetID() and s.GetID() == pair[1].GetID() for v, s in self._cases()):
            return
        with slicer.util.NodeModify(p.GetNode()):
            p.caseVolumes.append(pair[0])
            p.caseSegmentations.append(pair[1])
        self.refreshMapping()

    def onRemoveCase(self) -> None:
        """Removes the selected rows from the cases."""
        p = self._parameterNode
        rows = sorted({index.row() for index in self.ui.casesTableWidget.selectedIndexes()}, reverse=True)
        with slicer.util.NodeModify(p.GetNode()):
            for row in rows:
                if row < len(p.caseVolumes):
                    del p.caseVolumes[row]
                    del p.caseSegmentations[row]
        self.refreshMapping()

    def refreshMapping(self) -> None:
        """Lists every segment name of the cases with its adapter label (default: the label of the same name)."""
        names = []
        for _volumeNode, segmentationNode in self._cases():
            segmentation = segmentationNode.GetSegmentation()
            for index in range(segmentation.GetNumberOfSegments()):
                name = segmentation.GetNthSegment(index).GetName()
                if name not in names:
                    names.append(name)
        current = self._mappingFromTable()
        try:
            labelNames = [label.name for label in self.logic.labelsToStartFrom(self._parentName(), self._basePath())]
        except Exception as error:  # noqa: BLE001  before the first Start the engine may not import yet
            logging.info(f"labels of the base model not read: {error}")
            labelNames = []
        from TCURLoRALib.panel import default_label_mapping

        mapping = default_label_mapping(names, labelNames)
        mapping.update({name: current[name] for name in names if name in current})
        table = self.ui.labelMappingTableWidget
        table.setRowCount(len(mapping))
        for row, (segmentName, labelName) in enumerate(mapping.items()):
            item = qt.QTableWidgetItem(segmentName)
            item.setFlags(qt.Qt.ItemIsSelectable | qt.Qt.ItemIsEnabled)
            table.setItem(row, 0, item)
            table.setItem(row, 1, qt.QTableWidgetItem(labelName))
        self.ui.adapterLabelsLabel.text = ", ".join(labelNames[1:]) if labelNames else _("(engine not ready)")

    def _mappingFromTable(self) -> dict:
        table = self.ui.labelMappingTableWidget
        mapping = {}
        for row in range(table.rowCount):
            segmentItem, labelItem = table.item(row, 0), table.item(row, 1)
            if segmentItem is not None:
                mapping[segmentItem.text()] = labelItem.text().strip() if labelItem is not None else ""
        return mapping

    # -------------------------------------------------------------------------------- adapters

    def refreshParentAdapters(self) -> None:
        """Fills the "improve" combo box with the adapters of the store."""
        combo = self.ui.parentAdapterComboBox
        wasBlocked = combo.blockSignals(True)
        try:
            combo.clear()
            try:
                from TCURLoRASegment import TCURLoRASegmentLogic

                choices = [c for c in TCURLoRASegmentLogic().adapterChoices() if c.name]
            except Exception as error:  # noqa: BLE001  the panel must open whatever the engine's state
                choices = []
                self.ui.statusLabel.text = _("Adapters are listed once PyTorch and MONAI are installed: "
                                             "{error}").format(error=error)
            for choice in choices:
                combo.addItem(choice.text, choice.name)
                combo.setItemData(combo.count - 1, choice.tooltip, qt.Qt.ToolTipRole)
        finally:
            combo.blockSignals(wasBlocked)
        self._updateGui()

    def onParentAdapterChanged(self, index: int) -> None:
        combo = self.ui.parentAdapterComboBox
        combo.toolTip = combo.itemData(index, qt.Qt.ToolTipRole) or ""
        if self._parameterNode and index >= 0:
            self._parameterNode.parentAdapter = combo.itemData(index) or ""
        self.refreshMapping()

    def _parentName(self) -> str | None:
        p = self._parameterNode
        return p.parentAdapter or None if (p and p.improveAdapter) else None

    def _basePath(self) -> str | None:
        return self.ui.baseModelPathLineEdit.currentPath or None

    def onCheckEngineButton(self) -> None:
        """Imports the engine, PyTorch and MONAI and shows what was found."""
        with slicer.util.tryWithErrorDisplay(_("Failed to check the TCURLoRA engine."), waitCursor=True):
            status = self.logic.engineStatus()
            self.ui.engineLocationLabel.text = status["location"]
            self.ui.engineVersionLabel.text = status["version"]
            self.ui.torchStatusLabel.text = status["torch"]
            self.ui.monaiStatusLabel.text = status["monai"]

    # -------------------------------------------------------------------------------- training

    def onStartButton(self) -> None:
        """Starts training, or cancels the running one."""
        if self._job is not None:
            with slicer.util.tryWithErrorDisplay(_("Failed to cancel the training."), waitCursor=True):
                self._job.cancel(grace_seconds=5.0)
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the training."), waitCursor=True):
            from TCURLoRASegment import TCURLoRASegmentLogic

            if not TCURLoRASegmentLogic().ensureDependencies(askConfirmation=True):
                self.ui.statusLabel.text = _("Dependencies not installed: nothing was done")
                return
            from TCURLoRALib.panel import ProgressTracker, TrainingCurves

            p = self._parameterNode
            self._job = self.logic.startTraining(
                self._cases(), self._mappingFromTable(), p.adapterName.strip(), parentAdapter=self._parentName(),
                basePath=self._basePath(), rank=None if p.improveAdapter else p.rank, steps=p.steps,
                learningRate=p.learningRate, device=p.device.value, annotatedSlicesOnly=p.annotatedSlicesOnly)
            self._tracker, self._curves = ProgressTracker(), TrainingCurves()
            self._chart = self.logic.createChart(p.adapterName.strip())
            self.ui.logTextEdit.clear()
            self.ui.logTextEdit.appendPlainText(" ".join(self._job.command()))
            self.ui.progressBar.setValue(0)
            self.ui.statusLabel.text = _("Exported the cases; starting...")
            self._timer.start()
        self._updateGui()

    def onPollJob(self) -> None:
        """Shows the job's new events in the progress bar, status line, log and chart."""
        if self._job is None:
            self._timer.stop()
            return
        chartChanged = False
        for event in self._job.poll_events():
            chartChanged = self._curves.add(event) or chartChanged
            update = self._tracker.update(event)
            if update.percent is not None:
                self.ui.progressBar.setValue(update.percent)
            if update.status is not None:
                self.ui.statusLabel.text = update.status
            if update.log:
                self.ui.logTextEdit.appendPlainText(update.log)
            if update.finished:
                if chartChanged:
                    self.logic.updateChart(self._chart, self._curves)
                self._onJobFinished(update)
                return
        if chartChanged:
            self.logic.updateChart(self._chart, self._curves)

    def _onJobFinished(self, update) -> None:
        self._timer.stop()
        job, self._job = self._job, None
        try:
            if update.state == "done":
                name = self._parameterNode.adapterName.strip()
                self.ui.statusLabel.text = _("Adapter {name!r} saved; it is listed in TCURLoRA Segment").format(
                    name=name)
                self.logic.announceNewAdapter()
                self.refreshParentAdapters()
            elif update.state == "failed":
                slicer.util.errorDisplay(
                    _("Training failed, no adapter was written: {error}").format(error=update.error),
                    detailedText="\n".join(job.log[-50:]))
        finally:
            self._updateGui()


#
# TCURLoRATrainLogic
#


class TCURLoRATrainLogic(ScriptedLoadableModuleLogic):
    """Train computations, usable without the widget (from the Python console or a test)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self) -> TCURLoRATrainParameterNode:
        """Returns the module's parameter node (created in the scene on first use), typed."""
        return TCURLoRATrainParameterNode(super().getParameterNode())

    @staticmethod
    def segmentLogic():
        """The Segment module's logic: dependencies, adapter store, job interpreter (imported on use)."""
        from TCURLoRASegment import TCURLoRASegmentLogic

        return TCURLoRASegmentLogic()

    def labelsToStartFrom(self, parentAdapter: str | None, basePath: str | None = None) -> list:
        """The labels a new adapter starts from: the parent adapter's, else the base's."""
        return self.segmentLogic().labelsOf(parentAdapter, basePath)

    @staticmethod
    def announceNewAdapter() -> None:
        """Refreshes the adapter list of every open Segment panel."""
        from TCURLoRASegment import TCURLoRASegmentLogic

        TCURLoRASegmentLogic.notifyAdaptersChanged()

    def startTraining(self, cases, mapping: dict, adapterName: str, parentAdapter: str | None = None,
                      basePath: str | None = None, rank: int | None = None, steps: int | None = None,
                      learningRate: float | None = None, device: str = "auto", annotatedSlicesOnly: bool = False,
                      seed: int | None = None):
        """Exports the cases and starts ``python -m TCURLoRALib train`` in the background; returns the job.

        Args:
            cases: (volume node, segmentation node) pairs.
            mapping: segment name -> adapter label name ("" leaves the segment out).
            adapterName: the new adapter's name; it must be free in the store (checked before any export).
            parentAdapter: store name of the adapter to improve, or None for a new one.
            basePath: base-model file, None for the shipped base.
            rank, steps, learningRate, device, seed: training settings (None: the engine's defaults).
            annotatedSlicesOnly: train on the slices that hold a segment voxel only.

        Returns:
            the started TCURLoRALib.jobs.Job; on success the adapter is in the user's adapter folder.

        Raises:
            ValueError, FileExistsError, PermissionError: bad settings or a name that is taken.
        """
        import json

        from TCURLoRALib import jobs, panel
        from TCURLoRALib.store import check_adapter_name

        check_adapter_name(adapterName)
        store = self.segmentLogic().adapterStore()
        taken = {entry.name.casefold() for entry in store.list()}
        if adapterName.casefold() in taken:
            raise FileExistsError(_("An adapter named {name!r} exists already: choose another name").format(
                name=adapterName))
        startLabels = self.labelsToStartFrom(parentAdapter, basePath)
        colors = {}
        for _volumeNode, segmentationNode in cases:
            colors.update(panel.segment_colors(segmentationNode))
        labels, bySegment = panel.adapter_labels(mapping, startLabels, colors)
        workFolder = tempfile.mkdtemp(prefix="tcurlora-train-")
        try:
            casesJson = panel.export_cases(cases, bySegment, workFolder, annotatedSlicesOnly)
            labelsJson = None
            if [label.to_json() for label in labels] != [label.to_json() for label in startLabels]:
                labelsJson = os.path.join(workFolder, "labels.json")
                with open(labelsJson, "w", encoding="utf-8") as stream:
                    json.dump([label.to_json() for label in labels], stream, indent=2)
            arguments = panel.train_arguments(casesJson, name=adapterName, base=basePath, parent=parentAdapter,
                                              labels_json=labelsJson, rank=rank, steps=steps, lr=learningRate,
                                              device=device, seed=seed)
            job = jobs.Job(arguments, python=self.segmentLogic().pythonForJobs(), work_dir=workFolder)
            job.start()
        except Exception:
            shutil.rmtree(workFolder, ignore_errors=True)
            raise
        return job

    @staticmethod
    def createChart(adapterName: str):
        """A chart of training loss and validation mean Dice against the step, shown in the layout.

        Returns:
            (loss table node, Dice table node, chart node).
        """
        import numpy as np

        scene = slicer.mrmlScene
        chartNode = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{adapterName} training")
        chartNode.SetTitle(_("Training {name}").format(name=adapterName))
        chartNode.SetXAxisTitle(_("step"))
        chartNode.SetYAxisTitle(_("loss / Dice"))
        tables = []
        for column, title, color in (("loss", _("training loss"), (0.85, 0.3, 0.1)),
                                     ("dice", _("validation mean Dice"), (0.1, 0.45, 0.85))):
            tableNode = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{adapterName} {column}")
            slicer.util.updateTableFromArray(tableNode, [np.zeros(0), np.zeros(0)], ["step", column])
            seriesNode = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", title)
            seriesNode.SetAndObserveTableNodeID(tableNode.GetID())
            seriesNode.SetXColumnName("step")
            seriesNode.SetYColumnName(column)
            seriesNode.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
            seriesNode.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone if column == "loss"
                                      else slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
            seriesNode.SetColor(*color)
            chartNode.AddAndObservePlotSeriesNodeID(seriesNode.GetID())
            tables.append(tableNode)
        slicer.modules.plots.logic().ShowChartInLayout(chartNode)
        return tables[0], tables[1], chartNode

    @staticmethod
    def updateChart(chart, curves) -> None:
        """Puts the rows of a TCURLoRALib.panel.TrainingCurves into the chart's tables."""
        lossTable, diceTable, _chartNode = chart
        loss, dice = curves.loss_table(), curves.dice_table()
        slicer.util.updateTableFromArray(lossTable, [loss[:, 0], loss[:, 1]], ["step", "loss"])
        slicer.util.updateTableFromArray(diceTable, [dice[:, 0], dice[:, 1]], ["step", "dice"])

    def train(self, cases, mapping: dict, adapterName: str, timeout: float | None = None, **settings) -> None:
        """Trains and waits (for scripts and tests; the panel polls instead), then refreshes the Segment panels.

        Raises:
            RuntimeError: the job failed or was cancelled; the message holds its error.
        """
        job = self.startTraining(cases, mapping, adapterName, **settings)
        state = job.wait(timeout)
        if state.value != "done":
            raise RuntimeError(f"training {state.value}: {job.error}\n" + "\n".join(job.log[-20:]))
        self.announceNewAdapter()

    @staticmethod
    def engineFolder() -> str | None:
        """Returns the folder that holds ``TCURLoRALib`` (found on disk, not imported), or None."""
        return _findEngineFolder()

    @staticmethod
    def engineStatus() -> dict[str, str]:
        """Imports the engine, PyTorch and MONAI and describes what was found.

        Returns:
            The same display strings as ``TCURLoRASegmentLogic.engineStatus``: ``"location"``, ``"version"``,
            ``"torch"``, ``"monai"``.
        """
        # Imported here, not at the top: TCURLoRASegment.py is importable only once the engine folder (which is
        # also that module's folder) is on sys.path, and Slicer may load this module first.
        from TCURLoRASegment import TCURLoRASegmentLogic

        return TCURLoRASegmentLogic().engineStatus()

    @staticmethod
    def describeSegmentation(segmentationNode: vtkMRMLSegmentationNode | None) -> str:
        """Lists a segmentation's segments for the panel.

        Args:
            segmentationNode: a vtkMRMLSegmentationNode.

        Returns:
            For example ``"2 segments: GM, WM"``, in the segmentation's order, or ``"no segments"``.

        Raises:
            ValueError: if the node is None.
        """
        if segmentationNode is None:
            raise ValueError("segmentationNode is None: select a segmentation")
        segmentation = segmentationNode.GetSegmentation()
        names = [segmentation.GetNthSegment(index).GetName() for index in range(segmentation.GetNumberOfSegments())]
        if not names:
            return _("no segments")
        return _("{count} segments: {names}").format(count=len(names), names=", ".join(names))


#
# TCURLoRATrainTest
#


class TCURLoRATrainTest(ScriptedLoadableModuleTest):
    """Self-test, run by Slicer's SelfTests module and by ctest."""

    def setUp(self):
        """Starts every test from an empty scene."""
        slicer.mrmlScene.Clear()

    def runTest(self):
        """Runs every test of this module."""
        self.setUp()
        self.test_EngineImports()
        self.setUp()
        self.test_DescribeSegmentation()
        self.setUp()
        self.test_ParameterNode()
        # Last: it raises SkipTest when no base model can be found, which ends runTest.
        self.setUp()
        self.test_TrainTinyAdapter()

    def test_EngineImports(self):
        """The engine package, kept in the Segment module's folder, imports from this module too."""
        self.delayDisplay("Importing the engine")
        import TCURLoRALib

        logic = TCURLoRATrainLogic()
        self.assertIsNotNone(logic.engineFolder())
        importedFrom = os.path.dirname(os.path.dirname(os.path.realpath(TCURLoRALib.__file__)))
        self.assertEqual(os.path.normcase(importedFrom), os.path.normcase(os.path.realpath(logic.engineFolder())))
        self.assertIsInstance(TCURLoRALib.__version__, str)
        self.assertTrue(TCURLoRALib.__version__)
        status = logic.engineStatus()
        self.assertEqual(set(status), {"location", "version", "torch", "monai"})
        self.assertEqual(status["version"], TCURLoRALib.__version__)
        self.delayDisplay("Engine imports")

    def test_DescribeSegmentation(self):
        """The summary lists segment names in order; an empty segmentation and a missing node are told apart."""
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "labels")
        logic = TCURLoRATrainLogic()
        self.assertEqual(logic.describeSegmentation(segmentationNode), "no segments")

        segmentationNode.GetSegmentation().AddEmptySegment("gm", "GM")
        segmentationNode.GetSegmentation().AddEmptySegment("wm", "WM")
        self.assertEqual(logic.describeSegmentation(segmentationNode), "2 segments: GM, WM")
        with self.assertRaisesRegex(ValueError, "segmentationNode is None"):
            logic.describeSegmentation(None)

    def test_ParameterNode(self):
        """The parameter node stores the chosen training volume and segmentation."""
        volumeNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "image")
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "labels")
        parameterNode = TCURLoRATrainLogic().getParameterNode()
        parameterNode.trainingVolume = volumeNode
        parameterNode.trainingSegmentation = segmentationNode
        stored = TCURLoRATrainLogic().getParameterNode()
        self.assertEqual(stored.trainingVolume.GetID(), volumeNode.GetID())
        self.assertEqual(stored.trainingSegmentation.GetID(), segmentationNode.GetID())

    def test_TrainTinyAdapter(self):
        """Two synthetic cases in the scene train a 3-step adapter that lands in the store (temporary home)."""
        import numpy as np

        segmentLogic = TCURLoRATrainLogic.segmentLogic()
        self.assertTrue(segmentLogic.ensureDependencies(askConfirmation=False))
        home = tempfile.mkdtemp(prefix="tcurlora-home-")
        savedHome = os.environ.get("TCURLORA_HOME")
        os.environ["TCURLORA_HOME"] = home
        try:
            basePath = segmentLogic.shippedBasePath() or self._tinyBaseFromSourceTree(home)
            if basePath is None:
                raise unittest.SkipTest("no shipped base model and no Testing/synthetic.py to make one")
            labels = segmentLogic.labelsOf(None, basePath)
            target = labels[1].name
            cases = []
            for seed in (1, 2):
                rng = np.random.default_rng(seed)
                shape = (24, 28, 32)
                grid = np.indices(shape)
                centre = np.array([12, 14, 16]) + rng.integers(-3, 4, 3)
                blob = sum((grid[axis] - centre[axis]) ** 2 for axis in range(3)) < 36
                image = rng.normal(0, 5, shape) + 100 * blob
                volumeNode = slicer.util.addVolumeFromArray(image.astype(np.float32), name=f"case{seed}")
                volumeNode.SetSpacing(2.0, 2.0, 2.0)
                segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"labels{seed}")
                segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
                segmentId = segmentationNode.GetSegmentation().AddEmptySegment("", target)
                slicer.util.updateSegmentBinaryLabelmapFromArray(blob.astype(np.uint8), segmentationNode, segmentId,
                                                                 volumeNode)
                cases.append((volumeNode, segmentationNode))

            self.delayDisplay("Training a 3-step adapter")
            logic = TCURLoRATrainLogic()
            logic.train(cases, {target: target}, "selftest", timeout=600, basePath=basePath, steps=3, device="cpu",
                        annotatedSlicesOnly=True)

            self.assertTrue(os.path.isfile(os.path.join(home, "adapters", "selftest.safetensors")))
            listed = [entry.name for entry in segmentLogic.adapterStore().list()]
            self.assertIn("selftest", listed)
            card = segmentLogic.adapterStore().find("selftest").card
            self.assertEqual(card.training["steps"], 3)
            with self.assertRaisesRegex(FileExistsError, "exists already"):
                logic.startTraining(cases, {target: target}, "selftest", basePath=basePath, steps=3)
            self.delayDisplay("Adapter trained and listed")
        finally:
            if savedHome is None:
                os.environ.pop("TCURLORA_HOME", None)
            else:
                os.environ["TCURLORA_HOME"] = savedHome
            shutil.rmtree(home, ignore_errors=True)

    @staticmethod
    def _tinyBaseFromSourceTree(folder: str) -> str | None:
        """A tiny base made by Testing/synthetic.py of a source checkout, or None in an installed extension."""
        engine = _findEngineFolder()
        testing = os.path.normpath(os.path.join(engine or "", os.pardir, "Testing"))
        if not os.path.isfile(os.path.join(testing, "synthetic.py")):
            return None
        if testing not in sys.path:
            sys.path.insert(0, testing)
        import synthetic

        path = os.path.join(folder, "tiny_base.safetensors")
        synthetic.make_tiny_base(path)
        return path
