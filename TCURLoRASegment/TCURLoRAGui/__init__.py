"""The Slicer side that both TCURLoRA panels share: drawing, a panel's life cycle, and Slicer's installers.

A package (not a file next to the modules: Slicer loads every ``.py`` of a module folder as a module) of qt code
that draws what ``TCURLoRALib.panels`` decided and calls Slicer's dialogs and installers; it decides nothing.
"""
from __future__ import annotations

import logging

import qt
import vtk

import slicer
from slicer.i18n import tr as _

from TCURLoRALib.panels import engine, requirements

__all__ = ["PanelMixin", "adaptersChanged", "adapterListeners", "fillTable", "installDependencies",
           "showAdapterEntries", "showButton", "showEngineStatus", "showProgress"]

adapterListeners: list = []
"""Callbacks of the open Segment panels: :func:`adaptersChanged` (the Train module, after a save) calls each."""
_dependenciesReady = False  # once per Slicer session


def adaptersChanged() -> None:
    """Tells every open Segment panel to list the adapters again."""
    for listener in list(adapterListeners):
        try:
            listener()
        except Exception:  # one broken panel must not stop the others, nor the caller's success
            logging.exception("refreshing an adapter list failed")


def installDependencies(askConfirmation: bool = True) -> bool:
    """Makes PyTorch and the extension's packages importable, asking first (see requirements.ensure_dependencies:
    PyTorch from the PyTorch extension, never replaced once installed). On a user's Apply or Start only, never in a
    self-test. Returns False when the user declined."""
    global _dependenciesReady
    if not _dependenciesReady:
        confirm = slicer.util.confirmOkCancelDisplay if askConfirmation else (lambda question: True)
        _dependenciesReady = requirements.ensure_dependencies(
            engine.engine_folder(), lambda version: _installTorch(version, askConfirmation), confirm, slicer.util.pip_install)
    return _dependenciesReady


def _installTorch(versionRequirement: str, askConfirmation: bool) -> bool:
    try:
        import PyTorchUtils
    except ImportError:
        raise RuntimeError(_("PyTorch is not installed. Install the 'PyTorch' extension from the Extensions Manager, "
                             "restart Slicer, and press the button again.")) from None
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=askConfirmation,
                                                          torchVersionRequirement=versionRequirement)
    return torch is not None


def showButton(button, state) -> None:
    """Shows a TCURLoRALib.panels.view.ButtonState on a push button."""
    button.enabled = state.enabled
    button.text = state.text
    button.toolTip = state.tooltip


def showAdapterEntries(combo, entries: list, index: int) -> None:
    """Fills an adapter combo box with AdapterChoice entries (when they changed) and selects ``index``, signals
    blocked: the parameter node holds the value shown already (see TCURLoRALib.panels.adapters.AdapterList)."""
    wanted = [(entry.text, entry.value, entry.tooltip) for entry in entries]
    shown = [(combo.itemText(i), combo.itemData(i) or "", combo.itemData(i, qt.Qt.ToolTipRole) or "")
             for i in range(combo.count)]
    wasBlocked = combo.blockSignals(True)
    try:
        if shown != wanted:
            combo.clear()
            for text, value, tooltip in wanted:
                combo.addItem(text, value)
                combo.setItemData(combo.count - 1, tooltip, qt.Qt.ToolTipRole)
        combo.currentIndex = index
    finally:
        combo.blockSignals(wasBlocked)
    combo.toolTip = entries[index].tooltip


def fillTable(table, rows: list, editableColumn: int | None = None) -> None:
    """Fills a QTableWidget with rows of texts, signals blocked; only ``editableColumn`` can be edited."""
    wasBlocked = table.blockSignals(True)
    try:
        table.setRowCount(len(rows))
        for row, texts in enumerate(rows):
            for column, text in enumerate(texts):
                item = qt.QTableWidgetItem(text)
                if column != editableColumn:
                    item.setFlags(qt.Qt.ItemIsSelectable | qt.Qt.ItemIsEnabled)
                table.setItem(row, column, item)
    finally:
        table.blockSignals(wasBlocked)


def showProgress(ui, update) -> None:
    """Shows a TCURLoRALib.panels.tracking.ProgressUpdate in the progress bar, status line and log."""
    if update.percent is not None:
        ui.progressBar.setValue(update.percent)
    if update.status is not None:
        ui.statusLabel.text = update.status
    if update.log:
        ui.logTextEdit.appendPlainText(update.log)


def showEngineStatus(ui, status: dict) -> None:
    """Shows TCURLoRALib.panels.engine.engine_status in a panel's Engine section."""
    ui.engineLocationLabel.text = status["location"]
    ui.engineVersionLabel.text = status["version"]
    ui.torchStatusLabel.text = status["torch"]
    ui.monaiStatusLabel.text = status["monai"]


class PanelMixin:
    """What both panel widgets do alike: follow their parameter node, poll their running job, show its progress.

    The widget sets ``logic``, ``ui`` and ``_timer`` in ``setup`` (:meth:`setupPanel`), and defines
    ``_updateGui()``, ``initializeParameterNode()`` and ``_onJobFinished(run)``; ``_run`` is its running
    TCURLoRALib.panels.runs.Run or None.
    """

    POLL_INTERVAL_MS = 200

    def initPanel(self) -> None:
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None
        self._timer = None

    def setupPanel(self) -> None:
        """Observes the scene's close, makes the job timer and shows where the engine is."""
        self.ui.engineLocationLabel.text = str(engine.engine_folder() / "TCURLoRALib")
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPollJob)
        self.ui.checkEngineButton.connect("clicked(bool)", self.onCheckEngineButton)

    def cleanup(self) -> None:
        """Called when the application closes: a running job is stopped (briefly waited for) with the panel."""
        if self._timer is not None:
            self._timer.stop()
        if self._run is not None:
            self._run.cancel(grace_seconds=2.0)
            self._run.wait(timeout=5.0)
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        # Brought up to date again on enter(); until then the GUI need not follow the parameter node.
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def setParameterNode(self, inputParameterNode) -> None:
        """Connects the GUI to a parameter node (widgets carry a SlicerParameterName property in the .ui)."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
        self._updateGui()

    def onCheckEngineButton(self) -> None:
        """Imports the engine, PyTorch and MONAI (seconds) and shows what was found."""
        with slicer.util.tryWithErrorDisplay(_("Failed to check the TCURLoRA engine."), waitCursor=True):
            showEngineStatus(self.ui, engine.engine_status())

    def startedRun(self, run) -> None:
        """Shows a job that just started and polls it."""
        self._run = run
        self.ui.logTextEdit.clear()
        self.ui.logTextEdit.appendPlainText(" ".join(run.job.command()))
        self.ui.progressBar.setValue(0)
        self.ui.statusLabel.text = _("Starting...")
        self._timer.start()

    def onPollJob(self) -> None:
        """Shows the job's new events in the progress bar, status line and log; hands over a finished job."""
        for update in self._run.poll():
            showProgress(self.ui, update)
        if self._run.outcome is not None:
            self._timer.stop()
            run, self._run = self._run, None
            try:
                self._onJobFinished(run)
            finally:
                self._updateGui()

    def cancelRun(self) -> None:
        """Asks the running job to stop; returns at once (the job ends at its next step, or is killed later)."""
        self._run.cancel(grace_seconds=10.0)
        self._updateGui()
