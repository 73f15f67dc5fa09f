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

import slicer

from .engine import DEVICES
from .enginepanel import (
    DEVICE_LABELS,
    RESUME_NOTE,
    EngineSection,
    connectComboToParameter,
    fillCombo,
    pathText,
    selectComboData,
)
from .training import DEFAULT_SIZE, DICE, EPOCH, LOSS, TRAINING_SIZES, TrainingSettings, panelPlotViewNode

PLOT_HEIGHT = 220
TRAINING_NOTE = "Training into this folder: the model there is updated after every epoch."


class TrainingSection(EngineSection):
    """Drives the Train section of a panel. ``ui``: the panel's widget variables; ``logic``: the module logic
    (a TrainingLogic with ``ensureEngineDependencies``); ``onTrained(result)``: select the trained model for
    Apply; ``logWidget``: a QPlainTextEdit for the engine's output (None: the Python console only)."""

    work = "training"
    failedStatus = "Training failed."
    logName = "training"
    pollMilliseconds = 500

    def __init__(self, ui, logic, moduleTitle: str, onTrained: Callable[[object], None],
                 deviceLabels: dict[str, str] | None = None, logWidget=None):
        super().__init__(ui, logic, moduleTitle, ui.trainButton, "Train", ui.trainingProgressBar,
                         ui.trainingStatusLabel, logWidget)
        self.onTrained = onTrained
        self.parameterNode = None
        self._curves = None          # the nodes of the last run: a resume of the same folder continues them
        self._curvesFolder = None    # ... and its model folder
        self._lastFolder = None      # the model folder last shown (its recorded settings are filled in once)
        self._plotView = None
        self._plotViewNode = None

        labels = deviceLabels or DEVICE_LABELS
        fillCombo(self.ui.trainingMethodComboBox, self.logic.trainingMethods())
        self.ui.trainingMethodComboBox.enabled = self.ui.trainingMethodComboBox.count > 1
        fillCombo(self.ui.trainingSizeComboBox, {name: size.label for name, size in TRAINING_SIZES.items()})
        fillCombo(self.ui.trainingDeviceComboBox, {d: labels.get(d, d) for d in DEVICES})
        for combo, name in ((self.ui.trainingMethodComboBox, "trainingMethod"),
                            (self.ui.trainingSizeComboBox, "trainingSize"),
                            (self.ui.trainingDeviceComboBox, "trainingDevice")):
            connectComboToParameter(combo, lambda: self.parameterNode, name)
        self.ui.trainButton.connect("clicked(bool)", lambda _checked=False: self.onTrain(resume=False))
        self.ui.resumeButton.connect("clicked(bool)", lambda _checked=False: self.onTrain(resume=True))
        self.ui.trainingPlotLayoutButton.connect("clicked(bool)", lambda _checked=False: self.showPlotInLayout())
        self.ui.trainingPlotLayoutButton.enabled = False

    # ------------------------------------------------------------------ parameter node -> widgets
    def setParameterNode(self, parameterNode) -> None:
        self.parameterNode = parameterNode

    def settings(self, resume: bool = False) -> TrainingSettings:
        p = self.parameterNode
        methods = self.logic.trainingMethods()
        method = p.trainingMethod if p.trainingMethod in methods else next(iter(methods), "")
        return TrainingSettings(pathText(p.trainingAtlasFolder), pathText(p.trainingModelFolder), method,
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
            selectComboData(combo, value)
        size = TRAINING_SIZES.get(settings.size)
        self.ui.trainingSizeNoteLabel.text = size.noteFor(settings.method) if size else ""
        self.ui.trainingFolderNoteLabel.text = TRAINING_NOTE if self._run is not None else \
            self.logic.describeModelFolder(settings)
        self.updateButtons()

    def _fillFromRecord(self) -> None:
        """A model folder chosen anew that holds a run the panel started: show the settings it was started with
        (a resume needs the same ones)."""
        p = self.parameterNode
        folder = pathText(p.trainingModelFolder)
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

    def updateButtons(self) -> None:
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
    def onTrain(self, resume: bool) -> None:
        if not self.startOrCancel(lambda: self._startTraining(resume), "training with",
                                  "Resuming the training..." if resume else "Starting the training..."):
            return
        self._curves, self._curvesFolder = self._run.curves, pathlib.Path(self._run.settings.modelFolder).resolve()
        self.showPlot(self._run.curves.chart)
        self.ui.trainingFolderNoteLabel.text = TRAINING_NOTE
        self.poll()

    def _startTraining(self, resume: bool):
        """A resume of the folder the last run trained continues that run's table and chart."""
        settings = self.settings(resume)
        sameFolder = self._curvesFolder is not None and \
            pathlib.Path(settings.modelFolder).resolve() == self._curvesFolder
        return self.logic.startTraining(settings, self._curves if resume and sameFolder else None)

    def statusText(self, run) -> str:
        text = run.lastProgress.message
        if run.curves.rows:
            row = run.curves.rows[-1]
            dice = "" if math.isnan(row[DICE]) else f", validation Dice {row[DICE]:.3f}"
            text += f" (last epoch {row[EPOCH]:.0f}: loss {row[LOSS]:.3f}{dice})"
        return text

    def cancelledText(self, run) -> str:
        done = len(run.curves.rows)
        return f"Cancelled after {done} epoch{'s' if done != 1 else ''}: {RESUME_NOTE}"

    def showResult(self, result, run) -> None:
        dice = "" if math.isnan(result.bestValidationDice) else \
            f", best validation Dice {result.bestValidationDice:.3f}"
        self.ui.trainingStatusLabel.text = (f"Trained: {result.epochs} epochs{dice}. The model in "
                                            f"{result.modelFolder} is selected for Apply.")
        self.onTrained(result)

    def afterRun(self) -> None:
        self.update()

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
