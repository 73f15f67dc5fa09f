"""The *Train a model* section of a module panel, shared by the AtlasSeg modules (needs Slicer's Qt: imported by
the module widgets only, never by the Qt-free library or its tests).

The section's widgets are in each module's ``.ui`` under the names used below (``trainButton``,
``trainingModelFolderPathLineEdit``, ...), bound to the parameter node's ``training*`` fields; the work is done by
the module logic's :class:`~AtlasSegLib.training.TrainingLogic`. Train and Resume start the engine in the
background; a timer polls it: progress bar, status, the training table and its plot (shown in the panel, and on
request in the view layout), the engine's log. The same button cancels at once, without blocking the panel; the
checkpoint of the last finished epoch stays, so Resume continues from it. When the training ends, ``onTrained``
gets the :class:`~AtlasSegLib.training.TrainingResult` and the module selects the model for Apply.
"""

from __future__ import annotations

import logging
import math
import pathlib
from collections.abc import Callable

import qt
import slicer

from .engine import DEVICES, EngineCancelled, EngineError
from .training import DEFAULT_SIZE, DICE, EPOCH, LOSS, TRAINING_SIZES, TrainingSettings, panelPlotViewNode

POLL_MILLISECONDS = 500
DEVICE_LABELS = {"auto": "Auto (GPU when available)", "cpu": "CPU", "gpu": "GPU (CUDA)"}
PLOT_HEIGHT = 220
TRAINING_NOTE = "Training into this folder: the model there is updated after every epoch."


def _pathText(path) -> str:
    text = str(path or "")
    return "" if text in ("", ".") else text


