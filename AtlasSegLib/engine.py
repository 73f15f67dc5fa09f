"""Running the headless engine (``python -m atlasseg ...``) in a background process, for every AtlasSeg module.

The process is started in its own process group so that Cancel stops it and anything it spawned; its
``PROGRESS <fraction> <message>`` lines (``ATLASSEG_PROGRESS=lines``) are read by threads and handed to the
caller through :meth:`EngineProcess.progressEvents`, and every output line through
:meth:`EngineProcess.newLogLines`, so a GUI can poll from a timer without blocking. Cancel has a blocking form
(:meth:`EngineProcess.cancel`, console and tests) and one for GUIs (:meth:`EngineProcess.requestCancel`) that
returns at once and leaves the kill after the grace period to a watchdog thread.
"""

from __future__ import annotations

import collections
import importlib.util
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

ENGINE_PACKAGE = "atlasseg"

# Engine runtime dependencies: torch from the PyTorch extension (this range), the rest from requirements.txt
# (Resources/requirements.txt in the source tree, installed beside this library). SimpleITK, numpy and vtk are
# Slicer's own and never installed.
TORCH_REQUIREMENT = "torch>=2.8"
REQUIREMENTS_FILE = "requirements.txt"
STDERR_LINES_KEPT = 400
LOG_LINES_KEPT = 5000         # lines waiting for newLogLines(); the oldest go first when nobody reads them
CANCEL_GRACE_SECONDS = 5.0    # after terminate, the engine gets this long to stop before it is killed
DEVICES = {"auto": "auto", "cpu": "cpu", "gpu": "cuda"}   # a panel's device choice -> the engine's --device


class EngineError(RuntimeError):
    """The engine failed; the message is meant for the user (no traceback)."""


class EngineCancelled(RuntimeError):
    """The run was cancelled by the user."""


@dataclass(frozen=True)
class ProgressEvent:
    fraction: float
    message: str


def findEngineRoot(start: Path | None = None) -> Path:
    """The folder that contains the ``atlasseg`` package: the folder above this library's.

    That one rule covers both layouts, because the library and the engine always sit side by side: installed,
    both are beside the modules (``qt-scripted-modules/AtlasSegLib``, ``qt-scripted-modules/atlasseg``); in a
    source checkout, both are at the repository root. ``start``: a file inside the library (tests).
    """
    root = (start or Path(__file__)).resolve().parents[1]
    if (root / ENGINE_PACKAGE / "__init__.py").is_file():
        return root
    raise EngineError(f"the engine package '{ENGINE_PACKAGE}' was not found in {root}; reinstall the extension")


def engineRegistry():
    """The engine's method registry module (``atlasseg/methods.py``), loaded from its file: it imports nothing
    heavy, so the panel's method, backend and preset lists come from the engine without torch in Slicer."""
    name = "atlasseg_method_registry"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, findEngineRoot() / ENGINE_PACKAGE / "methods.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module          # dataclasses resolve their module through sys.modules
        spec.loader.exec_module(module)
    return sys.modules[name]


def engineModule(name: str):
    """A torch-free module of the engine (``atlasseg.sampledata``, ``atlasseg.imagecheck``), imported from the
    engine beside this library: its rules are used as they are, never copied."""
    root = str(findEngineRoot())
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module(name)


def pythonExecutable() -> str:
    """Slicer's ``PythonSlicer`` when running inside Slicer, else this interpreter."""
    found = shutil.which("PythonSlicer")
    if found:
        return found
    beside = Path(sys.executable).with_name("PythonSlicer" + (".exe" if os.name == "nt" else ""))
    return str(beside) if beside.is_file() else sys.executable


