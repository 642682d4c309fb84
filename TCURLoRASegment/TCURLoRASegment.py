"""TCURLoRA Segment: segment a volume with a frozen UNETR and a selectable tCURLoRA adapter.

This file holds only the Slicer classes. The engine package ``TCURLoRALib`` and its dependencies (PyTorch, MONAI)
are imported when a button needs them, never when Slicer loads the module, so that Slicer starts and this panel
opens even before those dependencies are installed.
"""
from __future__ import annotations

import enum
import importlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import unittest
from dataclasses import dataclass
from typing import Annotated

import qt
import vtk

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
# Adapter list listeners: the Train module calls notifyAdaptersChanged() after saving an adapter, and every
# open Segment panel refreshes its adapter list at once.
#

_adapterListeners: list = []


#
# TCURLoRASegmentParameterNode
#


class Device(enum.Enum):
    """Where the background process runs the network; values are the CLI's ``--device`` spellings."""

    AUTO = "auto"
    CPU = "cpu"
    GPU = "cuda"

    def label(self) -> str:
        """Text of the device combo box (read by the parameter node's combo-box connector)."""
        return {"auto": _("Auto (GPU if available)"), "cpu": _("CPU"), "cuda": _("GPU (CUDA)")}[self.value]


@parameterNodeWrapper
class TCURLoRASegmentParameterNode:
    """Choices of the Segment panel, saved with the scene.

    inputVolume - the volume to segment.
    adapterName - the adapter's store name; empty for the base model alone (the combo box is filled at run time,
        so it is kept in step by the widget, not bound in the .ui).
    device - where the network runs.
    overlap - sliding-window overlap in [0, 0.9]: higher is smoother and slower.
    outputSegmentation - the segmentation to fill; a new one is created when None.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    adapterName: str
    device: Device
    overlap: Annotated[float, WithinRange(0.0, 0.9), Default(0.25), Decimals(2), SingleStep(0.05)]
    outputSegmentation: vtkMRMLSegmentationNode


#
# TCURLoRASegmentWidget
#


class TCURLoRASegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The Segment panel: gathers inputs and shows results; all work is done by the logic."""

    POLL_INTERVAL_MS = 200

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic: TCURLoRASegmentLogic | None = None
        self._parameterNode: TCURLoRASegmentParameterNode | None = None
        self._parameterNodeGuiTag = None
        self._run: SegmentationRun | None = None
        self._tracker = None
        self._timer = None

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
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.refreshAdaptersButton.connect("clicked(bool)", self.refreshAdapters)
        self.ui.adapterComboBox.connect("currentIndexChanged(int)", self.onAdapterChanged)
        # Found on disk only: the import (and with it torch) waits for the button.
        engineFolder = self.logic.engineFolder()
        self.ui.engineLocationLabel.text = (
            os.path.join(engineFolder, ENGINE_PACKAGE) if engineFolder else _("not found")
        )

        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPollJob)
        self.ui.progressBar.setValue(0)
        _adapterListeners.append(self.refreshAdapters)

        self.initializeParameterNode()
        self.refreshAdapters()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        if self.refreshAdapters in _adapterListeners:
            _adapterListeners.remove(self.refreshAdapters)
        if self._timer is not None:
            self._timer.stop()
        if self._run is not None and not self._run.job.finished:
            self._run.job.cancel(grace_seconds=2.0)
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
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
        self._updateGui()

    def _updateGui(self, caller=None, event=None) -> None:
        volumeNode = self._parameterNode.inputVolume if self._parameterNode else None
        if volumeNode is None:
            self.ui.inputVolumeInfoLabel.text = _("No volume selected")
        elif volumeNode.GetImageData() is None:
            self.ui.inputVolumeInfoLabel.text = _("The volume holds no image data")
        else:
            self.ui.inputVolumeInfoLabel.text = self.logic.describeVolume(volumeNode)
        running = self._run is not None
        self.ui.applyButton.enabled = running or (volumeNode is not None and volumeNode.GetImageData() is not None)
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.applyButton.toolTip = (_("Stop the running segmentation") if running
                                       else _("Segment the input volume in a background process"))
        if self._parameterNode:
            self._selectAdapter(self._parameterNode.adapterName)

    def refreshAdapters(self) -> None:
        """Fills the adapter combo box from the store (shipped and user adapters), keeping the selection."""
        combo = self.ui.adapterComboBox
        wasBlocked = combo.blockSignals(True)
        try:
            combo.clear()
            try:
                choices = self.logic.adapterChoices()
            except Exception as error:  # noqa: BLE001  the panel must open whatever the engine's state
                # Before the first Apply the dependencies may be missing: the base entry alone is offered.
                choices = []
                combo.addItem(_("Base model only"), "")
                self.ui.statusLabel.text = _("Adapters are listed once PyTorch and MONAI are installed "
                                             "(on the first Apply): {error}").format(error=error)
            for choice in choices:
                combo.addItem(choice.text, choice.name or "")
                combo.setItemData(combo.count - 1, choice.tooltip, qt.Qt.ToolTipRole)
        finally:
            combo.blockSignals(wasBlocked)
        self._selectAdapter(self._parameterNode.adapterName if self._parameterNode else "")

    def _selectAdapter(self, name: str) -> None:
        combo = self.ui.adapterComboBox
        index = combo.findData(name or "")
        if index < 0:
            index = 0
        if combo.currentIndex != index:
            wasBlocked = combo.blockSignals(True)
            combo.currentIndex = index
            combo.blockSignals(wasBlocked)
        combo.toolTip = combo.itemData(index, qt.Qt.ToolTipRole) or ""

    def onAdapterChanged(self, index: int) -> None:
        """Stores the chosen adapter in the parameter node and shows its card as the combo box's tooltip."""
        combo = self.ui.adapterComboBox
        combo.toolTip = combo.itemData(index, qt.Qt.ToolTipRole) or ""
        if self._parameterNode and index >= 0:
            self._parameterNode.adapterName = combo.itemData(index) or ""

    def onCheckEngineButton(self) -> None:
        """Imports the engine, PyTorch and MONAI and shows what was found."""
        with slicer.util.tryWithErrorDisplay(_("Failed to check the TCURLoRA engine."), waitCursor=True):
            status = self.logic.engineStatus()
            self.ui.engineLocationLabel.text = status["location"]
            self.ui.engineVersionLabel.text = status["version"]
            self.ui.torchStatusLabel.text = status["torch"]
            self.ui.monaiStatusLabel.text = status["monai"]

    def onApplyButton(self) -> None:
        """Starts a segmentation, or cancels the running one."""
        if self._run is not None:
            with slicer.util.tryWithErrorDisplay(_("Failed to cancel the segmentation."), waitCursor=True):
                self._run.job.cancel(grace_seconds=3.0)
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the segmentation."), waitCursor=True):
            if not self.logic.ensureDependencies(askConfirmation=True):
                self.ui.statusLabel.text = _("Dependencies not installed: nothing was done")
                return
            self.refreshAdapters()
            from TCURLoRALib.panel import ProgressTracker

            p = self._parameterNode
            self.ui.logTextEdit.clear()
            self._tracker = ProgressTracker()
            self._run = self.logic.startSegmentation(p.inputVolume, p.adapterName or None, p.device.value, p.overlap)
            self._appendLog(" ".join(self._run.job.command()))
            self.ui.progressBar.setValue(0)
            self.ui.statusLabel.text = _("Starting...")
            self._timer.start()
        self._updateGui()

    def onPollJob(self) -> None:
        """Shows the job's new events; imports the result when it ends."""
        if self._run is None:
            self._timer.stop()
            return
        for event in self._run.job.poll_events():
            update = self._tracker.update(event)
            if update.percent is not None:
                self.ui.progressBar.setValue(update.percent)
            if update.status is not None:
                self.ui.statusLabel.text = update.status
            if update.log:
                self._appendLog(update.log)
            if update.finished:
                self._onJobFinished(update)
                break

    def _onJobFinished(self, update) -> None:
        self._timer.stop()
        run, self._run = self._run, None
        try:
            if update.state == "done":
                with slicer.util.tryWithErrorDisplay(_("Failed to load the segmentation."), waitCursor=True):
                    segmentationNode = self.logic.finishSegmentation(run, self._parameterNode.outputSegmentation)
                    self._parameterNode.outputSegmentation = segmentationNode
                    self.ui.statusLabel.text = _("Done: {name}").format(name=segmentationNode.GetName())
            elif update.state == "failed":
                self.logic.discardRun(run)
                slicer.util.errorDisplay(_("Segmentation failed: {error}").format(error=update.error),
                                         detailedText="\n".join(run.job.log[-50:]))
            else:
                self.logic.discardRun(run)
        finally:
            self._updateGui()

    def _appendLog(self, line: str) -> None:
        self.ui.logTextEdit.appendPlainText(line)


