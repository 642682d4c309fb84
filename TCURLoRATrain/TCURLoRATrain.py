"""TCURLoRA Train: fine-tune a new tCURLoRA adapter on a few locally annotated cases.

This file draws the panel. Every decision that draws no widget (the case list, the segment-to-label table, when
Start is enabled, the training run and its chart) lives in ``TCURLoRALib.panels``, which needs neither qt, nor
torch, nor numpy and is tested with pytest. The engine package sits in the TCURLoRASegment module's folder.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import unittest
from typing import Annotated

import ctk

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

    In a build tree or an installed extension every scripted module of the extension lands in one
    ``qt-scripted-modules`` folder, so the package sits next to this file; in the source tree it sits in the sibling
    ``TCURLoRASegment/`` folder.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (here, os.path.normpath(os.path.join(here, os.pardir, "TCURLoRASegment"))):
        if os.path.isfile(os.path.join(candidate, ENGINE_PACKAGE, "__init__.py")):
            return candidate
    return None


def _addEngineToPath() -> None:
    """Puts the engine folder (also the home of TCURLoRAGui) first on ``sys.path``."""
    folder = _findEngineFolder()
    if folder is None:
        raise ImportError(f"{ENGINE_PACKAGE} not found near {__file__!r}: install the TCURLoRASegment module too")
    if folder not in sys.path:
        sys.path.insert(0, folder)


_addEngineToPath()
# The only engine import of this file: the panels' torch-free layer (Testing imports it with torch, MONAI and numpy
# blocked), and the qt helpers both panels share.
from TCURLoRALib.panels import (  # noqa: E402
    adapters, caselist, engine, nodes, requirements, runs, selftest, settings, tracking, view)
from TCURLoRAGui import (  # noqa: E402
    PanelMixin, adaptersChanged, fillTable, installDependencies, showAdapterEntries, showButton)

Device = settings.Device
TRAIN_DEFAULTS = settings.train_defaults()


class TCURLoRATrain(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("TCURLoRA Train")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        # The engine and the panels' shared qt helpers live in the Segment module's folder.
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


@parameterNodeWrapper
class TCURLoRATrainParameterNode:
    """Choices of the Train panel, saved with the scene.

    trainingVolume, trainingSegmentation - the pair that "Add case" appends to the cases.
    caseVolumes, caseSegmentations - the training cases, pairwise.
    adapterName - name of the new adapter (saved in the user's adapter folder).
    improveAdapter, parentAdapter - continue from an existing adapter (its store name; kept equal to the entry shown).
    rank, steps, learningRate - training settings, starting at the engine's defaults (settings.train_defaults).
    minutes - time budget of the training in whole minutes, 0 for none (settings.PANEL_MINUTES to start).
    mirror - also train on the cases mirrored left/right with left/right labels swapped (``train --mirror``).
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
    rank: Annotated[int, WithinRange(*settings.RANK_RANGE), Default(TRAIN_DEFAULTS.rank)]
    steps: Annotated[int, WithinRange(*settings.STEPS_RANGE), Default(TRAIN_DEFAULTS.steps)]
    learningRate: Annotated[float, WithinRange(*settings.LR_RANGE), Default(TRAIN_DEFAULTS.lr), Decimals(6)]
    minutes: Annotated[int, WithinRange(*settings.MINUTES_RANGE), Default(TRAIN_DEFAULTS.minutes)]
    mirror: Annotated[bool, Default(TRAIN_DEFAULTS.mirror)]
    annotatedSlicesOnly: bool
    device: Device


class TCURLoRATrainWidget(PanelMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The Train panel: draws the parameter node, the cases, the label table and the running job."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.initPanel()
        self._parents = adapters.AdapterList(adapters.AdapterChoice(
            None, adapters.CHOOSE_PARENT_TEXT, _("Tick Improve adapter, then choose the adapter to continue from")))
        self._mappingSource = None

    def setup(self) -> None:
        """Builds the panel from its .ui file; called once, when the user first opens the module."""
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/TCURLoRATrain.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        # The .ui file connects the top-level mrmlSceneChanged signal to every node selector.
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = TCURLoRATrainLogic()
        self.setupPanel()
        self.ui.addCaseButton.connect("clicked(bool)", self.onAddCase)
        self.ui.removeCaseButton.connect("clicked(bool)", self.onRemoveCase)
        self.ui.refreshMappingButton.connect("clicked(bool)", self.refreshMapping)
        self.ui.parentAdapterComboBox.connect("currentIndexChanged(int)", self.onParentAdapterChanged)
        self.ui.labelMappingTableWidget.connect("cellChanged(int,int)", lambda row, column: self._updateGui())
        self.ui.baseModelPathLineEdit.connect("currentPathChanged(QString)", lambda path: self._updateGui())
        self.ui.startButton.connect("clicked(bool)", self.onStartButton)
        self.ui.baseModelPathLineEdit.filters = ctk.ctkPathLineEdit.Files
        self.ui.baseModelPathLineEdit.nameFilters = ["Base model (*.safetensors)"]
        self.initializeParameterNode()
        self.refreshParentAdapters()

    def initializeParameterNode(self) -> None:
        """Makes sure a parameter node exists and is observed; preselects the first volume and segmentation."""
        self.setParameterNode(self.logic.getParameterNode())
        p = self._parameterNode
        firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        firstSegmentation = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
        if not p.trainingVolume and firstVolume:
            p.trainingVolume = firstVolume
        if not p.trainingSegmentation and firstSegmentation:
            p.trainingSegmentation = firstSegmentation

    def _pairs(self) -> list:
        p = self._parameterNode
        return caselist.case_pairs(p.caseVolumes, p.caseSegmentations) if p else []

    def _parentValue(self) -> str:
        return self._parameterNode.parentAdapter if self._parameterNode else ""

    def _labelSource(self) -> tuple:
        """(parent adapter or None, base-model file or None): what the new adapter's labels start from."""
        p = self._parameterNode
        parent = (p.parentAdapter or None) if (p and p.improveAdapter) else None
        return parent, self.ui.baseModelPathLineEdit.currentPath or None

    def _updateGui(self, caller=None, event=None) -> None:
        p, pairs, parent = self._parameterNode, self._pairs(), self._parentValue()
        segmentation = p.trainingSegmentation if p else None
        self.ui.trainingSegmentsLabel.text = (nodes.describe_segmentation(segmentation) if segmentation
                                              else _("No segmentation selected"))
        self._showCases(pairs)
        if pairs and self._labelSource() != self._mappingSource:
            self.refreshMapping()  # the labels to start from changed (parent, base), and with them the defaults
        showAdapterEntries(self.ui.parentAdapterComboBox, self._parents.entries(parent), self._parents.index(parent))
        running = self._run is not None
        state = view.train_view(
            running=running, cancelling=running and self._run.job.cancel_requested, cases=len(pairs),
            name=p.adapterName if p else "", improve=bool(p and p.improveAdapter),
            parent=self._parents.selected(parent), pair_chosen=bool(p and p.trainingVolume and p.trainingSegmentation),
            mapped=any(self._mappingFromTable().values()))
        showButton(self.ui.startButton, state.start)
        self.ui.addCaseButton.enabled = state.add_case
        self.ui.parentAdapterComboBox.enabled = state.parent
        self.ui.rankSpinBox.enabled = state.rank

    def _showCases(self, pairs: list) -> None:
        fillTable(self.ui.casesTableWidget, [(c.volume, c.segmentation, c.segments) for c in caselist.case_rows(pairs)])

    def onAddCase(self) -> None:
        """Appends the chosen volume and segmentation to the cases (a pair already listed is not added twice)."""
        with slicer.util.tryWithErrorDisplay(_("Failed to add the case.")):
            if self.logic.addCase(self._parameterNode):
                self.refreshMapping()

    def onRemoveCase(self) -> None:
        """Removes the selected rows from the cases."""
        rows = [index.row() for index in self.ui.casesTableWidget.selectionModel().selectedRows()]
        self.logic.removeCases(self._parameterNode, rows)
        self.refreshMapping()

    def refreshMapping(self) -> None:
        """Lists every segment of the cases with its adapter label (edits kept; default: the label of the same
        name among the labels to start from)."""
        self._mappingSource = self._labelSource()
        labelNames, problem = engine.start_label_names(*self._mappingSource)
        mapping = caselist.mapping_rows(nodes.segment_names(s for _v, s in self._pairs()), labelNames,
                                        self._mappingFromTable())
        fillTable(self.ui.labelMappingTableWidget, list(mapping.items()), editableColumn=1)
        self.ui.adapterLabelsLabel.text = ", ".join(labelNames[1:]) if labelNames else problem
        self._updateGui()

    def _mappingFromTable(self) -> dict:
        table = self.ui.labelMappingTableWidget
        rows = [(table.item(row, 0), table.item(row, 1)) for row in range(table.rowCount)]
        return {name.text(): label.text().strip() if label else "" for name, label in rows if name is not None}

    def refreshParentAdapters(self) -> None:
        """Lists the adapters that can be improved again (the selection stays, see AdapterList)."""
        listing = engine.list_adapters()
        self._parents.update(listing.choices, listing.problem)
        self._updateGui()

    def onParentAdapterChanged(self, index: int) -> None:
        """The user chose entry ``index``: it becomes the parameter (entries are those of the current value)."""
        if self._parameterNode and index >= 0:
            self._parameterNode.parentAdapter = self._parents.entries(self._parentValue())[index].value

    def onStartButton(self) -> None:
        """Starts training, or asks the running one to stop (returns at once)."""
        if self._run is not None:
            return self.cancelRun()
        with slicer.util.tryWithErrorDisplay(_("Failed to start the training."), waitCursor=True):
            if not installDependencies():
                self.ui.statusLabel.text = _("Dependencies not installed: nothing was done")
                return
            run = self.logic.startTraining(self._parameterNode, self._mappingFromTable(), self._labelSource()[1])
            run.chart = tracking.TrainingChart(slicer.mrmlScene, run.name)
            slicer.modules.plots.logic().ShowChartInLayout(run.chart.chart_node)
            self.startedRun(run)
        self._updateGui()

    def _onJobFinished(self, run) -> None:
        if run.outcome.state == "done":
            self.ui.statusLabel.text = _("Adapter {name!r} saved; it is listed in TCURLoRA Segment").format(
                name=run.name)
            adaptersChanged()
            self.refreshParentAdapters()
        elif run.outcome.state == "failed":
            slicer.util.errorDisplay(_("Training failed, no adapter was written: {error}").format(
                error=run.outcome.error), detailedText="\n".join(run.job.log[-50:]))


class TCURLoRATrainLogic(ScriptedLoadableModuleLogic):
    """Train computations, usable without the widget (from the Python console or a test)."""

    def getParameterNode(self) -> TCURLoRATrainParameterNode:
        """Returns the module's parameter node (created in the scene on first use), typed."""
        return TCURLoRATrainParameterNode(super().getParameterNode())

    @staticmethod
    def setCases(parameterNode: TCURLoRATrainParameterNode, pairs: list) -> None:
        """Writes (volume, segmentation) pairs into the parameter node's two lists in one modification."""
        with slicer.util.NodeModify(parameterNode):
            parameterNode.caseVolumes = [volume for volume, _segmentation in pairs]
            parameterNode.caseSegmentations = [segmentation for _volume, segmentation in pairs]

    def addCase(self, parameterNode: TCURLoRATrainParameterNode) -> bool:
        """Appends the chosen volume and segmentation; False when that pair is listed already."""
        p = parameterNode
        pairs = caselist.add_case(caselist.case_pairs(p.caseVolumes, p.caseSegmentations), p.trainingVolume,
                                  p.trainingSegmentation)
        if pairs is not None:
            self.setCases(p, pairs)
        return pairs is not None

    def removeCases(self, parameterNode: TCURLoRATrainParameterNode, rows: list) -> None:
        """Removes the cases at the given rows of the cases table."""
        p = parameterNode
        self.setCases(p, caselist.remove_rows(caselist.case_pairs(p.caseVolumes, p.caseSegmentations), rows))

    @staticmethod
    def startTraining(parameterNode: TCURLoRATrainParameterNode, mapping: dict, basePath: str | None = None):
        """Exports the parameter node's cases and starts training; returns a TCURLoRALib.panels.runs.TrainingRun."""
        p = parameterNode
        return runs.TrainingRun.start(
            caselist.case_pairs(p.caseVolumes, p.caseSegmentations), mapping, p.adapterName,
            parent=p.parentAdapter if p.improveAdapter else None, base=basePath,
            rank=None if p.improveAdapter else p.rank, steps=p.steps, lr=p.learningRate, device=p.device.value,
            annotated_slices_only=p.annotatedSlicesOnly, minutes=p.minutes or None, mirror=p.mirror)

    @staticmethod
    def train(cases: list, mapping: dict, adapterName: str, timeout: float | None = None, **settings) -> None:
        """Trains and waits (scripts and tests; the panel polls), then refreshes the Segment panels.

        ``settings`` are those of TCURLoRALib.panels.runs.TrainingRun.start (parent, base, rank, steps, ...).

        Raises:
            RuntimeError: the job failed or was cancelled; the message holds its error and last log lines.
        """
        run = runs.TrainingRun.start(cases, mapping, adapterName, **settings)
        if run.wait(timeout) != "done":
            raise RuntimeError(f"training {run.failure()}")
        adaptersChanged()


class TCURLoRATrainTest(ScriptedLoadableModuleTest):
    """Self-test, run by Slicer's SelfTests module and by ctest; it installs nothing (see README)."""

    def setUp(self):
        """Starts every test from an empty scene."""
        slicer.mrmlScene.Clear()

    def runTest(self):
        """Runs every test; a skipped one is reported as skipped, not as a failure of Reload and Test."""
        selftest.run_tests(self, ("test_AddAndRemoveCases", "test_TrainTinyAdapter"), report=self.delayDisplay)

    def test_AddAndRemoveCases(self):
        """Cases go into the real parameter node in one modification; a pair is listed once; rows are removed."""
        scene = slicer.mrmlScene
        volumes = [scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"image{i}") for i in range(2)]
        segmentations = [scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"labels{i}") for i in range(2)]
        logic = TCURLoRATrainLogic()
        p = logic.getParameterNode()
        for volume, segmentation in zip(volumes, segmentations):
            p.trainingVolume, p.trainingSegmentation = volume, segmentation
            self.assertTrue(logic.addCase(p))
        self.assertFalse(logic.addCase(p), "the same pair twice")
        logic.removeCases(p, [0])
        stored = TCURLoRATrainLogic().getParameterNode()
        self.assertEqual([(v.GetID(), s.GetID()) for v, s in caselist.case_pairs(stored.caseVolumes,
                                                                                   stored.caseSegmentations)],
                         [(volumes[1].GetID(), segmentations[1].GetID())])

    def test_TrainTinyAdapter(self):
        """Two synthetic cases in the scene train a 3-step adapter that lands in the store (temporary home)."""
        check = requirements.check_dependencies(_findEngineFolder())
        if not check.ready:
            raise unittest.SkipTest(check.reason())
        home = tempfile.mkdtemp(prefix="tcurlora-home-")
        savedHome = os.environ.get("TCURLORA_HOME")
        os.environ["TCURLORA_HOME"] = home
        try:
            basePath = engine.shipped_base() or selftest.tiny_base_from_checkout(_findEngineFolder(), home)
            if basePath is None:
                raise unittest.SkipTest("no shipped base model and no Testing/synthetic.py to make one")
            target = engine.labels_of(None, basePath)[1].name
            cases = [selftest.synthetic_case(slicer.mrmlScene, seed, target) for seed in (1, 2)]
            self.delayDisplay("Training a 3-step adapter")
            TCURLoRATrainLogic.train(cases, {target: target}, "selftest", timeout=900, base=basePath, steps=3,
                                     device="cpu", annotated_slices_only=True)
            self.assertTrue(os.path.isfile(os.path.join(home, "adapters", "selftest.safetensors")))
            self.assertEqual(engine.adapter_store().find("selftest").card.training["steps"], 3)
            with self.assertRaisesRegex(FileExistsError, "exists already"):
                runs.TrainingRun.start(cases, {target: target}, "selftest", base=basePath, steps=3)
        finally:
            if savedHome is None:
                os.environ.pop("TCURLORA_HOME", None)
            else:
                os.environ["TCURLORA_HOME"] = savedHome
            shutil.rmtree(home, ignore_errors=True)