def requirementsPath() -> Path:
    """The engine's pip requirements: beside this library when installed, ``Resources/`` in a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / REQUIREMENTS_FILE, here.parent / "Resources" / REQUIREMENTS_FILE):
        if candidate.is_file():
            return candidate
    raise EngineError(f"{REQUIREMENTS_FILE} was not found beside {here}; reinstall the extension")


def engineRequirements() -> list[str]:
    """The requirement lines of :func:`requirementsPath` (comments and blanks dropped)."""
    lines = (line.split("#", 1)[0].strip() for line in requirementsPath().read_text().splitlines())
    return [line for line in lines if line]


def unmetRequirements(requirements: Sequence[str]) -> list[str]:
    """Requirements this Python does not satisfy, each with what is installed: ``monai>=1.6,<1.7 (installed
    1.4.0)`` or ``(not installed)``. Versions are checked, not just presence."""
    from importlib import metadata

    try:
        from packaging.requirements import Requirement
    except ImportError:     # every Python with pip has it vendored
        from pip._vendor.packaging.requirements import Requirement

    unmet = []
    for text in requirements:
        requirement = Requirement(text)
        try:
            version = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            unmet.append(f"{text} (not installed)")
            continue
        if not requirement.specifier.contains(version, prereleases=True):
            unmet.append(f"{text} (installed {version})")
    return unmet


def missingPipDependencies() -> list[str]:
    """The engine's pip requirements (requirements.txt) that are missing or outside their version range."""
    return unmetRequirements(engineRequirements())


def torchIsInstalled() -> bool:
    return importlib.util.find_spec("torch") is not None


