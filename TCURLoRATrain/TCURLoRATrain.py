"""TCURLoRA Train: fine-tune a new tCURLoRA adapter on a few locally annotated cases.

This file holds only the Slicer classes. The engine package ``TCURLoRALib`` lives in the TCURLoRASegment module's
folder; it and its dependencies (PyTorch, MONAI) are imported when a button needs them, never when Slicer loads
the module.
"""
from __future__ import annotations

import logging
import os
import sys

import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import parameterNodeWrapper
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


@parameterNodeWrapper
class TCURLoRATrainParameterNode:
    """Choices of the Train panel, saved with the scene.

    trainingVolume - the image of a training case.
    trainingSegmentation - its reference segmentation.
    """

    trainingVolume: vtkMRMLScalarVolumeNode
    trainingSegmentation: vtkMRMLSegmentationNode


#
# TCURLoRATrainWidget
#


class TCURLoRATrainWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The Train panel: gathers inputs and shows results; all work is done by the logic."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic: TCURLoRATrainLogic | None = None
        self._parameterNode: TCURLoRATrainParameterNode | None = None
        self._parameterNodeGuiTag = None

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
        # Found on disk only: the import (and with it torch) waits for the button.
        engineFolder = self.logic.engineFolder()
        self.ui.engineLocationLabel.text = (
            os.path.join(engineFolder, ENGINE_PACKAGE) if engineFolder else _("not found")
        )

        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
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
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateSegmentsInfo)

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
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateSegmentsInfo)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateSegmentsInfo)
        self._updateSegmentsInfo()

    def _updateSegmentsInfo(self, caller=None, event=None) -> None:
        segmentationNode = self._parameterNode.trainingSegmentation if self._parameterNode else None
        if segmentationNode is None:
            self.ui.trainingSegmentsLabel.text = _("No segmentation selected")
        else:
            self.ui.trainingSegmentsLabel.text = self.logic.describeSegmentation(segmentationNode)

    def onCheckEngineButton(self) -> None:
        """Imports the engine, PyTorch and MONAI and shows what was found."""
        with slicer.util.tryWithErrorDisplay(_("Failed to check the TCURLoRA engine."), waitCursor=True):
            status = self.logic.engineStatus()
            self.ui.engineLocationLabel.text = status["location"]
            self.ui.engineVersionLabel.text = status["version"]
            self.ui.torchStatusLabel.text = status["torch"]
            self.ui.monaiStatusLabel.text = status["monai"]


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