#
# TCURLoRASegmentLogic
#


@dataclass
class SegmentationRun:
    """A running segmentation: the job, and what is needed to import its result.

    outputFolder is separate from the job's work folder, which the job removes when it succeeds.
    """

    job: object
    inputVolume: vtkMRMLScalarVolumeNode
    labels: list
    outputFolder: str
    adapterName: str | None

    @property
    def outputPath(self) -> str:
        return os.path.join(self.outputFolder, "labels.nii.gz")


class TCURLoRASegmentLogic(ScriptedLoadableModuleLogic):
    """Segment computations, usable without the widget (from the Python console or a test)."""

    MINIMUM_TORCH = ">=2.0"
    _dependenciesReady = False  # once per Slicer session

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self) -> TCURLoRASegmentParameterNode:
        """Returns the module's parameter node (created in the scene on first use), typed."""
        return TCURLoRASegmentParameterNode(super().getParameterNode())

    @staticmethod
    def notifyAdaptersChanged() -> None:
        """Tells every open Segment panel to list the adapters again (called by the Train module after a save)."""
        for listener in list(_adapterListeners):
            try:
                listener()
            except Exception:  # one broken panel must not stop the others, nor the caller's success
                logging.exception("refreshing an adapter list failed")

    # -------------------------------------------------------------------------------- dependencies

    def ensureDependencies(self, askConfirmation: bool = True) -> bool:
        """Makes sure PyTorch and the packages of the extension's requirements.txt can be imported.

        PyTorch comes from the PyTorch extension (PyTorchUtils), which picks the build for this computer's GPU;
        the rest is installed with ``slicer.util.pip_install``. Never called at import: only on a user's Apply or
        Start, after asking.

        Returns:
            True when everything is importable; False when the user declined.

        Raises:
            RuntimeError: PyTorch is missing and the PyTorch extension is not installed, or an install failed.
        """
        if TCURLoRASegmentLogic._dependenciesReady:
            return True
        if importlib.util.find_spec("torch") is None:
            try:
                import PyTorchUtils
            except ImportError:
                raise RuntimeError(_(
                    "PyTorch is not installed. Install the 'PyTorch' extension from the Extensions Manager, restart "
                    "Slicer, and press Apply again: it installs the PyTorch build that suits this computer."))
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if not torchLogic.torchInstalled():
                torch = torchLogic.installTorch(askConfirmation=askConfirmation,
                                                torchVersionRequirement=self.MINIMUM_TORCH)
                if torch is None:
                    return False
        from TCURLoRALib import panel

        requirements = panel.read_requirements(panel.requirements_file(self.moduleFolder()))
        missing = panel.missing_modules(requirements)
        if missing:
            question = _("TCURLoRA needs these Python packages, which are not installed yet:\n{packages}\n\n"
                         "Install them now? This takes a few minutes.").format(packages="\n".join(missing))
            if askConfirmation and not slicer.util.confirmOkCancelDisplay(question):
                return False
            slicer.util.pip_install(missing)
            importlib.invalidate_caches()
            stillMissing = panel.missing_modules(requirements)
            if stillMissing:
                raise RuntimeError(_("Installing {packages} failed; see the Python console").format(
                    packages=", ".join(stillMissing)))
        TCURLoRASegmentLogic._dependenciesReady = True
        return True

    @staticmethod
    def moduleFolder() -> str:
        """This module's folder (the installed qt-scripted-modules folder, or TCURLoRASegment/ of a checkout)."""
        return os.path.dirname(os.path.abspath(__file__))

    @staticmethod
    def pythonForJobs() -> str:
        """The interpreter that runs background jobs: PythonSlicer, so jobs see Slicer's packages."""
        from TCURLoRALib.panel import python_for_jobs

        return python_for_jobs(sys.executable)

    # -------------------------------------------------------------------------------- adapters

    @staticmethod
    def adapterStore():
        """The adapter store: shipped adapters and the user's folder ($TCURLORA_HOME)."""
        from TCURLoRALib.paths import shipped_models_dir
        from TCURLoRALib.store import AdapterStore

        return AdapterStore(shipped_models_dir())

    @staticmethod
    def shippedBasePath() -> str | None:
        """The one shipped base model file, or None while none is shipped."""
        from TCURLoRALib.cli import resolve_base

        try:
            return str(resolve_base(None))
        except ValueError:
            return None

    def adapterChoices(self) -> list:
        """Entries of the adapter combo box: "Base model only", then every adapter (TCURLoRALib.panel.AdapterChoice).

        Raises:
            ImportError: the engine's dependencies are not installed yet.
        """
        from TCURLoRALib import panel

        store = self.adapterStore()
        basePath = self.shippedBasePath()
        baseTooltip = ""
        if basePath:
            card = self.baseCard(basePath)
            baseTooltip = _("{name}: the frozen base model without an adapter\nLabels: {labels}").format(
                name=card.name, labels=", ".join(label.name for label in card.labels[1:]))
        return panel.adapter_choices(store.list(), baseTooltip)

    @staticmethod
    def baseCard(basePath: str):
        """The model card of a base-model file (TCURLoRALib.cards.ModelCard)."""
        from TCURLoRALib import files
        from TCURLoRALib.cards import ModelCard

        return ModelCard.from_json(files.read_info(basePath, "base")[1])

    def labelsOf(self, adapterName: str | None, basePath: str | None = None) -> list:
        """The output labels of an adapter (by store name), or of the base when ``adapterName`` is None.

        Raises:
            FileNotFoundError: no such adapter; ValueError: no base given and none or several shipped.
        """
        if adapterName:
            return list(self.adapterStore().find(adapterName).card.labels)
        from TCURLoRALib.cli import resolve_base

        return list(self.baseCard(str(resolve_base(basePath))).labels)

    # -------------------------------------------------------------------------------- segmentation

    def startSegmentation(self, inputVolume, adapterName: str | None, device: str = "auto", overlap: float = 0.25,
                          basePath: str | None = None) -> SegmentationRun:
        """Exports the volume and starts ``python -m TCURLoRALib segment`` in the background; returns at once.

        Raises:
            ValueError: no volume, bad settings, a volume that cannot be exported.
            FileNotFoundError: an unknown adapter.
        """
        from TCURLoRALib import jobs, mrml, panel

        if inputVolume is None:
            raise ValueError(_("Select an input volume"))
        labels = self.labelsOf(adapterName, basePath)
        workFolder = tempfile.mkdtemp(prefix="tcurlora-segment-")
        outputFolder = tempfile.mkdtemp(prefix="tcurlora-result-")
        try:
            imagePath = mrml.export_volume(inputVolume, os.path.join(workFolder, "input.nii.gz"))
            run = SegmentationRun(None, inputVolume, labels, outputFolder, adapterName)
            arguments = panel.segment_arguments(imagePath, run.outputPath, adapter=adapterName, device=device,
                                                overlap=overlap, base=basePath)
            run.job = jobs.Job(arguments, python=self.pythonForJobs(), work_dir=workFolder)
            run.job.start()
        except Exception:
            shutil.rmtree(workFolder, ignore_errors=True)
            shutil.rmtree(outputFolder, ignore_errors=True)
            raise
        return run

    def finishSegmentation(self, run: SegmentationRun, segmentationNode=None):
        """Imports a finished run's label map as segments over its input volume and shows them.

        Returns:
            the segmentation node (``segmentationNode`` when given, else a new one).
        """
        from TCURLoRALib import mrml

        try:
            name = f"{run.inputVolume.GetName()} {run.adapterName or 'base'}"
            segmentationNode = mrml.import_label_map(run.outputPath, run.labels, run.inputVolume,
                                                     segmentation_node=segmentationNode, name=name)
        finally:
            self.discardRun(run)
        segmentationNode.CreateDefaultDisplayNodes()
        slicer.util.setSliceViewerLayers(background=run.inputVolume, fit=True)
        return segmentationNode

    @staticmethod
    def discardRun(run: SegmentationRun) -> None:
        """Removes the run's output folder (the job keeps its own work folder after a failure, for the log)."""
        shutil.rmtree(run.outputFolder, ignore_errors=True)

    def segment(self, inputVolume, adapterName: str | None, device: str = "auto", overlap: float = 0.25,
                basePath: str | None = None, segmentationNode=None, timeout: float | None = None):
        """Segments and waits (for scripts and tests; the panel polls instead).

        Raises:
            RuntimeError: the job failed or was cancelled; the message holds its error.
        """
        run = self.startSegmentation(inputVolume, adapterName, device, overlap, basePath)
        state = run.job.wait(timeout)
        if state.value != "done":
            self.discardRun(run)
            raise RuntimeError(f"segmentation {state.value}: {run.job.error}\n" + "\n".join(run.job.log[-20:]))
        return self.finishSegmentation(run, segmentationNode)

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
        self.setUp()
        self.test_PanelHelpersImportWithoutTorch()
        # Last: it raises SkipTest while no model is shipped, which ends runTest.
        self.setUp()
        self.test_SegmentShippedSample()

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

    def test_PanelHelpersImportWithoutTorch(self):
        """The panel's qt-free helpers build the CLI call the logic starts; the requirements file is found."""
        from TCURLoRALib import panel

        arguments = panel.segment_arguments("in.nii.gz", "out.nii.gz", adapter="a", device="cpu", overlap=0.5)
        self.assertEqual(arguments[:2], ["segment", "in.nii.gz"])
        self.assertIn("--overlap", arguments)
        requirements = panel.read_requirements(panel.requirements_file(TCURLoRASegmentLogic.moduleFolder()))
        self.assertTrue(any(line.startswith("monai") for line in requirements))

    def test_SegmentShippedSample(self):
        """Segments the shipped sample (or a synthetic volume) with a shipped adapter through the logic."""
        logic = TCURLoRASegmentLogic()
        self.assertTrue(logic.ensureDependencies(askConfirmation=False))
        basePath = logic.shippedBasePath()
        shipped = [entry.name for entry in logic.adapterStore().list() if entry.source == "shipped"]
        if basePath is None or not shipped:
            raise unittest.SkipTest("no base model or adapter is shipped in Resources/Models yet: nothing to test")
        volumeNode = self._loadSampleOrSynthetic(logic.baseCard(basePath))
        adapterName = shipped[0]
        self.delayDisplay(f"Segmenting {volumeNode.GetName()!r} with {adapterName!r}")
        segmentationNode = logic.segment(volumeNode, adapterName, device="cpu", timeout=600)
        labels = logic.labelsOf(adapterName)
        segmentation = segmentationNode.GetSegmentation()
        self.assertEqual(segmentation.GetNumberOfSegments(), len(labels) - 1)
        self.assertEqual([segmentation.GetNthSegment(i).GetName() for i in range(len(labels) - 1)],
                         [label.name for label in labels[1:]])
        self.assertEqual(segmentationNode.GetNodeReference(
            segmentationNode.GetReferenceImageGeometryReferenceRole()).GetID(), volumeNode.GetID())
        voxels = sum(slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentation.GetNthSegmentID(i),
                                                                volumeNode).sum()
                     for i in range(segmentation.GetNumberOfSegments()))
        self.assertGreater(voxels, 0, "the shipped adapter found no structure at all")
        self.delayDisplay("Segmented")

    @staticmethod
    def _loadSampleOrSynthetic(card):
        """The shipped sample (Resources/Samples), else a bright sphere on noise on the base's grid."""
        import numpy as np

        from TCURLoRALib.paths import SAMPLE_IMAGE, shipped_samples_dir

        sample = shipped_samples_dir() / SAMPLE_IMAGE
        if sample.is_file():
            return slicer.util.loadVolume(str(sample))
        shape = [2 * size for size in reversed(card.patch_size)]
        grid = np.indices(shape).astype(np.float32)
        centre = np.array(shape, dtype=np.float32).reshape(3, 1, 1, 1) / 2
        sphere = ((grid - centre) ** 2).sum(axis=0) < (min(shape) / 4) ** 2
        voxels = np.random.default_rng(0).normal(0, 5, shape) + 100 * sphere
        volumeNode = slicer.util.addVolumeFromArray(voxels.astype(np.float32), name="synthetic")
        volumeNode.SetSpacing(*card.spacing)
        return volumeNode
