"""One engine run in the background, and the logic base class every AtlasSeg module builds on.

A module's logic writes its inputs into a work folder and builds the engine command (:class:`PreparedRun`);
:class:`EngineLogic` starts it as an :class:`~AtlasSegLib.engine.EngineProcess` and :class:`EngineRun` lets a
GUI timer poll progress, cancel, and finally load the outputs as nodes. The work folder is removed when the run
ends unless the caller gave it.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .engine import EngineCancelled, EngineError, EngineProcess, ProgressEvent, pythonExecutable, readableEngineError
from .results import MapStyle, mapStyle, showMap

ProcessFactory = Callable[[list, dict], EngineProcess]
ProgressCallback = Callable[[float, str], None]


@dataclass
class PreparedRun:
    """An engine command ready to start: inputs written into ``workDir``, outputs expected in ``outputDir``."""

    command: list[str]
    environment: dict[str, str]
    workDir: Path
    outputDir: Path
    labels: dict[int, str]
    colors: dict[int, tuple[float, float, float]] = field(default_factory=dict)


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
        self.process.cancel()
        self._cleanUp()

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
    """What every module's Qt-free logic shares: the scene, the engine interpreter and process, map display.

    ``processFactory(command, env)`` starts the engine and returns an object with ``progressEvents()``,
    ``returnCode()``, ``cancel()``, ``stderrLines`` and ``cancelled`` (default: :class:`EngineProcess`);
    ``python`` is the interpreter that runs the engine (default: PythonSlicer inside Slicer).
    """

    def __init__(self, scene, python: str | None = None, processFactory: ProcessFactory | None = None):
        self.scene = scene
        self.python = python or pythonExecutable()
        self.processFactory = processFactory or (lambda command, env: EngineProcess(command, env))

    def startPrepared(self, prepare: Callable[[Path], PreparedRun], workDir: str | Path | None = None
                      ) -> tuple[PreparedRun, object, bool]:
        """Prepare in ``workDir`` (default: a new temporary folder, removed on failure) and start the engine.

        Returns the prepared run, the process and whether the work folder is ours to remove.
        """
        ownsWorkDir = workDir is None
        work = Path(tempfile.mkdtemp(prefix="AtlasSeg-")) if ownsWorkDir else Path(workDir)
        try:
            prepared = prepare(work)
            return prepared, self.processFactory(prepared.command, prepared.environment), ownsWorkDir
        except BaseException:
            if ownsWorkDir:
                shutil.rmtree(work, ignore_errors=True)
            raise

    @staticmethod
    def mapStyle(mapNode) -> MapStyle:
        return mapStyle(mapNode)

    def showMap(self, mapNode, targetNode=None, opacity: float | None = None) -> None:
        """Show a result map as a coloured foreground over its target in every slice view."""
        showMap(self.scene, mapNode, targetNode, opacity)
