"""What the panel sections that run the engine share (needs Slicer's Qt: imported by the module widgets only, never
by the Qt-free library or its tests): the Apply part (:mod:`.runpanel`) and the *Train a model* section
(:mod:`.trainingpanel`).

One button starts the engine in the background and, while it runs, cancels it at once without blocking the panel;
a timer polls the run: progress bar, status line, the engine's new log lines; when the engine has ended the run's
results are loaded, or the status says it was cancelled or failed (the engine's own words in an error dialog). A
run cancelled from elsewhere (the scene or the module closed) is forgotten without waiting for it. Also the small
helpers the panels share: path parameters as text, combo boxes filled and selected by their data.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import qt
import slicer

from .engine import EngineCancelled, EngineError

DEVICE_LABELS = {"auto": "Auto (GPU when available)", "cpu": "CPU", "gpu": "GPU (CUDA)"}   # the engine's devices
RESUME_NOTE = "Resume continues from the last finished epoch."   # after a training stopped early


def pathText(path) -> str:
    """A path parameter as text: "" when none is chosen (an empty pathlib.Path reads ".")."""
    text = str(path or "")
    return "" if text in ("", ".") else text


def fillCombo(combo, items: dict) -> None:
    """A combo box's choices: {data: text shown}."""
    combo.clear()
    for value, text in items.items():
        combo.addItem(text, value)


def selectComboData(combo, value) -> None:
    """Select the choice whose data is ``value`` (the first when none is), without signalling the change."""
    wasBlocked = combo.blockSignals(True)
    combo.setCurrentIndex(max(combo.findData(value), 0))
    combo.blockSignals(wasBlocked)


def connectComboToParameter(combo, parameterNode: Callable[[], object], name: str) -> None:
    """Choosing in the combo box sets the parameter ``name`` of ``parameterNode()`` (when there is one) to the
    choice's data."""
    def changed(_index: int) -> None:
        node = parameterNode()
        if node is not None:
            setattr(node, name, combo.currentData)

    combo.connect("currentIndexChanged(int)", changed)


class EngineSection:
    """One engine run at a time from a panel section. ``ui``: the panel's widget variables; ``logic``: the module
    logic (with ``ensureEngineDependencies``); ``moduleTitle``: the name in log messages; ``button``: the section's
    start/cancel button (``idleText`` when no run goes); ``progressBar`` and ``statusLabel``: the section's own;
    ``logWidget``: a QPlainTextEdit for the engine's output (None: the Python console only); ``logSection``: the
    collapsible section holding it, opened when a run fails (None: left as it is).

    A section says what its work is called (``work``: "segmentation", "training"), refreshes its buttons
    (``updateButtons``) and shows a result (``showResult``); it may change the status line while the engine runs
    (``statusText``), the words of a cancel (``cancelledText``), how results are loaded (``loadResult``) and what
    is refreshed after a run (``afterRun``).
    """

    work = "run"               # "Cannot start the <work>", "<Work> failed: ..."
    failedStatus = "Failed."   # the status line after a failure
    logName = "engine"         # "<module> <logName> log:" in the Python console after a failure
    pollMilliseconds = 200

    def __init__(self, ui, logic, moduleTitle: str, button, idleText: str, progressBar, statusLabel,
                 logWidget=None, logSection=None):
        self.ui, self.logic, self.moduleTitle = ui, logic, moduleTitle
        self.button, self.idleText = button, idleText
        self.progressBar, self.statusLabel = progressBar, statusLabel
        self.logWidget, self.logSection = logWidget, logSection
        self._run = None
        self._timer = qt.QTimer()
        self._timer.setInterval(self.pollMilliseconds)
        self._timer.connect("timeout()", self.onPoll)
        self.progressBar.hide()

    # ------------------------------------------------------------------ hooks
    def updateButtons(self) -> None:
        raise NotImplementedError

    def showResult(self, result, run) -> None:
        raise NotImplementedError

    def statusText(self, run) -> str:
        return run.lastProgress.message

    def cancelledText(self, run) -> str:
        return "Cancelled."

    def loadResult(self, run):
        return run.finish()

    def afterRun(self) -> None:
        self.updateButtons()

    # ------------------------------------------------------------------ run
    def isRunning(self) -> bool:
        return self._run is not None

    def startOrCancel(self, start: Callable[[], object], verb: str, status: str) -> bool:
        """The section's button: while a run goes, cancel it (returns at once; the timer sees the engine end,
        killed after a grace period); else install the engine's dependencies when missing (after asking) and
        ``start()`` a run. True when a run started: the section shows what is its own, then ``poll()``s it."""
        if self._run is not None:
            self._run.requestCancel()
            self.statusLabel.text = "Cancelling..."
            self.updateButtons()
            return False
        if not self.logic.ensureEngineDependencies():
            return False
        try:
            self._run = start()
        except EngineError as error:
            slicer.util.errorDisplay(f"Cannot start the {self.work}: {error}")
            return False
        command = " ".join(self._run.prepared.command)
        logging.info("%s: %s %s", self.moduleTitle, verb, command)
        self._log([f"$ {command}"], clear=True)
        self.progressBar.setValue(0)
        self.progressBar.show()
        self.statusLabel.text = status
        return True

    def poll(self) -> None:
        """Poll the run just started from now on."""
        self.updateButtons()
        self._timer.start()

    def onPoll(self) -> None:
        run = self._run
        if run is None:
            self._timer.stop()
            return
        run.poll()
        self._log(run.newLogLines())
        self.progressBar.setValue(int(round(1000 * run.lastProgress.fraction)))
        if not run.isCancelling():
            self.statusLabel.text = self.statusText(run)
        if run.isRunning():
            self.updateButtons()
            return
        self._log(run.newLogLines())
        self._timer.stop()
        self._run = None
        try:
            result = self.loadResult(run)
        except EngineCancelled:
            self.statusLabel.text = self.cancelledText(run)
        except EngineError as error:
            logging.error("%s %s log:\n%s", self.moduleTitle, self.logName, run.log)
            self.statusLabel.text = self.failedStatus
            if self.logSection is not None:
                self.logSection.collapsed = False   # the engine's own words, next to the message
            slicer.util.errorDisplay(f"{self.work.capitalize()} failed: {error}")
        else:
            self.showResult(result, run)
        finally:
            self.progressBar.hide()
            self.afterRun()

    def _log(self, lines, clear: bool = False) -> None:
        if self.logWidget is None:
            return
        if clear:
            self.logWidget.clear()
        if lines:
            self.logWidget.appendPlainText("\n".join(lines))

    def forget(self, message: str) -> None:
        """Stop polling a run that was cancelled from elsewhere (scene or module closed)."""
        self._timer.stop()
        if self._run is None:
            return
        self._run = None
        self.progressBar.hide()
        self.statusLabel.text = message
        self.button.text = self.idleText