class TrainingSection:
    """Drives the Train section of a panel. ``ui``: the panel's widget variables; ``logic``: the module logic
    (a TrainingLogic with ``ensureEngineDependencies``); ``onTrained(result)``: select the trained model for
    Apply; ``logWidget``: a QPlainTextEdit for the engine's output (None: the Python console only)."""

    def __init__(self, ui, logic, moduleTitle: str, onTrained: Callable[[object], None],
                 deviceLabels: dict[str, str] | None = None, logWidget=None):
        self.ui, self.logic, self.moduleTitle, self.onTrained = ui, logic, moduleTitle, onTrained
        self.logWidget = logWidget
        self.parameterNode = None
        self._run = None
        self._curves = None          # the nodes of the last run: a resume of the same folder continues them
        self._curvesFolder = None    # ... and its model folder
        self._lastFolder = None      # the model folder last shown (its recorded settings are filled in once)
        self._plotView = None
        self._plotViewNode = None
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_MILLISECONDS)
        self._timer.connect("timeout()", self.onPoll)

        labels = deviceLabels or DEVICE_LABELS
        self._fill(self.ui.trainingMethodComboBox, self.logic.trainingMethods())
        self.ui.trainingMethodComboBox.enabled = self.ui.trainingMethodComboBox.count > 1
        self._fill(self.ui.trainingSizeComboBox, {name: size.label for name, size in TRAINING_SIZES.items()})
        self._fill(self.ui.trainingDeviceComboBox, {d: labels.get(d, d) for d in DEVICES})
        for combo, name in ((self.ui.trainingMethodComboBox, "trainingMethod"),
                            (self.ui.trainingSizeComboBox, "trainingSize"),
                            (self.ui.trainingDeviceComboBox, "trainingDevice")):
            combo.connect("currentIndexChanged(int)", lambda _index, c=combo, n=name: self._comboChanged(c, n))
        self.ui.trainButton.connect("clicked(bool)", lambda _checked=False: self.onTrain(resume=False))
        self.ui.resumeButton.connect("clicked(bool)", lambda _checked=False: self.onTrain(resume=True))
        self.ui.trainingPlotLayoutButton.connect("clicked(bool)", lambda _checked=False: self.showPlotInLayout())
        self.ui.trainingPlotLayoutButton.enabled = False
        self.ui.trainingProgressBar.hide()

    @staticmethod
    def _fill(combo, items: dict) -> None:
        combo.clear()
        for value, text in items.items():
            combo.addItem(text, value)

    def _comboChanged(self, combo, parameterName: str) -> None:
        if self.parameterNode is not None:
            setattr(self.parameterNode, parameterName, combo.currentData)

    # ------------------------------------------------------------------ parameter node -> widgets
    def setParameterNode(self, parameterNode) -> None:
        self.parameterNode = parameterNode

    def settings(self, resume: bool = False) -> TrainingSettings:
        p = self.parameterNode
        methods = self.logic.trainingMethods()
        method = p.trainingMethod if p.trainingMethod in methods else next(iter(methods), "")
        return TrainingSettings(_pathText(p.trainingAtlasFolder), _pathText(p.trainingModelFolder), method,
                                p.trainingSize or DEFAULT_SIZE, p.trainingEpochs, p.trainingDevice, resume)

    def update(self) -> None:
        """Called by the module whenever its parameter node changes."""
        p = self.parameterNode
        if p is None:
            return
        self._fillFromRecord()
        settings = self.settings()
        for combo, value in ((self.ui.trainingMethodComboBox, settings.method),
                             (self.ui.trainingSizeComboBox, settings.size),
                             (self.ui.trainingDeviceComboBox, settings.device)):
            wasBlocked = combo.blockSignals(True)
            combo.setCurrentIndex(max(combo.findData(value), 0))
            combo.blockSignals(wasBlocked)
        size = TRAINING_SIZES.get(settings.size)
        self.ui.trainingSizeNoteLabel.text = size.noteFor(settings.method) if size else ""
        self.ui.trainingFolderNoteLabel.text = TRAINING_NOTE if self._run is not None else \
            self.logic.describeModelFolder(settings)
        self._updateButtons()

    def _fillFromRecord(self) -> None:
        """A model folder chosen anew that holds a run the panel started: show the settings it was started with
        (a resume needs the same ones)."""
        p = self.parameterNode
        folder = _pathText(p.trainingModelFolder)
        if folder == self._lastFolder:
            return
        self._lastFolder = folder
        state = self.logic.modelFolderState(folder)
        record = state.record
        if not state.resumable or not record:
            return
        with slicer.util.NodeModify(p.parameterNode):
            if record.get("method") in self.logic.trainingMethods():
                p.trainingMethod = record["method"]
            if record.get("size") in TRAINING_SIZES:
                p.trainingSize = record["size"]
            if isinstance(record.get("epochs"), int) and record["epochs"] >= 1:
                p.trainingEpochs = record["epochs"]
            if record.get("atlasFolder") and pathlib.Path(record["atlasFolder"]).is_dir():
                p.trainingAtlasFolder = pathlib.Path(record["atlasFolder"])

    def _updateButtons(self) -> None:
        if self._run is not None:
            cancelling = self._run.isCancelling()
            self.ui.trainButton.text = "Cancelling..." if cancelling else "Cancel training"
            self.ui.trainButton.enabled = not cancelling
            self.ui.trainButton.toolTip = "Stop the training; Resume continues from the last finished epoch"
            self.ui.resumeButton.enabled = False
            return
        trainProblems = self.logic.trainingProblems(self.settings(resume=False))
        resumeProblems = self.logic.trainingProblems(self.settings(resume=True))
        self.ui.trainButton.text = "Train"
        self.ui.trainButton.enabled = not trainProblems
        self.ui.trainButton.toolTip = " ".join(trainProblems) or "Train a new model into the model folder"
        self.ui.resumeButton.enabled = not resumeProblems
        self.ui.resumeButton.toolTip = " ".join(resumeProblems) or \
            "Continue the training in the model folder from its last finished epoch"

    # ------------------------------------------------------------------ run
    def isRunning(self) -> bool:
        return self._run is not None

    def onTrain(self, resume: bool) -> None:
        if self._run is not None:   # Cancel: returns at once; the timer sees the engine end
            self._run.requestCancel()
            self.ui.trainingStatusLabel.text = "Cancelling..."
            self._updateButtons()
            return
        if not self.logic.ensureEngineDependencies():
            return
        settings = self.settings(resume)
        sameFolder = self._curvesFolder is not None and \
            pathlib.Path(settings.modelFolder).resolve() == self._curvesFolder
        try:
            self._run = self.logic.startTraining(settings, self._curves if resume and sameFolder else None)
        except EngineError as error:
            slicer.util.errorDisplay(f"Cannot start the training: {error}")
            return
        self._curves, self._curvesFolder = self._run.curves, pathlib.Path(settings.modelFolder).resolve()
        command = " ".join(self._run.prepared.command)
        logging.info("%s: training with %s", self.moduleTitle, command)
        self._log([f"$ {command}"], clear=True)
        self.ui.trainingProgressBar.setValue(0)
        self.ui.trainingProgressBar.show()
        self.ui.trainingStatusLabel.text = "Resuming the training..." if resume else "Starting the training..."
        self.showPlot(self._run.curves.chart)
        self.ui.trainingFolderNoteLabel.text = TRAINING_NOTE
        self._updateButtons()
        self._timer.start()

    def onPoll(self) -> None:
        run = self._run
        if run is None:
            self._timer.stop()
            return
        run.poll()
        self._log(run.newLogLines())
        self.ui.trainingProgressBar.setValue(int(round(1000 * run.lastProgress.fraction)))
        if not run.isCancelling():
            self.ui.trainingStatusLabel.text = self._statusText(run)
        if run.isRunning():
            self._updateButtons()
            return
        self._log(run.newLogLines())
        self._timer.stop()
        self._run = None
        try:
            result = run.finish()
        except EngineCancelled:
            done = len(run.curves.rows)
            self.ui.trainingStatusLabel.text = (f"Cancelled after {done} epoch{'s' if done != 1 else ''}: Resume "
                                                "continues from the last finished epoch.")
        except EngineError as error:
            logging.error("%s training log:\n%s", self.moduleTitle, run.log)
            self.ui.trainingStatusLabel.text = "Training failed."
            slicer.util.errorDisplay(f"Training failed: {error}")
        else:
            dice = "" if math.isnan(result.bestValidationDice) else \
                f", best validation Dice {result.bestValidationDice:.3f}"
            self.ui.trainingStatusLabel.text = (f"Trained: {result.epochs} epochs{dice}. The model in "
                                                f"{result.modelFolder} is selected for Apply.")
            self.onTrained(result)
        finally:
            self.ui.trainingProgressBar.hide()
            self.update()

    @staticmethod
    def _statusText(run) -> str:
        text = run.lastProgress.message
        if run.curves.rows:
            row = run.curves.rows[-1]
            dice = "" if math.isnan(row[DICE]) else f", validation Dice {row[DICE]:.3f}"
            text += f" (last epoch {row[EPOCH]:.0f}: loss {row[LOSS]:.3f}{dice})"
        return text

    def _log(self, lines, clear: bool = False) -> None:
        if self.logWidget is None:
            return
        if clear:
            self.logWidget.clear()
        if lines:
            self.logWidget.appendPlainText("\n".join(lines))

    def forget(self, message: str) -> None:
        """Stop polling a training that was cancelled from elsewhere (scene or module closed)."""
        self._timer.stop()
        if self._run is None:
            return
        self._run = None
        self.ui.trainingProgressBar.hide()
        self.ui.trainingStatusLabel.text = message
        self.ui.trainButton.text = "Train"

    # ------------------------------------------------------------------ plot
    def showPlot(self, chart) -> None:
        """The training's chart in the panel (a plot view of its own); in the view layout when that fails."""
        self.ui.trainingPlotLayoutButton.enabled = True
        try:
            if self._plotView is None:
                self._plotView = slicer.qMRMLPlotView()
                self._plotView.setMRMLScene(slicer.mrmlScene)
                self._plotView.setMinimumHeight(PLOT_HEIGHT)
                self.ui.trainingPlotContainer.layout().addWidget(self._plotView)
            if self._plotViewNode is None or not slicer.mrmlScene.IsNodePresent(self._plotViewNode):
                self._plotViewNode = panelPlotViewNode(slicer.mrmlScene, f"{self.moduleTitle}TrainingPlot")
                self._plotView.setMRMLScene(slicer.mrmlScene)
                self._plotView.setMRMLPlotViewNode(self._plotViewNode)
            self._plotViewNode.SetPlotChartNodeID(chart.GetID())
        except Exception:   # a Slicer without an embeddable plot view: the layout's plot view shows it
            logging.exception("%s: the training plot cannot be shown in the panel", self.moduleTitle)
            self.showPlotInLayout(chart)

    def showPlotInLayout(self, chart=None) -> None:
        """The training's chart in the view layout's plot view (switching to a layout that has one)."""
        chart = chart or (self._curves.chart if self._curves is not None else None)
        if chart is not None and slicer.mrmlScene.IsNodePresent(chart):
            slicer.modules.plots.logic().ShowChartInLayout(chart)
