"""TCURLoRA Segment: segment a volume with a frozen UNETR and a selectable tCURLoRA adapter.

This file holds only the Slicer classes. The engine package ``TCURLoRALib`` and its dependencies (PyTorch, MONAI)
are imported when a button needs them, never when Slicer loads the module, so that Slicer starts and this panel
opens even before those dependencies are installed.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys

import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode
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

    The package sits next to this file both in the source tree and in an installed extension (where every
    scripted module of the extension lands in one ``qt-scripted-modules`` folder).
    """
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.isfile(os.path.join(here, ENGINE_PACKAGE, "__init__.py")):
        return here
    return None


def _addEngineToPath() -> None:
    """Puts the engine folder first on ``sys.path`` so that ``import TCURLoRALib`` finds this copy.

    Only the path is changed here: importing the package would import torch at Slicer startup.
    """
    folder = _findEngineFolder()
    if folder is None:
        # Loading the module must not fail: the panel then reports the missing engine when asked.
        logging.warning(f"{ENGINE_PACKAGE} not found next to {__file__!r}")
        return
    if folder not in sys.path:
        sys.path.insert(0, folder)


_addEngineToPath()


#
# TCURLoRASegment
#


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


#
# TCURLoRASegmentParameterNode
#


@parameterNodeWrapper
class TCURLoRASegmentParameterNode:
    """Choices of the Segment panel, saved with the scene.

    inputVolume - the volume to segment.
    """

    inputVolume: vtkMRMLScalarVolumeNode


#
# TCURLoRASegmentWidget
#


class TCURLoRASegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The Segment panel: gathers inputs and shows results; all work is done by the logic."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic: TCURLoRASegmentLogic | None = None
        self._parameterNode: TCURLoRASegmentParameterNode | None = None
        self._parameterNodeGuiTag = None

    def setup(self) -> None:
        """Builds the panel from its .ui file; called once, when the user first opens the module."""
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/TCURLoRASegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        # The .ui file connects the top-level mrmlSceneChanged signal to every node selector.
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = TCURLoRASegmentLogic()

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
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateInputInfo)

    def onSceneStartClose(self, caller, event) -> None:
        """Called just before the scene is closed: the parameter node is about to go away."""
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        """Called just after the scene is closed: a shown panel needs a new parameter node at once."""
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Makes sure a parameter node exists and is observed; preselects the first volume."""
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: TCURLoRASegmentParameterNode | None) -> None:
        """Connects the GUI to a parameter node (widgets carry a SlicerParameterName property in the .ui)."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateInputInfo)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateInputInfo)
        self._updateInputInfo()

    def _updateInputInfo(self, caller=None, event=None) -> None:
        volumeNode = self._parameterNode.inputVolume if self._parameterNode else None
        if volumeNode is None:
            self.ui.inputVolumeInfoLabel.text = _("No volume selected")
        elif volumeNode.GetImageData() is None:
            self.ui.inputVolumeInfoLabel.text = _("The volume holds no image data")
        else:
            self.ui.inputVolumeInfoLabel.text = self.logic.describeVolume(volumeNode)

    def onCheckEngineButton(self) -> None:
        """Imports the engine, PyTorch and MONAI and shows what was found."""
        with slicer.util.tryWithErrorDisplay(_("Failed to check the TCURLoRA engine."), waitCursor=True):
            status = self.logic.engineStatus()
            self.ui.engineLocationLabel.text = status["location"]
            self.ui.engineVersionLabel.text = status["version"]
            self.ui.torchStatusLabel.text = status["torch"]
            self.ui.monaiStatusLabel.text = status["monai"]


#
# TCURLoRASegmentLogic
#