def engineEnvironment(engineRoot: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["ATLASSEG_PROGRESS"] = "lines"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(engineRoot)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def parseProgressLine(line: str) -> ProgressEvent | None:
    """``PROGRESS 0.4250 registration 3/10`` -> ProgressEvent(0.425, 'registration 3/10')."""
    parts = line.strip().split(" ", 2)
    if len(parts) < 2 or parts[0] != "PROGRESS":
        return None
    try:
        fraction = float(parts[1])
    except ValueError:
        return None
    return ProgressEvent(min(max(fraction, 0.0), 1.0), parts[2] if len(parts) > 2 else "")


def progressLogLine(event: ProgressEvent) -> str:
    """How a progress report appears among the log lines (:meth:`EngineProcess.newLogLines`): ``[ 42%] message``."""
    return f"[{event.fraction:4.0%}] {event.message}"


def parseProgressLogLine(line: str) -> ProgressEvent | None:
    """``[ 42%] registration 3/10`` (a log line of :func:`progressLogLine`) -> ProgressEvent(0.42, ...); None for
    other lines. Log lines keep progress in order with the engine's other output (whole percents)."""
    match = _PROGRESS_LOG.match(line)
    if match is None:
        return None
    return ProgressEvent(min(max(int(match.group(1)) / 100.0, 0.0), 1.0), match.group(2))


_PROGRESS_LOG = re.compile(r"^\[\s*(\d+)%\] (.*)$")


def readableEngineError(returnCode: int, stderrLines: Sequence[str]) -> str:
    """One readable sentence for a failed run, from the exit code and the engine's stderr.

    The CLI's own one-line reason wins; otherwise the tail of the log is searched, not just its last line, since
    torch follows a CUDA error with hint lines ("CUDA kernel errors might be asynchronously reported ...") and warns
    about an unsupported GPU long before it fails.
    """
    lines = [line.strip() for line in stderrLines if line.strip()]
    for line in reversed(lines):  # the CLI's own one-line reason: "atlasseg segment: error: ..."
        if line.startswith(f"{ENGINE_PACKAGE} ") and ": error: " in line:
            return line.split(": error: ", 1)[1]
    if returnCode < 0:
        return (f"the engine process was stopped by signal {-returnCode}; the computer may have run out of "
                "memory (try fewer atlases or the CPU device)")
    reason = _exceptionLine(lines) or (lines[-1] if lines else f"exit code {returnCode}")
    tail = " ".join(lines[-40:]).lower()
    if "out of memory" in tail:
        return (f"the GPU ran out of memory ({reason}); choose Device: CPU, fewer atlases, or train with smaller "
                "patches")
    if "no kernel image is available" in tail or (
            "not compatible with the current pytorch" in tail and "cuda" in reason.lower()):
        return ("the installed torch build does not support this GPU (no kernel image for it); choose Device: CPU, "
                "or install a torch build for this GPU in the PyTorch Utils module and restart Slicer")
    lower = reason.lower()
    if "cuda" in lower and ("error" in lower or "driver" in lower):
        return f"the GPU failed ({reason}); choose Device: CPU (a GPU driver update may fix it)"
    if reason.startswith("ModuleNotFoundError"):
        return f"a dependency of the engine is missing ({reason}); open the module again to install it"
    return f"the engine stopped unexpectedly: {reason} (full log in the Python console)"


def _exceptionLine(lines: Sequence[str]) -> str | None:
    """The last ``SomeError: message`` line of a traceback (the exception itself, not torch's hints after it)."""
    for line in reversed(lines[-40:]):
        head = line.split(":", 1)[0]
        if ":" in line and " " not in head and (head.endswith("Error") or head.endswith("Exception")):
            return line
    return None


class EngineProcess:
    """A running engine command: non-blocking progress and log, cancel of the whole process tree, captured stderr."""

    def __init__(self, command: Sequence[str], env: dict[str, str] | None = None, cwd: str | None = None):
        self.command = list(command)
        self._events: queue.Queue[ProgressEvent] = queue.Queue()
        self.stdoutLines: collections.deque[str] = collections.deque(maxlen=STDERR_LINES_KEPT)
        self.stderrLines: collections.deque[str] = collections.deque(maxlen=STDERR_LINES_KEPT)
        self._log: collections.deque[str] = collections.deque(maxlen=LOG_LINES_KEPT)
        self._logLock = threading.Lock()
        self.cancelled = False
        self._watchdog: threading.Thread | None = None
        self._onStopped: list[Callable[[], None]] = []
        self._stoppedLock = threading.RLock()   # an onStopped callback may request a cancel again
        self._process = subprocess.Popen(
            self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
            cwd=cwd, text=True, encoding="utf-8", errors="replace", bufsize=1, **_processGroupArguments())
        self._readers = [threading.Thread(target=self._readStdout, daemon=True),
                         threading.Thread(target=self._readStderr, daemon=True)]
        for reader in self._readers:
            reader.start()

    @property
    def pid(self) -> int:
        return self._process.pid

    def _readStdout(self) -> None:
        for line in self._process.stdout:
            line = line.rstrip("\n")
            event = parseProgressLine(line)
            if event is not None:
                self._events.put(event)
                self._appendLog(progressLogLine(event))
            else:
                self.stdoutLines.append(line)
                self._appendLog(line)

    def _readStderr(self) -> None:
        for line in self._process.stderr:
            line = line.rstrip("\n")
            self.stderrLines.append(line)
            self._appendLog(line)

    def _appendLog(self, line: str) -> None:
        with self._logLock:
            self._log.append(line)

    def progressEvents(self) -> list[ProgressEvent]:
        """Progress reported since the last call (never blocks)."""
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    def newLogLines(self) -> list[str]:
        """The engine's output lines (stdout and stderr, in arrival order; progress as ``[ 42%] message``) since
        the last call (never blocks). At most LOG_LINES_KEPT lines wait; older ones are dropped."""
        with self._logLock:
            lines = list(self._log)
            self._log.clear()
        return lines

    def returnCode(self) -> int | None:
        """None while running; once finished, also waits for the output readers to drain."""
        code = self._process.poll()
        if code is not None:
            for reader in self._readers:
                reader.join(timeout=5)
        return code

    def wait(self, timeout: float | None = None) -> int:
        self._process.wait(timeout)
        return self.returnCode()

    def requestCancel(self, grace: float = CANCEL_GRACE_SECONDS, onStopped: Callable[[], None] | None = None
                      ) -> None:
        """Stop the process and its children without waiting: terminate now; a watchdog thread kills them if they
        still run after ``grace`` seconds, then calls ``onStopped`` (also at once when the process has already
        ended). Safe to call again: later calls only add their ``onStopped``."""
        with self._stoppedLock:
            if onStopped is not None:
                self._onStopped.append(onStopped)
            if self._watchdog is not None:      # already cancelling (or cancelled)
                if not self._watchdog.is_alive():
                    self._runStoppedCallbacks()
                return
            if self._process.poll() is None:
                self.cancelled = True
                _terminateTree(self._process, force=False)
            self._watchdog = threading.Thread(target=self._killAfter, args=(grace,), daemon=True)
            self._watchdog.start()

    def _killAfter(self, grace: float) -> None:
        try:
            self._process.wait(grace)
        except subprocess.TimeoutExpired:
            _terminateTree(self._process, force=True)
            self._process.wait()
        with self._stoppedLock:
            self._runStoppedCallbacks()

    def _runStoppedCallbacks(self) -> None:
        callbacks, self._onStopped = self._onStopped, []
        for callback in callbacks:
            try:
                callback()
            except Exception:   # a clean-up failure must not end the watchdog before the others ran
                pass

    def isCancelling(self) -> bool:
        """Cancel was requested and the process has not ended yet."""
        return self.cancelled and self._process.poll() is None

    def cancel(self, grace: float = CANCEL_GRACE_SECONDS) -> None:
        """Stop the process and its children and wait until they are gone: terminate, then kill after ``grace``
        seconds (blocks up to ``grace``; a GUI uses :meth:`requestCancel`)."""
        if self._process.poll() is not None and self._watchdog is None:
            return
        self.requestCancel(grace)
        self._watchdog.join()
        self.returnCode()


class EngineSequence:
    """Engine commands run one after another as one process to poll and cancel (the interface of
    :class:`EngineProcess`): ``steps`` are ``(message, command)`` pairs; the next starts once the previous has ended
    well (checked whenever the sequence is polled), a failure or a cancel ends the sequence. Progress is spread
    evenly over the steps, each announced by its message; ``start(command, env)`` starts one step (default:
    :class:`EngineProcess`)."""

    def __init__(self, steps: Sequence[tuple[str, Sequence[str]]], env: dict[str, str] | None = None,
                 start: Callable[[list, dict], EngineProcess] | None = None):
        if not steps:
            raise ValueError("an engine sequence needs at least one command")
        self.steps = [(message, list(command)) for message, command in steps]
        self.env = env
        self._start = start or (lambda command, environment: EngineProcess(command, environment))
        self._lock = threading.RLock()
        self._events: list[ProgressEvent] = []
        self._log: list[str] = []
        self._index = -1
        self.current = None
        self.cancelled = False
        self._startNext()

    @property
    def command(self) -> list[str]:
        return self.steps[max(self._index, 0)][1]

    @property
    def stderrLines(self):
        return self.current.stderrLines

    def _startNext(self) -> None:
        """Start the next step, its announcement queued as progress and log line."""
        self._index += 1
        message, command = self.steps[self._index]
        if self._index:
            self._log.append(f"$ {' '.join(command)}")
        event = ProgressEvent(self._index / len(self.steps), message)
        self._events.append(event)
        self._log.append(progressLogLine(event))
        self.current = self._start(command, self.env)

    def _drain(self) -> None:
        """Move what the current step reported into the sequence's queues (its progress scaled to the step)."""
        n = len(self.steps)
        for event in self.current.progressEvents():
            self._events.append(ProgressEvent((self._index + event.fraction) / n, event.message))
        self._log += self.current.newLogLines()

    def returnCode(self) -> int | None:
        """None while a step runs or the next is about to start; else the last step's exit code."""
        with self._lock:
            code = self.current.returnCode()
            if code is None or code != 0 or self.cancelled or self._index + 1 == len(self.steps):
                return code
            self._drain()
            self._startNext()
            return None

    def progressEvents(self) -> list[ProgressEvent]:
        with self._lock:
            self.returnCode()
            self._drain()
            events, self._events = self._events, []
            return events

    def newLogLines(self) -> list[str]:
        with self._lock:
            self._drain()
            lines, self._log = self._log, []
            return lines

    def wait(self, timeout: float | None = None) -> int:
        while True:
            self.current.wait(timeout)
            code = self.returnCode()
            if code is not None:
                return code

    def requestCancel(self, grace: float = CANCEL_GRACE_SECONDS, onStopped: Callable[[], None] | None = None
                      ) -> None:
        """Stop the running step without waiting (see :meth:`EngineProcess.requestCancel`); no further step
        starts."""
        with self._lock:
            if self.current.returnCode() is None or self._index + 1 < len(self.steps):
                self.cancelled = True
            self.current.requestCancel(grace, onStopped)

    def isCancelling(self) -> bool:
        return self.cancelled and self.current.returnCode() is None

    def cancel(self, grace: float = CANCEL_GRACE_SECONDS) -> None:
        """Stop the running step and wait until it is gone; no further step starts."""
        with self._lock:
            if self.current.returnCode() is None or self._index + 1 < len(self.steps):
                self.cancelled = True
        self.current.cancel(grace)


def _processGroupArguments() -> dict:
    if os.name == "nt":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


def _terminateTree(process: subprocess.Popen, force: bool) -> None:
    if os.name == "nt":  # taskkill /T ends the children too
        subprocess.run(["taskkill", "/T"] + (["/F"] if force else []) + ["/PID", str(process.pid)],
                       capture_output=True, check=False)
        if force:
            process.kill()
        return
    try:
        os.killpg(process.pid, signal.SIGKILL if force else signal.SIGTERM)
    except ProcessLookupError:
        pass
