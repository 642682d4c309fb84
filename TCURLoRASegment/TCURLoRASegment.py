"""TCURLoRA Segment: segment a volume with a frozen UNETR and a selectable tCURLoRA adapter.

This file draws the panel. Every decision that draws no widget (arguments, adapter lists, what Apply does and when
it is enabled, progress text, dependency checks) lives in ``TCURLoRALib.panels``, which needs neither qt, nor torch,
nor numpy and is tested with pytest; PyTorch and MONAI are imported only by the background job and on request.
"""
from __future__ import annotations

import os
import sys
import unittest
from typing import Annotated

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Decimals, Default, SingleStep, WithinRange, parameterNodeWrapper
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

    The package sits next to this file in the source tree, in a build tree and in an installed extension (where
    every scripted module of the extension lands in one ``qt-scripted-modules`` folder).
    """
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.isfile(os.path.join(here, ENGINE_PACKAGE, "__init__.py")):
        return here
    return None


def _addEngineToPath() -> None:
    """Puts the engine folder first on ``sys.path`` so that ``import TCURLoRALib`` finds this copy."""
    folder = _findEngineFolder()
    if folder is None:
        raise ImportError(f"{ENGINE_PACKAGE} not found next to {__file__!r}: the extension is incomplete")
    if folder not in sys.path:
        sys.path.insert(0, folder)


_addEngineToPath()
# The only engine import of this file: the panels' torch-free layer (Testing imports it with torch, MONAI and numpy
# blocked), and the qt helpers both panels share.
from TCURLoRALib.panels import adapters, engine, nodes, requirements, runs, selftest, settings, view  # noqa: E402
from TCURLoRAGui import PanelMixin, adapterListeners, installDependencies, showAdapterEntries, showButton  # noqa: E402

Device = settings.Device


class TCURLoRASegment(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("TCURLoRA Segment")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["TCURLoRA contributors"]
        self.parent.helpText = _("""
Segment a loaded volume with a frozen UNETR and a selectable tCURLoRA adapter.
Adapters are trained on a few local cases in the <b>TCURLoRA Train</b> module.
The <b>Engine</b> section shows where the engine package lives and whether PyTorch and MONAI can be imported.
""")
        self.parent.acknowledgementText = _("""
