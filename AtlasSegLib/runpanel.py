"""The *Apply* part of a module panel, shared by the AtlasSeg modules (needs Slicer's Qt: imported by the module
widgets only, never by the Qt-free library or its tests).

The widgets are in each module's ``.ui`` under the names used below (``applyButton``, ``progressBar``,
``statusLabel``, ``metricsTableView``, ``mapSelector``, ``mapOpacitySlider``; a panel with an engine log pane also
has ``logTextEdit`` in ``logCollapsibleButton``); the work is done by the module logic's
:class:`~AtlasSegLib.run.EngineLogic` (``inputProblems``, ``startRun``). Apply starts the engine in the
background; a timer polls it: progress bar, status line, new log lines. The same button cancels at once, without
blocking the panel. When the run ends the results are shown (status with the run time, the target in the slice
views, the metrics table, the agreement map) and the module's ``onResult`` hook gets them. The map selector and
its opacity slider show one result map at a time over the target.
"""

from __future__ import annotations

from collections.abc import Callable

import slicer

from .enginepanel import RESUME_NOTE, EngineSection
from .results import MAP_KIND_ATTRIBUTE
from .run import runSeconds


class RunSection(EngineSection):
    """Drives a panel's Apply button, progress, status, engine log and result maps.

    ``ui``: the panel's widget variables; ``logic``: the module logic (an EngineLogic with ``inputProblems``,
    ``startRun`` and ``ensureEngineDependencies``); ``moduleTitle``: the name in log messages; ``inputs()`` and
    ``settings()``: the run's inputs and settings from the panel; ``applyToolTip``: what Apply does (shown while
    it can); ``counted``: what the run record counts, for the status line ("atlases", "networks");
    ``onResult(result)``: the module's own use of a finished run's results (None: nothing more). The engine log
    pane (``logTextEdit``, its ``logCollapsibleButton`` opened when a run fails) is used when the panel has one.
    """

    work = "segmentation"

    def __init__(self, ui, logic, moduleTitle: str, inputs: Callable[[], object], settings: Callable[[], object],
                 applyToolTip: str, counted: str, onResult: Callable[[object], None] | None = None):
        super().__init__(ui, logic, moduleTitle, ui.applyButton, "Apply", ui.progressBar, ui.statusLabel,
                         getattr(ui, "logTextEdit", None), getattr(ui, "logCollapsibleButton", None))
        self.inputs, self.settings, self.onResult = inputs, settings, onResult
        self.applyToolTip, self.counted = applyToolTip, counted
        self.ui.applyButton.connect("clicked(bool)", lambda _checked=False: self.onApply())
        self.ui.mapSelector.addAttribute("vtkMRMLScalarVolumeNode", MAP_KIND_ATTRIBUTE)
        self.ui.mapSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onMapSelected)
        self.ui.mapOpacitySlider.connect("valueChanged(double)", self.onMapOpacityChanged)

    def updateButtons(self) -> None:
        """Apply (enabled when the inputs are complete, else the reasons as its tooltip), or Cancel while a run
        goes. Called by the module whenever its parameter node changes."""
        if self._run is not None:
            cancelling = self._run.isCancelling()
            self.ui.applyButton.text = "Cancelling..." if cancelling else "Cancel"
            self.ui.applyButton.enabled = not cancelling
            self.ui.applyButton.toolTip = "Stop the running segmentation"
            return
        problems = self.logic.inputProblems(self.inputs(), self.settings())
        self.ui.applyButton.text = "Apply"
        self.ui.applyButton.enabled = not problems
        self.ui.applyButton.toolTip = " ".join(problems) or self.applyToolTip

    # ------------------------------------------------------------------ run
    def onApply(self) -> None:
        if self.startOrCancel(lambda: self.logic.startRun(self.inputs(), self.settings()), "running",
                              "Starting the engine..."):
            self.poll()

    def loadResult(self, run):
        with slicer.util.WaitCursor():   # the outputs become nodes
            return run.finish()

    def showResult(self, result, run) -> None:
        """A finished run: the status line, its target in the slice views, the metrics table, the agreement map;
        then the module's ``onResult``."""
        seconds = runSeconds(result.run)
        summary = f"Done in {seconds:.0f} s with {len(result.run.get(self.counted, []))} {self.counted}."
        if result.metrics:
            summary += f" Mean Dice {result.metrics['mean']['dice']:.3f}."
        self.ui.statusLabel.text = summary
        slicer.util.setSliceViewerLayers(background=run.inputs.targetVolume)
        if result.metricsTable is not None:
            self.ui.metricsTableView.setMRMLTableNode(result.metricsTable)
        if result.agreement is not None:
            self.ui.mapSelector.setCurrentNode(result.agreement)
        if self.onResult is not None:
            self.onResult(result)

    def closing(self, what: str, training=None) -> None:
        """The ``what`` ("module" or "scene") closes: every engine run the logic started (the segmentation and the
        training) is cancelled without waiting, and this section and the Train section ``training`` stop polling."""
        if what == "scene":
            self.logic.onSceneStartClose()   # the scene's nodes (targets, outputs) go
        else:
            self.logic.cancelActiveRuns()
        self.forget(f"Cancelled: the {what} was closed.")
        if training is not None:
            training.forget(f"Cancelled: the {what} was closed; {RESUME_NOTE}")

    # ------------------------------------------------------------------ result maps
    def onMapSelected(self, mapNode) -> None:
        if mapNode is not None:
            self.logic.showMap(mapNode)
            wasBlocked = self.ui.mapOpacitySlider.blockSignals(True)
            self.ui.mapOpacitySlider.value = self.logic.mapStyle(mapNode).opacity
            self.ui.mapOpacitySlider.blockSignals(wasBlocked)

    def onMapOpacityChanged(self, opacity: float) -> None:
        mapNode = self.ui.mapSelector.currentNode()
        if mapNode is not None:
            self.logic.showMap(mapNode, opacity=opacity)