class TCURLoRASegmentLogic(ScriptedLoadableModuleLogic):
    """Segment computations, usable without the widget (from the Python console or a test)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self) -> TCURLoRASegmentParameterNode:
        """Returns the module's parameter node (created in the scene on first use), typed."""
        return TCURLoRASegmentParameterNode(super().getParameterNode())

    @staticmethod
    def engineFolder() -> str | None:
        """Returns the folder that holds ``TCURLoRALib`` (found on disk, not imported), or None."""
        return _findEngineFolder()

    @staticmethod
    def describeVolume(volumeNode: vtkMRMLScalarVolumeNode | None) -> str:
        """Describes a volume's grid for the panel.

        Args:
            volumeNode: a vtkMRMLScalarVolumeNode with image data.

        Returns:
            For example ``"6 x 5 x 4 voxels, 1.00 x 2.00 x 3.00 mm"``: size and spacing in the IJK order of the
            image data (columns, rows, slices).

        Raises:
            ValueError: if the node is None or holds no image data.
        """
        if volumeNode is None:
            raise ValueError("volumeNode is None: select a volume")
        imageData = volumeNode.GetImageData()
        if imageData is None:
            raise ValueError(f"Volume {volumeNode.GetName()!r} holds no image data")
        size = " x ".join(str(n) for n in imageData.GetDimensions())
        spacing = " x ".join(f"{s:.2f}" for s in volumeNode.GetSpacing())
        return _("{size} voxels, {spacing} mm").format(size=size, spacing=spacing)

    def engineStatus(self) -> dict[str, str]:
        """Imports the engine, PyTorch and MONAI and describes what was found.

        Importing torch takes seconds, so this runs on request, never when the module loads.

        Returns:
            Display strings under ``"location"`` (folder of the imported ``TCURLoRALib``), ``"version"`` (its
            ``__version__``), ``"torch"`` and ``"monai"`` (version, or why the import failed).
        """
        status = {}
        try:
            engine = importlib.import_module(ENGINE_PACKAGE)
        except Exception as error:  # see _importProblem: any failure is reported, none is fatal
            status["location"] = _("not importable (looked in {folder})").format(folder=self.engineFolder())
            status["version"] = self._importProblem(error)
        else:
            status["location"] = os.path.dirname(os.path.abspath(engine.__file__))
            status["version"] = str(getattr(engine, "__version__", _("unknown")))
        status["torch"] = self._probeTorch()
        status["monai"] = self._probeVersion("monai")
        return status

    @staticmethod
    def _importProblem(error: Exception) -> str:
        # A missing package raises ImportError; a broken one (say, a CUDA build without its libraries) raises
        # OSError or RuntimeError from inside its own __init__. Both must end up on the panel, not in a crash.
        if isinstance(error, ImportError):
            return _("not installed ({error})").format(error=error)
        return _("broken ({kind}: {error})").format(kind=type(error).__name__, error=error)

    def _probeVersion(self, packageName: str) -> str:
        try:
            package = importlib.import_module(packageName)
        except Exception as error:  # see _importProblem
            return self._importProblem(error)
        return str(getattr(package, "__version__", _("unknown version")))

    def _probeTorch(self) -> str:
        try:
            torch = importlib.import_module("torch")
        except Exception as error:  # see _importProblem
            return self._importProblem(error)
        device = _("CUDA available") if torch.cuda.is_available() else _("CPU only")
        return f"{torch.__version__} ({device})"


#
# TCURLoRASegmentTest
#


class TCURLoRASegmentTest(ScriptedLoadableModuleTest):
    """Self-test, run by Slicer's SelfTests module and by ctest."""

    def setUp(self):
        """Starts every test from an empty scene."""
        slicer.mrmlScene.Clear()

    def runTest(self):
        """Runs every test of this module."""
        self.setUp()
        self.test_EngineImports()
        self.setUp()
        self.test_DescribeVolume()
        self.setUp()
        self.test_ParameterNode()

    def test_EngineImports(self):
        """The engine package imports from the folder this module found, and reports a version string."""
        self.delayDisplay("Importing the engine")
        import TCURLoRALib

        logic = TCURLoRASegmentLogic()
        self.assertIsNotNone(logic.engineFolder())
        importedFrom = os.path.dirname(os.path.dirname(os.path.realpath(TCURLoRALib.__file__)))
        self.assertEqual(os.path.normcase(importedFrom), os.path.normcase(os.path.realpath(logic.engineFolder())))
        self.assertIsInstance(TCURLoRALib.__version__, str)
        self.assertTrue(TCURLoRALib.__version__)
        status = logic.engineStatus()
        self.assertEqual(set(status), {"location", "version", "torch", "monai"})
        self.assertEqual(status["version"], TCURLoRALib.__version__)
        self.delayDisplay("Engine imports")

    def test_DescribeVolume(self):
        """The volume summary gives IJK size and spacing; a node without image data is refused."""
        import numpy as np

        # Arrays are indexed (slice, row, column), so this grid is 6 columns x 5 rows x 4 slices.
        volumeNode = slicer.util.addVolumeFromArray(np.zeros((4, 5, 6), dtype=np.int16), name="grid")
        volumeNode.SetSpacing(1.0, 2.0, 3.0)
        logic = TCURLoRASegmentLogic()
        self.assertEqual(logic.describeVolume(volumeNode), "6 x 5 x 4 voxels, 1.00 x 2.00 x 3.00 mm")

        emptyNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
        with self.assertRaisesRegex(ValueError, "holds no image data"):
            logic.describeVolume(emptyNode)
        with self.assertRaisesRegex(ValueError, "volumeNode is None"):
            logic.describeVolume(None)

    def test_ParameterNode(self):
        """The parameter node stores the chosen input volume."""
        volumeNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "input")
        parameterNode = TCURLoRASegmentLogic().getParameterNode()
        parameterNode.inputVolume = volumeNode
        self.assertEqual(TCURLoRASegmentLogic().getParameterNode().inputVolume.GetID(), volumeNode.GetID())
