"""Running the headless engine (``python -m atlasseg ...``) in a background process, for every AtlasSeg module.

The process is started in its own process group so that Cancel stops it and anything it spawned; its
``PROGRESS <fraction> <message>`` lines (``ATLASSEG_PROGRESS=lines``) are read by threads and handed to the
caller through :meth:`EngineProcess.progressEvents`, so a GUI can poll from a timer without blocking.
"""

from __future__ import annotations

import collections
import importlib.util
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ENGINE_PACKAGE = "atlasseg"

# Engine runtime dependencies: torch from the PyTorch extension (this range), the rest from requirements.txt
# (Resources/requirements.txt in the source tree, installed beside this library). SimpleITK, numpy and vtk are
# Slicer's own and never installed.
TORCH_REQUIREMENT = "torch>=2.8"
REQUIREMENTS_FILE = "requirements.txt"
STDERR_LINES_KEPT = 400
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


def readableEngineError(returnCode: int, stderrLines: Sequence[str]) -> str:
    """One readable sentence for a failed run, from the exit code and the engine's stderr."""
    lines = [line.strip() for line in stderrLines if line.strip()]
    for line in reversed(lines):  # the CLI's own one-line reason: "atlasseg segment: error: ..."
        if line.startswith(f"{ENGINE_PACKAGE} ") and ": error: " in line:
            return line.split(": error: ", 1)[1]
    if returnCode < 0:
        return (f"the engine process was stopped by signal {-returnCode}; the computer may have run out of "
                "memory (try fewer atlases or the CPU device)")
    last = lines[-1] if lines else f"exit code {returnCode}"
    if "out of memory" in last.lower():
        return f"the GPU ran out of memory ({last}); choose Device: CPU or fewer atlases"
    if last.startswith("ModuleNotFoundError"):
        return f"a dependency of the engine is missing ({last}); open the module again to install it"
    return f"the engine stopped unexpectedly: {last} (full log in the Python console)"


class EngineProcess:
    """A running engine command: non-blocking progress, cancel of the whole process tree, captured stderr."""

    def __init__(self, command: Sequence[str], env: dict[str, str] | None = None, cwd: str | None = None):
        self.command = list(command)
        self._events: queue.Queue[ProgressEvent] = queue.Queue()
        self.stdoutLines: collections.deque[str] = collections.deque(maxlen=STDERR_LINES_KEPT)
        self.stderrLines: collections.deque[str] = collections.deque(maxlen=STDERR_LINES_KEPT)
        self.cancelled = False
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
            event = parseProgressLine(line)
            if event is not None:
                self._events.put(event)
            else:
                self.stdoutLines.append(line.rstrip("\n"))

    def _readStderr(self) -> None:
        for line in self._process.stderr:
            self.stderrLines.append(line.rstrip("\n"))

    def progressEvents(self) -> list[ProgressEvent]:
        """Progress reported since the last call (never blocks)."""
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

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

    def cancel(self, grace: float = 5.0) -> None:
        """Stop the process and its children: terminate, then kill after ``grace`` seconds."""
        if self._process.poll() is not None:
            return
        self.cancelled = True
        _terminateTree(self._process, force=False)
        try:
            self._process.wait(grace)
        except subprocess.TimeoutExpired:
            _terminateTree(self._process, force=True)
            self._process.wait()
        self.returnCode()


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
