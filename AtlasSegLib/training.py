"""Training a method's model from a module panel: ``python -m atlasseg train`` in the background, with a live
table and plot of the training, cancel, and resume.

:class:`TrainingLogic` (a base of every module logic that offers training) checks the settings before any process
starts (:meth:`TrainingLogic.trainingProblems`: one sentence per problem), builds the engine command and starts it
as an :class:`~AtlasSegLib.engine.EngineProcess`. The :class:`TrainingRun` it returns is polled like any
:class:`~AtlasSegLib.run.EngineRun`; each poll also re-reads the engine's ``training_log.csv`` (AtlasNet: one per
network, ``networks/<k>_<atlas>/training_log.csv``), which the engine rewrites atomically after every epoch, into a
``vtkMRMLTableNode`` (epoch, training loss, validation Dice) shown by a ``vtkMRMLPlotChartNode`` with two
``vtkMRMLPlotSeriesNode`` (:class:`TrainingCurves`). Cancel stops the engine at once; the engine's checkpoint of the
last finished epoch stays in the model folder, and a run with ``resume=True`` (``--resume``) continues from it, its
table continuing the epochs already there.

The model folder also gets ``slicer_training.json`` (:data:`TRAINING_RECORD`): the method, size and atlas folder
the panel started the run with, so that a resume uses the same ones (the engine refuses other settings) and the
panel can show them when the folder is chosen again.

Qt-free: runs in Slicer and, for tests, on a ``slicer-core`` scene.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from .engine import (
    DEVICES,
    EngineError,
    ProgressEvent,
    engineEnvironment,
    engineRegistry,
    findEngineRoot,
    parseProgressLogLine,
)
from .results import createFolder, placeInFolder
from .run import EngineLogic, EngineRun, PreparedRun, ProgressCallback, waitForRun

# file names the engine writes into a model folder (atlasseg.training.trainer, atlasseg.model_io, atlasseg.atlasnet)
CONFIG = "config.json"
CHECKPOINT = "checkpoint.pt"
LOG = "training_log.csv"
NETWORKS = "networks"               # AtlasNet: networks/<k>_<atlas id>/, one segmenter training each
CACHE = "registration_cache"
MODEL_FORMAT = "atlasseg-model"
LEGACY_FORMAT = "atlasseg-dlf-model"   # format 1: DLF or plain U-Net folders written before the method registry
TRAINING_RECORD = "slicer_training.json"
RECORD_FORMAT = "atlasseg-slicer-training"

# the columns of the training table; the plot draws the second and third against the first
EPOCH, LOSS, DICE = "epoch", "training loss", "validation Dice"
NETWORK, NETWORK_EPOCH = "network", "network epoch"     # AtlasNet only
SEGMENTATION_LOSS, REGISTRATION_DICE = "F_S loss", "F_R validation Dice"   # DeepAtlas only
# training_log.csv columns of each table column: the first the log has. DeepAtlas logs by step, its training loss is
# F_R's (registration) and its validation Dice F_S's (segmentation); the other two get columns of their own.
LOG_COLUMNS = {EPOCH: ("epoch", "step"), LOSS: ("train_loss", "registration_loss"),
               DICE: ("val_dice", "val_dice_segmentation")}
METHOD_LOG_COLUMNS = {"atlasnet": (NETWORK, NETWORK_EPOCH),
                      "deepatlas": ((SEGMENTATION_LOSS, "segmentation_loss"), (REGISTRATION_DICE,
                                                                               "val_dice_registration"))}
LOSS_COLOR = (0.86, 0.12, 0.12)      # as the engine's training_curves.png: loss red, validation Dice blue
DICE_COLOR = (0.12, 0.31, 0.86)
_NETWORK_LINE = re.compile(r"^AtlasNet network (\d+)/(\d+)")
_STATUS_LINE = re.compile(r"^(registration cache |atlases by |resuming |AtlasNet network |epoch \d+/\d+: |"
                          r"step \d+ \(|"
                          r"model: |.*already trained)")


@dataclass(frozen=True)
class TrainingSize:
    """A named model size: engine flags per method (a method not listed trains with the engine's defaults) and
    what they mean, for the panel."""

    name: str
    label: str
    flags: dict[str, tuple[str, ...]]
    notes: dict[str, str]

    def flagsFor(self, method: str) -> list[str]:
        return list(self.flags.get(method, ()))

    def noteFor(self, method: str) -> str:
        return self.notes.get(method, "the engine's default sizes")


TRAINING_SIZES: dict[str, TrainingSize] = {size.name: size for size in (
    TrainingSize("small", "Small (CPU, quick)",
                 {"dlf": ("--vote-channels", "8", "16", "32", "--finetune-channels", "8", "16", "32", "64",
                          "--patch-size", "32", "32", "32"),
                  "atlasnet": ("--backbone-preset", "cpu", "--backbone-kwargs", '{"channels": [8, 16, 32]}',
                               "--patch-size", "32", "32", "32"),
                  "deepatlas": ("--registration-backbone-kwargs", '{"channels": [8, 16, 16, 16]}',
                                "--backbone-kwargs", '{"channels": [8, 16, 32]}', "--pretrain-registration-steps",
                                "300", "--pretrain-segmentation-steps", "150")},
                 {"dlf": "U-Nets of 8-16-32 (weighted voting) and 8-16-32-64 (fine-tuning) channels on 32x32x32 "
                         "patches: a first model quickly, on a CPU.",
                  "atlasnet": "U-Nets of 8-16-32 channels on 32x32x32 patches: a first model quickly, on a CPU.",
                  "deepatlas": "Registration network of 8-16-16-16 channels, segmentation U-Net of 8-16-32, each "
                               "pretrained for 300 / 150 steps: a first model quickly, on a CPU."}),
    TrainingSize("standard", "Standard (CPU)",
                 {"dlf": ("--vote-channels", "16", "32", "64", "--finetune-channels", "16", "32", "64", "128"),
                  "atlasnet": ("--backbone-preset", "cpu")},
                 {"dlf": "U-Nets of 16-32-64 and 16-32-64-128 channels on 48x48x48 patches: the size of the CPU "
                         "benchmarks.",
                  "atlasnet": "The U-Net's CPU size (16-32-64-128 channels) on 48x48x48 patches.",
                  "deepatlas": "VoxelMorph's registration network (16-32-32-32-32 channels) and the U-Net's CPU "
                               "size, pretrained for 1000 / 500 steps (the engine's defaults)."}),
    TrainingSize("large", "Large (GPU)",
                 {"dlf": (), "atlasnet": ("--backbone-preset", "paper"), "deepatlas": ("--backbone-preset", "paper")},
                 {"dlf": "U-Nets of 32-64-128 and 32-64-128-256 channels on 48x48x48 patches (the engine's defaults): "
                         "best trained on a GPU.",
                  "atlasnet": "The U-Net's published size (32-64-128-256-320 channels) on 48x48x48 patches: best "
                              "trained on a GPU.",
                  "deepatlas": "VoxelMorph's registration network and the U-Net's published size (32-64-128-256-320 "
                               "channels) as segmentation network: best trained on a GPU."}),
)}
DEFAULT_SIZE = "standard"
DEFAULT_EPOCHS = 20


@dataclass
class TrainingSettings:
    atlasFolder: str = ""            # the atlas set to train on (dataset.json, imagesTr, labelsTr)
    modelFolder: str = ""            # where the model is written: a new or empty folder, or a run to resume
    method: str = ""                 # a trainable method of the module ("": its first)
    size: str = DEFAULT_SIZE         # a key of TRAINING_SIZES
    epochs: int = DEFAULT_EPOCHS
    device: str = "auto"             # auto, cpu or gpu
    resume: bool = False             # continue the run in modelFolder from its last checkpoint (--resume)
    extraArguments: list[str] = field(default_factory=list)   # more engine flags, after the size's (console, tests)


@dataclass(frozen=True)
class ModelFolderState:
    """What a chosen model folder holds, read from its files alone (no torch).

    ``kind``: ``none`` (no folder chosen), ``file``, ``new`` (missing or empty), ``cache`` (only the registrations
    of a run stopped before its first epoch ended), ``run`` (a training run with a checkpoint: resumable),
    ``model`` (a model without a checkpoint: not resumable) or ``other`` (files that are no training run).
    """

    folder: Path | None
    kind: str
    method: str = ""                 # the method of the run or model ("" when not known)
    epochsDone: int = 0              # rows of its training log (AtlasNet: over all networks)
    finished: bool = False           # every planned epoch done (AtlasNet: the whole model written)
    record: dict = field(default_factory=dict)   # slicer_training.json, when the panel started the run

    @property
    def resumable(self) -> bool:
        return self.kind == "run"


@dataclass
class TrainingResult:
    modelFolder: Path
    method: str
    history: list[dict]              # the table's rows
    bestValidationDice: float        # AtlasNet: the mean over its networks (in atlas space)
    curves: TrainingCurves
    config: dict = field(default_factory=dict)   # the model's config.json

    @property
    def epochs(self) -> int:
        return len(self.history)


# ---------------------------------------------------------------------------------------------- model folders

def configMethod(config: dict) -> str:
    """The method of a model folder's config.json (format 1 folders: Deep Label Fusion or its plain U-Net, today's
    segmenter)."""
    if config.get("format") == LEGACY_FORMAT:
        architecture = config.get("architecture") if isinstance(config.get("architecture"), dict) else {}
        return "segmenter" if architecture.get("kind") == "unet" else "dlf"
    method = str(config.get("method", ""))
    return "segmenter" if method == "unet" else method


class UnusableModelFolder(EngineError):
    """A folder chosen as a trained model is not one the panel can use; the message says why and what to do."""


MODEL_VERSION = 2   # atlasseg.model_io.MODEL_VERSION


def methodModelDescription(method: str) -> str:
    """'a Deep Label Fusion model (open it in the DeepLabelFusion module)' and the like."""
    try:
        info = engineRegistry().get_method(method)
    except (EngineError, ValueError):
        return f"a '{method}' model"
    where = f" (open it in the {info.slicer_module} module)" if info.slicer_module else ""
    return f"a {info.label} model{where}"


def readMethodConfig(folder: str | Path | None, method: str, trainHint: str) -> tuple[Path, dict]:
    """A trained model folder of ``method`` and its ``config.json``, read without torch; every problem (no folder,
    not a model, another method's model, another format version) is UnusableModelFolder with one sentence.
    ``trainHint``: how to train one ("train one with: atlasseg train --method ..."). The engine checks the folder
    fully (weights, checksums) when it loads it."""
    try:
        title = engineRegistry().get_method(method).label
    except (EngineError, ValueError):
        title = method
    label = "an" if title[:1].lower() in "aeiou" else "a"
    text = str(folder or "").strip()
    if not text or text == ".":
        raise UnusableModelFolder(f"Choose a trained {title} model folder ({trainHint}).")
    path = Path(text)
    if not path.is_dir():
        raise UnusableModelFolder(f"The model folder {path} does not exist.")
    configPath = path / CONFIG
    if not configPath.is_file():
        raise UnusableModelFolder(f"{path} is not a model folder (no {CONFIG}); {trainHint}.")
    try:
        config = json.loads(configPath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UnusableModelFolder(f"{configPath}: unreadable ({error}).") from None
    if not isinstance(config, dict) or config.get("format") not in (MODEL_FORMAT, LEGACY_FORMAT):
        raise UnusableModelFolder(f"{configPath}: not an atlasseg model configuration.")
    found = configMethod(config)
    if found != method:
        raise UnusableModelFolder(f"{path} holds {methodModelDescription(found)}, not {label} {title} model.")
    if config.get("version") != MODEL_VERSION:
        raise UnusableModelFolder(f"{configPath}: {MODEL_FORMAT} version {config.get('version')} is not supported "
                                  f"(this engine reads version {MODEL_VERSION}).")
    return path, config


def _readJson(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _networkFolders(folder: Path) -> list[Path]:
    """AtlasNet's ``networks/<k>_<atlas id>`` folders in network order."""
    found = []
    for path in (folder / NETWORKS).glob("*_*") if (folder / NETWORKS).is_dir() else ():
        index = path.name.split("_", 1)[0]
        if path.is_dir() and index.isdigit():
            found.append((int(index), path))
    return [path for _, path in sorted(found)]


def _logFiles(folder: Path, method: str) -> list[Path]:
    """The training logs of a run, in order: AtlasNet one per network, every other method one."""
    if method == "atlasnet" or (not (folder / LOG).is_file() and (folder / NETWORKS).is_dir()):
        return [path / LOG for path in _networkFolders(folder)]
    return [folder / LOG]


def _number(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def _logValue(entry: dict, names: Sequence[str]) -> float:
    """The first of the log columns ``names`` that the log has, as a number (NaN when none)."""
    return _number(next((entry[name] for name in names if name in entry), None))


def readTrainingHistory(folder: str | Path, method: str = "") -> list[dict]:
    """The rows of the table: ``epoch``, ``training loss``, ``validation Dice`` (NaN where not validated), and for
    AtlasNet ``network`` and ``network epoch``, ``epoch`` then counting over the networks in training order;
    DeepAtlas: one row per logged step (see :data:`LOG_COLUMNS`), with ``F_S loss`` and ``F_R validation Dice``."""
    rows = []
    extra = [pair for pair in METHOD_LOG_COLUMNS.get(method, ()) if isinstance(pair, tuple)]
    for network, path in enumerate(_logFiles(Path(folder), method)):
        try:
            with open(path, newline="", encoding="utf-8") as handle:
                entries = list(csv.DictReader(handle))
        except (OSError, csv.Error, UnicodeDecodeError):
            continue
        for entry in entries:
            row = {column: _logValue(entry, names) for column, names in LOG_COLUMNS.items()}
            row.update({column: _number(entry.get(name)) for column, name in extra})
            if method == "atlasnet":
                row.update({EPOCH: float(len(rows) + 1), NETWORK: float(network + 1), NETWORK_EPOCH: row[EPOCH]})
            rows.append(row)
    return rows


def _logSignature(folder: Path, method: str) -> tuple:
    """Changes whenever a training log is written (the engine replaces them atomically after every epoch)."""
    signature = []
    for path in _logFiles(folder, method):
        try:
            stat = path.stat()
        except OSError:
            continue
        signature.append((str(path), stat.st_mtime_ns, stat.st_size))
    return tuple(signature)


def inspectModelFolder(folder: str | Path | None) -> ModelFolderState:
    """What ``folder`` holds (see :class:`ModelFolderState`)."""
    text = str(folder or "").strip()
    if not text or text == ".":
        return ModelFolderState(None, "none")
    path = Path(text)
    if not path.exists():
        return ModelFolderState(path, "new")
    if not path.is_dir():
        return ModelFolderState(path, "file")
    record = _readJson(path / TRAINING_RECORD)
    record = record if record.get("format") == RECORD_FORMAT else {}
    entries = {p.name for p in path.iterdir() if not p.name.startswith(".") and p.name != TRAINING_RECORD}
    if not entries:
        return ModelFolderState(path, "new", str(record.get("method", "")), record=record)
    config = _readJson(path / CONFIG)
    config = config if config.get("format") in (MODEL_FORMAT, LEGACY_FORMAT) else {}
    method = configMethod(config) if config else ("atlasnet" if (path / NETWORKS).is_dir() else "")
    method = method or str(record.get("method", ""))
    history = readTrainingHistory(path, method)
    if method == "atlasnet":
        finished = bool(config)       # AtlasNet writes its config.json once every network is trained
    else:
        training = config.get("training") if isinstance(config.get("training"), dict) else {}
        planned = (training.get("config") or {}).get("epochs") if isinstance(training.get("config"), dict) else None
        schedule = training.get("schedule") if isinstance(training.get("schedule"), dict) else {}
        finished = (planned is not None and training.get("epochs_completed") == planned) or (
            "steps_total" in schedule and schedule.get("steps_completed") == schedule["steps_total"])   # DeepAtlas
    checkpoints = (path / CHECKPOINT).is_file() or any((p / CHECKPOINT).is_file() for p in _networkFolders(path))
    if checkpoints:
        kind = "run"
    elif config:
        kind = "model"
    elif entries <= {CACHE}:
        kind = "cache"
    else:
        kind = "other"
    return ModelFolderState(path, kind, method, len(history), finished, record)


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


# ---------------------------------------------------------------------------------------------- table and plot

class TrainingCurves:
    """The nodes that show a training: a table (one row per epoch) and a chart of training loss and validation
    Dice against the epoch, in one subject-hierarchy folder. A resumed run reuses them."""

    def __init__(self, scene, title: str, method: str):
        self.scene, self.title, self.method = scene, title, method
        self.columns = [EPOCH, LOSS, DICE] + [column if isinstance(column, str) else column[0]
                                              for column in METHOD_LOG_COLUMNS.get(method, ())]
        self.folderItemID = createFolder(scene, title)
        self.table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{title} table")
        import vtk

        for name in self.columns:
            column = vtk.vtkDoubleArray()
            column.SetName(name)
            self.table.GetTable().AddColumn(column)
        self.chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{title} chart")
        self.chart.SetTitle(title)
        self.chart.SetXAxisTitle({"atlasnet": "epoch (networks one after the other)",
                                  "deepatlas": "step"}.get(method, "epoch"))
        self.chart.SetYAxisTitle("loss / Dice")
        self.chart.SetLegendVisibility(True)
        self.lossSeries = self._series(LOSS, LOSS_COLOR)
        self.diceSeries = self._series(DICE, DICE_COLOR)
        for node in (self.table, self.chart, self.lossSeries, self.diceSeries):
            placeInFolder(scene, node, self.folderItemID)
        self.rows: list[dict] = []

    def _series(self, column: str, color: tuple[float, float, float]):
        series = self.scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{self.title} {column}")
        series.SetAndObserveTableNodeID(self.table.GetID())
        series.SetXColumnName(EPOCH)
        series.SetYColumnName(column)
        series.SetPlotType(series.PlotTypeScatter)
        series.SetMarkerStyle(series.MarkerStyleCircle)
        series.SetColor(*color)
        self.chart.AddAndObservePlotSeriesNodeID(series.GetID())
        return series

    @property
    def series(self) -> list:
        return [self.lossSeries, self.diceSeries]

    def isInScene(self) -> bool:
        return all(self.scene.IsNodePresent(node) for node in (self.table, self.chart, *self.series))

    def setRows(self, rows: Sequence[dict]) -> None:
        """The table holds exactly ``rows`` (the engine's log as it is now)."""
        self.rows = [dict(row) for row in rows]
        table = self.table.GetTable()
        wasModifying = self.table.StartModify()
        for name in self.columns:
            column = table.GetColumnByName(name)
            column.SetNumberOfTuples(len(self.rows))
            for k, row in enumerate(self.rows):
                column.SetValue(k, float(row.get(name, math.nan)))
            column.Modified()
        table.Modified()
        self.table.Modified()
        self.table.EndModify(wasModifying)

    def values(self, column: str) -> list[float]:
        """A column as numbers (tests, console)."""
        array = self.table.GetTable().GetColumnByName(column)
        return [array.GetValue(k) for k in range(array.GetNumberOfTuples())]


def panelPlotViewNode(scene, layoutName: str):
    """The plot view node of a plot view embedded in a module panel (one per ``layoutName``, reused).

    It has a parent layout node of its own (a hidden scripted-module node): Slicer's view layout makes a view for
    every view node without one, so the panel's plot would otherwise also get a second, hidden view there.
    """
    node = scene.GetSingletonNode(layoutName, "vtkMRMLPlotViewNode")
    if node is not None and node.GetParentLayoutNode() is not None:
        return node
    owner = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", f"{layoutName} owner")
    owner.SetHideFromEditors(True)
    node = scene.CreateNodeByClass("vtkMRMLPlotViewNode")
    node.SetName(layoutName)
    node.SetLayoutName(layoutName)
    node.SetHideFromEditors(True)
    node.SetAndObserveParentLayoutNodeID(owner.GetID())   # before it is added: the view layout leaves it alone
    added = scene.AddNode(node)
    node.UnRegister(None)
    return added


# ---------------------------------------------------------------------------------------------- the run

class TrainingRun(EngineRun):
    """One training in the background: poll for progress (which also refreshes the table), cancel, and
    ``finish()`` for the :class:`TrainingResult` (EngineCancelled after a cancel: the checkpoint stays)."""

    def __init__(self, logic: TrainingLogic, settings: TrainingSettings, prepared: PreparedRun, process,
                 ownsWorkDir: bool, curves: TrainingCurves):
        super().__init__(prepared, process, ownsWorkDir, self._result)
        self.logic, self.settings, self.curves = logic, settings, curves
        self.method = settings.method
        self.modelFolder = Path(settings.modelFolder)
        self._unread: list[str] = []
        self._network: tuple[int, int] | None = None   # AtlasNet: (network being trained, networks)
        self._logSignature: tuple = ()
        self.lastProgress = ProgressEvent(0.0, "resuming the training" if settings.resume else
                                          "starting the training")
        self.updateTable()

    def poll(self) -> list[ProgressEvent]:
        """Progress since the last call (AtlasNet: over all its networks), the table brought up to date."""
        events = self.process.progressEvents()
        lines = self.process.newLogLines()
        self._unread += lines
        if self.method == "atlasnet":
            events = self._atlasnetProgress(lines)
        if events:
            self.lastProgress = events[-1]
        lastProgress = lastStatus = -1        # the log keeps progress in order with the other lines
        for k, line in enumerate(lines):
            if parseProgressLogLine(line) is not None:
                lastProgress = k
            elif _STATUS_LINE.match(line.strip()):
                lastStatus = k
        if lastStatus > lastProgress:         # e.g. "registration cache ...", "epoch 3/20: loss ... val Dice ..."
            self.lastProgress = ProgressEvent(self.lastProgress.fraction, lines[lastStatus].strip())
        self.updateTable()
        return events

    def _atlasnetProgress(self, lines: Sequence[str]) -> list[ProgressEvent]:
        """Each network's trainer reports 0..1; in the log's order, network k of N maps it to (k - 1 + f) / N."""
        events = []
        for line in lines:
            match = _NETWORK_LINE.match(line.strip())
            if match:
                self._network = (int(match.group(1)), max(int(match.group(2)), 1))
                continue
            event = parseProgressLogLine(line)
            if event is None or self._network is None:
                continue
            k, n = self._network
            events.append(ProgressEvent(min((k - 1 + event.fraction) / n, 1.0), f"network {k}/{n}: {event.message}"))
        return events

    def newLogLines(self) -> list[str]:
        lines = self._unread + self.process.newLogLines()
        self._unread = []
        return lines

    def updateTable(self) -> bool:
        """Re-read the training log(s) when the engine has written them since; True when the table changed."""
        signature = _logSignature(self.modelFolder, self.method)
        if signature == self._logSignature or not self.curves.isInScene():
            return False
        self._logSignature = signature
        self.curves.setRows(readTrainingHistory(self.modelFolder, self.method))
        return True

    def _result(self) -> TrainingResult:
        self.updateTable()
        config = _readJson(self.modelFolder / CONFIG)
        if not config:
            raise EngineError(f"the training ended without writing {self.modelFolder / CONFIG}; see the engine log")
        if self.method == "atlasnet":
            dice = [_number((n.get("validation") or {}).get("best_mean_dice")) for n in config.get("networks", [])]
            dice = [d for d in dice if d == d]
            best = sum(dice) / len(dice) if dice else math.nan
        else:
            best = _number((config.get("validation") or {}).get("best_mean_dice"))
        return TrainingResult(self.modelFolder, self.method, list(self.curves.rows), best, self.curves, config)


class TrainingLogic(EngineLogic):
    """Training the methods a module offers (``trainingModule``: the registry's ``slicer_module``) from its panel.

    ``python`` and ``processFactory``: see :class:`AtlasSegLib.run.EngineLogic`.
    """

    trainingModule: str | None = None

    def trainingMethods(self) -> dict[str, str]:
        """{name: label} of the trainable methods this module's panel offers (registry order)."""
        try:
            registry = engineRegistry()
        except EngineError:
            return {}
        return {name: info.label for name, info in registry.METHODS.items()
                if info.trains and (self.trainingModule is None or info.slicer_module == self.trainingModule)}

    def _method(self, settings: TrainingSettings) -> str:
        return settings.method or next(iter(self.trainingMethods()), "")

    @staticmethod
    def modelFolderState(folder: str | Path | None) -> ModelFolderState:
        return inspectModelFolder(folder)

    def _methodLabel(self, method: str) -> str:
        try:
            return engineRegistry().get_method(method).label
        except (EngineError, ValueError):
            return method or "unknown"

    # ------------------------------------------------------------------ validation
    def trainingProblems(self, settings: TrainingSettings) -> list[str]:
        """Readable reasons why the training cannot start (empty when it can), one sentence each."""
        problems = []
        methods = self.trainingMethods()
        method = self._method(settings)
        if method not in methods:
            problems.append(f"Unknown method to train '{method}' (choose {', '.join(methods) or 'none'}).")
        atlasFolder = Path(settings.atlasFolder) if settings.atlasFolder.strip() else None
        if atlasFolder is None:
            problems.append("Choose the atlas folder to train on (dataset.json, imagesTr, labelsTr).")
        elif not (atlasFolder / "dataset.json").is_file():
            problems.append(f"No dataset.json in the atlas folder {atlasFolder}.")
        if settings.size not in TRAINING_SIZES:
            problems.append(f"Unknown model size '{settings.size}' (choose {', '.join(TRAINING_SIZES)}).")
        if settings.epochs < 1:
            problems.append("Train for at least 1 epoch.")
        if settings.device not in DEVICES:
            problems.append(f"Unknown device '{settings.device}' (choose {', '.join(DEVICES)}).")
        problems += self._modelFolderProblems(settings, method, atlasFolder)
        return problems

    def _modelFolderProblems(self, settings: TrainingSettings, method: str, atlasFolder: Path | None) -> list[str]:
        state = inspectModelFolder(settings.modelFolder)
        folder = state.folder
        if state.kind == "none":
            return ["Choose a folder for the model (a new or empty folder)."]
        if state.kind == "file":
            return [f"{folder} is a file: choose a folder for the model."]
        if atlasFolder is not None and (_inside(folder.resolve(), atlasFolder.resolve())
                                        or _inside(atlasFolder.resolve(), folder.resolve())):
            return ["Choose a model folder outside the atlas folder (and not holding it)."]
        if state.kind == "other":
            return [f"{folder} is not empty and holds no training run: choose a new or empty folder."]
        if state.method and state.method != method and state.kind in ("run", "model"):
            what = "model" if state.kind == "model" else "training run"
            return [f"{folder} holds a {self._methodLabel(state.method)} {what}, not {self._methodLabel(method)}: "
                    "choose another folder."]
        if state.kind == "model":
            return [f"{folder} holds a trained model without its checkpoint: choose another folder."]
        if not settings.resume:
            if state.kind == "run":
                return [f"A training run exists in {folder}: Resume it or choose another folder."]
            return []
        if state.kind != "run":
            return [f"Nothing to resume in {folder}: no epoch has finished there yet; Train starts a new run."]
        return self._recordProblems(settings, state, method, atlasFolder)

    def _recordProblems(self, settings: TrainingSettings, state: ModelFolderState, method: str,
                        atlasFolder: Path | None) -> list[str]:
        """A resume uses what the run was started with (the engine refuses other settings): say what differs."""
        record, folder = state.record, state.folder
        problems = []
        if record.get("size") and record["size"] != settings.size and record["size"] in TRAINING_SIZES:
            problems.append(f"The run in {folder} was started with the size {TRAINING_SIZES[record['size']].label}: "
                            "choose it to resume.")
        if record.get("atlasFolder") and atlasFolder is not None and \
                Path(record["atlasFolder"]).resolve() != atlasFolder.resolve():
            problems.append(f"The run in {folder} was trained on the atlas folder {record['atlasFolder']}: choose it "
                            "to resume.")
        if "extraArguments" in record and list(record["extraArguments"]) != list(settings.extraArguments):
            problems.append(f"The run in {folder} was started with the engine flags "
                            f"{' '.join(record['extraArguments']) or '(none)'}: resume with the same.")
        return problems

    # ------------------------------------------------------------------ settings -> engine
    def trainingCommand(self, settings: TrainingSettings) -> list[str]:
        """``python -m atlasseg train --method M --atlases A --output MODEL --epochs E --device D [size flags]
        [extra flags] [--resume]``."""
        method = self._method(settings)
        command = [self.python, "-m", "atlasseg", "train", "--method", method, "--atlases", str(settings.atlasFolder),
                   "--output", str(settings.modelFolder), "--epochs", str(settings.epochs),
                   "--device", DEVICES.get(settings.device, settings.device)]
        command += TRAINING_SIZES[settings.size].flagsFor(method) + [str(a) for a in settings.extraArguments]
        return command + (["--resume"] if settings.resume else [])

    def prepareTraining(self, settings: TrainingSettings, workDir: str | Path) -> PreparedRun:
        """Check the settings (EngineError with every problem, before anything is written), record them in the
        model folder and build the engine command (nothing is run)."""
        problems = self.trainingProblems(settings)
        if problems:
            raise EngineError(" ".join(problems))
        method = self._method(settings)
        folder = Path(settings.modelFolder)
        folder.mkdir(parents=True, exist_ok=True)
        record = {"format": RECORD_FORMAT, "version": 1, "method": method, "size": settings.size,
                  "epochs": settings.epochs, "atlasFolder": str(Path(settings.atlasFolder).resolve()),
                  "device": settings.device, "extraArguments": [str(a) for a in settings.extraArguments]}
        (folder / TRAINING_RECORD).write_text(json.dumps(record, indent=2))
        return PreparedRun(self.trainingCommand(settings), engineEnvironment(findEngineRoot()), Path(workDir), folder,
                           {})

    # ------------------------------------------------------------------ running
    def newTrainingCurves(self, settings: TrainingSettings) -> TrainingCurves:
        method = self._method(settings)
        name = Path(settings.modelFolder).name or str(settings.modelFolder)
        return TrainingCurves(self.scene, f"{self._methodLabel(method)} training - {name}", method)

    def startTraining(self, settings: TrainingSettings, curves: TrainingCurves | None = None,
                      workDir: str | Path | None = None) -> TrainingRun:
        """Check, then start the engine in the background; poll the returned run. ``curves``: the nodes of an
        earlier run of the same model folder to continue (a resume), else new ones."""
        settings = replace(settings, method=self._method(settings), extraArguments=list(settings.extraArguments))
        prepared, process, ownsWorkDir = self.startPrepared(lambda work: self.prepareTraining(settings, work),
                                                            workDir)
        if curves is None or not curves.isInScene() or curves.method != settings.method:
            curves = self.newTrainingCurves(settings)
        return TrainingRun(self, settings, prepared, process, ownsWorkDir, curves)

    def trainBlocking(self, settings: TrainingSettings, onProgress: ProgressCallback | None = None,
                      curves: TrainingCurves | None = None, pollSeconds: float = 0.2) -> TrainingResult:
        """Train and wait (Python console, tests): the same work as the panel's background run."""
        return waitForRun(self.startTraining(settings, curves), onProgress, pollSeconds)

    # ------------------------------------------------------------------ the panel's words
    def describeModelFolder(self, settings: TrainingSettings) -> str:
        """One line for the panel under the model folder: what Train or Resume will do there."""
        state = inspectModelFolder(settings.modelFolder)
        method = self._method(settings)
        if state.kind == "none":
            return "Choose a new or empty folder: the model, its training log and checkpoint are written there."
        if state.kind == "new":
            return "A new model will be trained into this folder."
        if state.kind == "cache":
            return "Registrations of an earlier start are here; Train reuses them."
        if state.kind == "run" and state.method in ("", method):
            label = self._methodLabel(method)
            done = f"{state.epochsDone} epoch{'s' if state.epochsDone != 1 else ''}"
            size = TRAINING_SIZES.get(state.record.get("size", ""))
            started = f", size {size.label}" if size else ""
            if state.finished:
                return (f"A finished {label} training is here ({done}{started}): Resume with more epochs continues "
                        "it; choose another folder to train anew.")
            return f"A {label} training run is here ({done} so far{started}): Resume continues it."
        problems = self._modelFolderProblems(TrainingSettings(modelFolder=settings.modelFolder, resume=True),
                                             method, None)
        return problems[0] if problems else ""


def trainingRecord(folder: str | Path) -> dict:
    """The settings the panel started the run in ``folder`` with (empty when it did not)."""
    return inspectModelFolder(folder).record