The adapter method is tCURLoRA: He, Cheng, Zhu, Cai, Yu, "tCURLoRA: Tensor CUR Decomposition Based Low-Rank
Parameter Adaptation and Its Application in Medical Image Segmentation", MICCAI 2025.
The segmentation network is MONAI's UNETR.
""")


@parameterNodeWrapper
class TCURLoRASegmentParameterNode:
    """Choices of the Segment panel, saved with the scene.

    inputVolume - the volume to segment.
    adapterName - the adapter's store name; empty for the base model alone (the combo box is filled at run time,
        so the widget keeps it equal to this value: see TCURLoRALib.panels.adapters.AdapterList).
    device - where the network runs.
    overlap - sliding-window overlap: higher is smoother and slower.
    keepLargestComponent - keep the largest piece of each label the adapter declares one piece (``segment
        --postprocess largest-component``, the engine's default) or leave the network's map as it is.
    testTimeMirroring - also segment the volume mirrored left/right and average (``segment --tta``).
    outputSegmentation - the segmentation to fill; a new one is created when None.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    adapterName: str
    device: Device
    overlap: Annotated[float, WithinRange(*settings.OVERLAP_RANGE), Default(settings.SEGMENT_OVERLAP), Decimals(2),
                       SingleStep(0.05)]
    keepLargestComponent: Annotated[bool, Default(True)]
    testTimeMirroring: bool
    outputSegmentation: vtkMRMLSegmentationNode


class TCURLoRASegmentWidget(PanelMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The Segment panel: draws the parameter node, the adapter list and the running job (TCURLoRAGui.PanelMixin:
    parameter node, polling, progress)."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.initPanel()
        self._adapters = adapters.AdapterList(engine.AdapterListing.base)

    def setup(self) -> None:
        """Builds the panel from its .ui file; called once, when the user first opens the module."""
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/TCURLoRASegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        # The .ui file connects the top-level mrmlSceneChanged signal to every node selector.
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = TCURLoRASegmentLogic()
        self.setupPanel()
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.refreshAdaptersButton.connect("clicked(bool)", self.refreshAdapters)
        self.ui.adapterComboBox.connect("currentIndexChanged(int)", self.onAdapterChanged)
        adapterListeners.append(self.refreshAdapters)
        self.initializeParameterNode()
        self.refreshAdapters()

    def cleanup(self) -> None:
        if self.refreshAdapters in adapterListeners:
            adapterListeners.remove(self.refreshAdapters)
        PanelMixin.cleanup(self)

    def initializeParameterNode(self) -> None:
        """Makes sure a parameter node exists and is observed; preselects the first volume."""
        self.setParameterNode(self.logic.getParameterNode())
        firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        if not self._parameterNode.inputVolume and firstVolume:
            self._parameterNode.inputVolume = firstVolume

    def _adapterName(self) -> str:
        return self._parameterNode.adapterName if self._parameterNode else ""

    def _updateGui(self, caller=None, event=None) -> None:
        usable, text = nodes.volume_summary(self._parameterNode.inputVolume if self._parameterNode else None)
        self.ui.inputVolumeInfoLabel.text = text
        name = self._adapterName()
        showAdapterEntries(self.ui.adapterComboBox, self._adapters.entries(name), self._adapters.index(name))
        running = self._run is not None
        showButton(self.ui.applyButton, view.segment_apply(
            running=running, cancelling=running and self._run.job.cancel_requested, volume_usable=usable,
            adapter=self._adapters.selected(name)))

    def refreshAdapters(self) -> None:
        """Lists the shipped and the user's adapters again (the selection stays, see AdapterList)."""
        listing = engine.list_adapters()
        self._adapters.update(listing.choices, listing.problem, listing.base)
        if listing.problem:
            self.ui.statusLabel.text = listing.problem
        self._updateGui()

    def onAdapterChanged(self, index: int) -> None:
        """The user chose entry ``index``: it becomes the parameter (entries are those of the current value)."""
        if self._parameterNode and index >= 0:
            self._parameterNode.adapterName = self._adapters.entries(self._adapterName())[index].value

    def onApplyButton(self) -> None:
        """Starts a segmentation, or asks the running one to stop (returns at once)."""
        if self._run is not None:
            return self.cancelRun()
        with slicer.util.tryWithErrorDisplay(_("Failed to start the segmentation."), waitCursor=True):
            if not self.logic.ensureDependencies():
                self.ui.statusLabel.text = _("Dependencies not installed: nothing was done")
                return
            self.refreshAdapters()
            p = self._parameterNode
            self.startedRun(self.logic.startSegmentation(
                p.inputVolume, p.adapterName, p.device.value, p.overlap,
                postprocess=settings.postprocess_rule(p.keepLargestComponent), tta=p.testTimeMirroring))
        self._updateGui()

    def _onJobFinished(self, run) -> None:
        if run.outcome.state == "done":
            with slicer.util.tryWithErrorDisplay(_("Failed to load the segmentation."), waitCursor=True):
                node = self.logic.finishSegmentation(run, self._parameterNode.outputSegmentation)
                self._parameterNode.outputSegmentation = node
                self.ui.statusLabel.text = _("Done: {name}").format(name=node.GetName())
            return
        run.discard()
        if run.outcome.state == "failed":
            slicer.util.errorDisplay(_("Segmentation failed: {error}").format(error=run.outcome.error),
                                     detailedText="\n".join(run.job.log[-50:]))


class TCURLoRASegmentLogic(ScriptedLoadableModuleLogic):
    """Segment computations, usable without the widget (from the Python console or a test)."""

    def getParameterNode(self) -> TCURLoRASegmentParameterNode:
        """Returns the module's parameter node (created in the scene on first use), typed."""
        return TCURLoRASegmentParameterNode(super().getParameterNode())

    def ensureDependencies(self, askConfirmation: bool = True) -> bool:
        """Installs PyTorch and the extension's packages after asking (TCURLoRAGui.installDependencies)."""
        return installDependencies(askConfirmation)

    @staticmethod
    def startSegmentation(inputVolume, adapterName: str | None, device: str = "auto", overlap: float = 0.25,
                          basePath: str | None = None, postprocess: str | None = None, tta: bool = False):
        """Exports the volume and starts the segmentation job; returns a TCURLoRALib.panels.runs.SegmentationRun."""
        return runs.SegmentationRun.start(inputVolume, adapterName, device, overlap, basePath, postprocess=postprocess,
                                          tta=tta)

    @staticmethod
    def finishSegmentation(run, segmentationNode=None):
        """Imports a finished run's segments and shows them over its input volume; returns the segmentation."""
        segmentationNode = run.finish(segmentationNode)
        slicer.util.setSliceViewerLayers(background=run.volume, fit=True)
        return segmentationNode

    def segment(self, inputVolume, adapterName: str | None, device: str = "auto", overlap: float = 0.25,
                basePath: str | None = None, segmentationNode=None, timeout: float | None = None):
        """Segments and waits (for scripts and tests; the panel polls instead).

        Raises:
            RuntimeError: the job failed or was cancelled; the message holds its error and last log lines.
        """
        run = self.startSegmentation(inputVolume, adapterName, device, overlap, basePath)
        if run.wait(timeout) != "done":
            run.discard()
            raise RuntimeError(f"segmentation {run.failure()}")
        return self.finishSegmentation(run, segmentationNode)


class TCURLoRASegmentTest(ScriptedLoadableModuleTest):
    """Self-test, run by Slicer's SelfTests module and by ctest; it installs nothing (see README)."""

    def setUp(self):
        """Starts every test from an empty scene."""
        slicer.mrmlScene.Clear()

    def runTest(self):
        """Runs every test; a skipped one is reported as skipped, not as a failure of Reload and Test."""
        selftest.run_tests(self, ("test_PanelsImportWithoutTorch", "test_ParameterNode", "test_SegmentShippedSample"),
                           report=self.delayDisplay)

    def test_PanelsImportWithoutTorch(self):
        """Slicer's own Python imports the panels' layer with torch, MONAI and numpy made unimportable."""
        self.delayDisplay("Importing the panels without torch")
        python = requirements.python_for_jobs(sys.executable)
        modules = ["TCURLoRALib.panels." + name for name in ("adapters", "engine", "nodes", "requirements", "runs",
                                                             "selftest", "settings", "view")]
        ok, output = selftest.imports_without(python, modules, _findEngineFolder())
        self.assertTrue(ok, output)

    def test_ParameterNode(self):
        """The parameter node stores the input volume; a stale adapter name stays shown, and Apply refuses it."""
        volumeNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "input")
        parameterNode = TCURLoRASegmentLogic().getParameterNode()
        parameterNode.inputVolume = volumeNode
        parameterNode.adapterName = "deleted-adapter"
        stored = TCURLoRASegmentLogic().getParameterNode()
        self.assertEqual(stored.inputVolume.GetID(), volumeNode.GetID())
        shown = adapters.AdapterList(engine.AdapterListing.base).selected(stored.adapterName)
        self.assertEqual((shown.value, shown.missing), ("deleted-adapter", True))

    def test_SegmentShippedSample(self):
        """Segments the shipped sample with the first shipped adapter through the logic."""
        check = requirements.check_dependencies(_findEngineFolder())
        if not check.ready:
            raise unittest.SkipTest(check.reason())
        basePath = engine.shipped_base()
        shipped = [entry.name for entry in engine.adapter_store().list() if entry.source == "shipped"]
        sample = engine.shipped_sample()
        if basePath is None or not shipped or sample is None:
            raise unittest.SkipTest(f"no base model, adapter or sample next to {engine.adapter_store().shipped_dir}")
        volumeNode = slicer.util.loadVolume(str(sample))
        self.delayDisplay(f"Segmenting {volumeNode.GetName()!r} with {shipped[0]!r}")
        segmentationNode = TCURLoRASegmentLogic().segment(volumeNode, shipped[0], device="cpu", timeout=900)
        labels = engine.labels_of(shipped[0])
        segmentation = segmentationNode.GetSegmentation()
        self.assertEqual([segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())],
                         [label.name for label in labels[1:]])
        voxels = sum(slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentation.GetNthSegmentID(i),
                                                                volumeNode).sum()
                     for i in range(segmentation.GetNumberOfSegments()))
        self.assertGreater(voxels, 0, "the shipped adapter found no structure at all")
