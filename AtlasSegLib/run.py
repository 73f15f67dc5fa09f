"""One engine run in the background, and the logic base class every AtlasSeg module builds on.

A module's logic writes its inputs into a work folder and builds the engine command (:class:`PreparedRun`);
:class:`EngineLogic` starts it as an :class:`~AtlasSegLib.engine.EngineProcess` and :class:`EngineRun` lets a
GUI timer poll progress and log lines, cancel (without blocking the GUI), and finally load the outputs as nodes.
The work folder is removed when the run ends unless the caller gave it. The logic keeps the runs it started, so
closing the scene or the module cancels them (:meth:`EngineLogic.cancelActiveRuns`).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .engine import (
    CANCEL_GRACE_SECONDS,
    EngineCancelled,
    EngineError,
    EngineProcess,
    EngineSequence,
    ProgressEvent,
    pythonExecutable,
    readableEngineError,
)
from .results import MapStyle, mapStyle, showIn3D, showMap

ProcessFactory = Callable[[list, dict], EngineProcess]
ProgressCallback = Callable[[float, str], None]


@dataclass
class PreparedRun:
    """An engine command ready to start: inputs written into ``workDir``, outputs expected in ``outputDir``.

    ``steps``: a run of several engine commands, ``(message, command)`` pairs run one after another as one
    :class:`~AtlasSegLib.engine.EngineSequence` (``command`` is then the first one's)."""

    command: list[str]
    environment: dict[str, str]
    workDir: Path
    outputDir: Path
    labels: dict[int, str]
    colors: dict[int, tuple[float, float, float]] = field(default_factory=dict)
    steps: list[tuple[str, list[str]]] = field(default_factory=list)


class EngineRun:
    """One engine run in the background: poll for progress, cancel, then load the results with ``load()``."""

    def __init__(self, prepared: PreparedRun, process, ownsWorkDir: bool, load: Callable[[], object]):
        self.prepared = prepared
        self.process = process
        self.ownsWorkDir = ownsWorkDir
        self._load = load
        self.lastProgress = ProgressEvent(0.0, "starting the engine")

    def isRunning(self) -> bool:
        return self.process.returnCode() is None

    def poll(self) -> list[ProgressEvent]:
        events = self.process.progressEvents()
        if events:
            self.lastProgress = events[-1]
        return events

    def cancel(self) -> None:
        """Stop the engine and wait until it is gone (up to the grace period); console and tests."""
        self.process.cancel()
        self._cleanUp()

    def requestCancel(self, grace: float = CANCEL_GRACE_SECONDS) -> None:
        """Stop the engine without waiting (GUI): it is terminated now and killed after ``grace`` seconds if it
        still runs; the work folder goes once it has stopped. Keep polling: ``isRunning()`` turns False and
        ``finish()`` raises EngineCancelled."""
        self.process.requestCancel(grace, onStopped=self._cleanUpIfCancelled)

    def isCancelling(self) -> bool:
        return self.process.isCancelling()

    def newLogLines(self) -> list[str]:
        """The engine's output lines since the last call (never blocks)."""
        return self.process.newLogLines()

    def finish(self):
        """After the process ended: the loaded results, or EngineError / EngineCancelled with a readable message."""
        code = self.process.returnCode()
        try:
            if code is None:
                raise EngineError("the engine is still running")
            if self.process.cancelled:
                raise EngineCancelled("cancelled")
            if code != 0:
                raise EngineError(readableEngineError(code, list(self.process.stderrLines)))
            return self._load()
        finally:
            if code is not None:
                self._cleanUp()

    @property
    def log(self) -> str:
        return "\n".join(list(self.process.stderrLines))

    def _cleanUp(self) -> None:
        if self.ownsWorkDir:
            shutil.rmtree(self.prepared.workDir, ignore_errors=True)

    def _cleanUpIfCancelled(self) -> None:
        """After a requested cancel; a run that had already ended keeps its outputs for finish()."""
        if self.process.cancelled:
            self._cleanUp()


class SegmentationRun(EngineRun):
    """One run of a module's segmentation in the background: poll for progress, cancel, then ``finish()`` loads the
    outputs with the logic's ``loadResults(outputDir, inputs, settings, colors)``."""

    def __init__(self, logic, inputs, settings, prepared: PreparedRun, process, ownsWorkDir: bool):
        super().__init__(prepared, process, ownsWorkDir, lambda: logic.loadResults(
            prepared.outputDir, inputs, settings, prepared.colors))
        self.logic, self.inputs, self.settings = logic, inputs, settings


def _removeIfCancelled(process, work: Path | None) -> Callable[[], None] | None:
    if work is None:
        return None
    return lambda: shutil.rmtree(work, ignore_errors=True) if process.cancelled else None


def waitForRun(run: EngineRun, onProgress: ProgressCallback | None = None, pollSeconds: float = 0.1):
    """Poll a run until it ends and load its results (Python console, tests): the GUI's timer, as a loop."""
    while run.isRunning():
        time.sleep(pollSeconds)
        _report(run.poll(), onProgress)
    _report(run.poll(), onProgress)
    return run.finish()


def _report(events: list[ProgressEvent], onProgress: ProgressCallback | None) -> None:
    if onProgress:
        for event in events:
            onProgress(event.fraction, event.message)


class EngineLogic:
    """What every module's Qt-free logic shares: the scene, the engine interpreter and process, starting a run of
    the module's ``prepareRun`` (``startRun``, ``runBlocking``), map display.

    ``processFactory(command, env)`` starts the engine and returns an object with ``progressEvents()``,
    ``newLogLines()``, ``returnCode()``, ``cancel()``, ``requestCancel()``, ``isCancelling()``, ``stderrLines``
    and ``cancelled`` (default: :class:`EngineProcess`);
    ``python`` is the interpreter that runs the engine (default: PythonSlicer inside Slicer). ``scene`` may be
    given later: Slicer's ScriptedLoadableModuleLogic calls the next ``__init__`` without arguments.
    """

    runClass: type[SegmentationRun] = SegmentationRun   # what startRun returns (a module's own subclass)

    def __init__(self, scene=None, python: str | None = None, processFactory: ProcessFactory | None = None):
        self.scene = scene
        self.python = python or pythonExecutable()
        self.processFactory = processFactory or (lambda command, env: EngineProcess(command, env))
        self._started: list[tuple[object, Path | None]] = []   # (process, work folder to remove or None)

    def startPrepared(self, prepare: Callable[[Path], PreparedRun], workDir: str | Path | None = None
                      ) -> tuple[PreparedRun, object, bool]:
        """Prepare in ``workDir`` (default: a new temporary folder, removed on failure) and start the engine.

        Returns the prepared run, the process and whether the work folder is ours to remove.
        """
        ownsWorkDir = workDir is None
        work = Path(tempfile.mkdtemp(prefix="AtlasSeg-")) if ownsWorkDir else Path(workDir)
        try:
            prepared = prepare(work)
            if prepared.steps:   # several commands: each started by the process factory, one after another
                process = EngineSequence(prepared.steps, prepared.environment, self.processFactory)
            else:
                process = self.processFactory(prepared.command, prepared.environment)
        except BaseException:
            if ownsWorkDir:
                shutil.rmtree(work, ignore_errors=True)
            raise
        self._started = [entry for entry in self._started if entry[0].returnCode() is None]
        self._started.append((process, work if ownsWorkDir else None))
        return prepared, process, ownsWorkDir

    def startRun(self, inputs, settings, workDir: str | Path | None = None) -> SegmentationRun:
        """Write the inputs (the module's ``prepareRun(inputs, settings, workDir)``) and start the engine in the
        background; poll the returned run (the module's ``runClass``)."""
        prepared, process, ownsWorkDir = self.startPrepared(lambda work: self.prepareRun(inputs, settings, work),
                                                            workDir)
        return self.runClass(self, inputs, settings, prepared, process, ownsWorkDir)

    def runBlocking(self, inputs, settings, onProgress: ProgressCallback | None = None,
                    workDir: str | Path | None = None, pollSeconds: float = 0.1):
        """Run and wait (Python console, tests): same work as the GUI's background run."""
        return waitForRun(self.startRun(inputs, settings, workDir), onProgress, pollSeconds)

    def activeProcesses(self) -> list:
        """Engine processes this logic started that have not ended yet."""
        return [process for process, _ in self._started if process.returnCode() is None]

    def cancelActiveRuns(self, grace: float = CANCEL_GRACE_SECONDS) -> int:
        """Cancel every run this logic started that is still going, without waiting (scene closed, module
        cleaned up): terminated now, killed after ``grace`` seconds, work folders removed once stopped.
        Returns how many were cancelled."""
        cancelled = 0
        for process, work in self._started:
            if process.returnCode() is None:
                process.requestCancel(grace, onStopped=_removeIfCancelled(process, work))
                cancelled += 1
        return cancelled

    def onSceneStartClose(self, caller=None, event=None) -> None:
        """The scene is about to close: its nodes (targets, outputs) go, so running engines are cancelled. The
        widget calls this from its StartCloseEvent observer; it can also be an observer itself."""
        self.cancelActiveRuns()

    @staticmethod
    def mapStyle(mapNode) -> MapStyle:
        return mapStyle(mapNode)

    def showMap(self, mapNode, targetNode=None, opacity: float | None = None) -> None:
        """Show a result map as a coloured foreground over its target in every slice view."""
        showMap(self.scene, mapNode, targetNode, opacity)

    @staticmethod
    def showIn3D(segmentationNode, show: bool = True) -> bool:
        """Show a result segmentation in 3D (its closed-surface representation), or hide it there."""
        return showIn3D(segmentationNode, show)


def runSeconds(run: dict) -> float:
    """Wall time of an engine run from its ``run.json``: the engine's ``total`` (the stages also include it, so
    summing them would count it twice); older records without ``total``: the sum of their stages."""
    timings = run.get("timings_s", {}) or {}
    if "total" in timings:
        return float(timings["total"])
    return float(sum(v for v in timings.values() if isinstance(v, (int, float))))
