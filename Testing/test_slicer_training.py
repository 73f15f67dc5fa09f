"""Training from the module panels, through the modules' Qt-free logic on a real MRML scene (slicer-core), with the
real engine process (``python -m atlasseg train``) on phantom atlas sets.

No mocks: tiny networks (4-8-16 channels, 16^3 patches, fast or affine registrations) train in about 10 s on 2
cores; the table and chart nodes are read while the engine runs; the trained model folder then segments through
the same module's logic. Cancel leaves a checkpoint that a resume continues, its table continuing the epochs.
Settings the engine would refuse, or that would write over something, are refused before any process starts.
The panel's Train section (AtlasSegLib.trainingpanel) runs on stand-in Qt widgets with the same logic and engine.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the 'slicer' package found is not slicer-core (no vtkMRMLScene)", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "DeepLabelFusion"))
sys.path.insert(0, str(REPO / "AtlasNetSeg"))

from AtlasNetSegLib import AtlasNetInputs, AtlasNetLogic, AtlasNetSettings, readModelInfo  # noqa: E402
from DeepLabelFusionLib import FusionInputs, FusionLogic, FusionSettings  # noqa: E402

from atlasseg.phantom import PHANTOM_LABELS, make_phantom, make_phantom_atlas_set  # noqa: E402
from AtlasSegLib import (  # noqa: E402
    TRAINING_RECORD,
    TRAINING_SIZES,
    EngineCancelled,
    EngineError,
    EngineProcess,
    ProgressEvent,
    TrainingSettings,
    inspectModelFolder,
    parseProgressLogLine,
    progressLogLine,
    updateVolumeNodeFromImage,
)
from AtlasSegLib.training import DICE, EPOCH, LOSS, NETWORK, NETWORK_EPOCH, panelPlotViewNode  # noqa: E402
from Testing.slicer_scene import new_scene, segmentation_from_labels  # noqa: E402

DLF_GRID = {"shape": (20, 24, 22), "spacing": (1.6, 1.4, 1.9)}
ATLASNET_GRID = {"shape": (24, 24, 24), "spacing": (1.5, 1.5, 1.5)}
TINY_DLF = ["--n-atlases", "2", "--preset", "fast", "--patch-size", "16", "16", "16", "--vote-channels", "4", "8",
            "16", "--finetune-channels", "4", "8", "16", "--val-fraction", "0.34"]
TINY_ATLASNET = ["--n-networks", "2", "--backbone-kwargs", '{"channels": [4, 8, 16]}', "--patch-size", "16", "16",
                 "16", "--learning-rate", "0.01", "--patches-per-target", "2", "--val-fraction", "0.25", "--preset",
                 "affine"]
DLF_EPOCHS, ATLASNET_EPOCHS = 3, 6
PANEL_MODULES = ("AtlasSegLib.enginepanel", "AtlasSegLib.trainingpanel")   # need Slicer's qt: a stand-in here


def dlf_settings(atlases: Path, model: Path, **changes) -> TrainingSettings:
    return replace(TrainingSettings(str(atlases), str(model), "dlf", "small", DLF_EPOCHS, "cpu",
                                    extraArguments=list(TINY_DLF)), **changes)


def train_and_watch(logic, settings: TrainingSettings, curves=None) -> dict:
    """Start a training and poll it as the panel's timer does, noting what the table held while it ran."""
    t0 = time.perf_counter()
    run = logic.startTraining(settings, curves)
    rowsAtStart = len(run.curves.rows)
    events, lines, rowsWhileRunning = [], [], []
    while run.isRunning():
        time.sleep(0.05)
        events += run.poll()
        lines += run.newLogLines()
        rowsWhileRunning.append(run.curves.table.GetNumberOfRows())
    events += run.poll()
    lines += run.newLogLines()
    return {"run": run, "result": run.finish(), "events": events, "lines": lines, "rowsAtStart": rowsAtStart,
            "rowsWhileRunning": rowsWhileRunning, "seconds": time.perf_counter() - t0}


def wait_until(condition, seconds: float) -> bool:
    deadline = time.time() + seconds
    while not condition() and time.time() < deadline:
        time.sleep(0.05)
    return condition()


def phantom_target_scene(grid: dict, seed: int):
    image, labels = make_phantom(seed, **grid)
    scene = new_scene()
    target = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "phantom target")
    updateVolumeNodeFromImage(target, image)
    return scene, target, segmentation_from_labels(scene, labels, PHANTOM_LABELS, "phantom reference"), labels


def assert_chart_shows_the_table(curves) -> None:
    chart, table = curves.chart, curves.table
    assert chart.GetNumberOfPlotSeriesNodes() == 2
    series = [chart.GetNthPlotSeriesNode(k) for k in range(2)]
    assert [s.GetYColumnName() for s in series] == [LOSS, DICE]
    for node in series:
        assert node.GetXColumnName() == EPOCH and node.GetTableNode() is table
        assert node.GetPlotType() == node.PlotTypeScatter
    sh = curves.scene.GetSubjectHierarchyNode()
    for node in (table, chart, *series):
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == curves.folderItemID, node.GetName()


def engine_rows(csv_path: Path) -> list[dict]:
    import csv

    with open(csv_path, newline="") as handle:
        return list(csv.DictReader(handle))


# ---------------------------------------------------------------------------------------------- Deep Label Fusion

@pytest.fixture(scope="module")
def dlf_atlases(tmp_path_factory) -> Path:
    return make_phantom_atlas_set(tmp_path_factory.mktemp("train_dlf") / "atlases", n_cases=3, seed=11, **DLF_GRID)


@pytest.fixture(scope="module")
def dlf_training(dlf_atlases, tmp_path_factory) -> dict:
    """One real training through the DeepLabelFusion logic, polled as the panel does."""
    scene = new_scene()
    logic = FusionLogic(scene, python=sys.executable)
    model = tmp_path_factory.mktemp("dlf_model") / "model"
    watched = train_and_watch(logic, dlf_settings(dlf_atlases, model))
    return {"scene": scene, "logic": logic, "model": model, **watched}


def test_the_training_command_is_the_engine_cli(dlf_training, dlf_atlases):
    command, model = dlf_training["run"].prepared.command, dlf_training["model"]
    assert command == [sys.executable, "-m", "atlasseg", "train", "--method", "dlf", "--atlases", str(dlf_atlases),
                       "--output", str(model), "--epochs", str(DLF_EPOCHS), "--device", "cpu",
                       *TRAINING_SIZES["small"].flagsFor("dlf"), *TINY_DLF]
    assert "--resume" not in command
    record = json.loads((model / TRAINING_RECORD).read_text())
    assert record["method"] == "dlf" and record["size"] == "small" and record["epochs"] == DLF_EPOCHS
    assert record["atlasFolder"] == str(dlf_atlases.resolve()) and record["extraArguments"] == TINY_DLF


def test_table_rows_are_the_epochs_with_finite_numbers(dlf_training):
    curves, result = dlf_training["run"].curves, dlf_training["result"]
    table = curves.table.GetTable()
    assert [table.GetColumnName(k) for k in range(table.GetNumberOfColumns())] == [EPOCH, LOSS, DICE]
    assert curves.table.GetNumberOfRows() == DLF_EPOCHS == result.epochs
    assert curves.values(EPOCH) == [1.0, 2.0, 3.0]
    losses, dice = curves.values(LOSS), curves.values(DICE)
    assert all(math.isfinite(v) and v > 0 for v in losses)
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in dice)
    logged = engine_rows(dlf_training["model"] / "training_log.csv")   # exactly the engine's log
    assert losses == [pytest.approx(float(r["train_loss"]), abs=0) for r in logged]
    assert dice == [pytest.approx(float(r["val_dice"]), abs=0) for r in logged]
    assert result.bestValidationDice == pytest.approx(max(dice))
    assert result.history == curves.rows


def test_the_table_fills_while_the_engine_runs(dlf_training):
    """The table is read from the engine's log as it is written: rows appear one epoch at a time."""
    seen = dlf_training["rowsWhileRunning"]
    assert dlf_training["rowsAtStart"] == 0 and seen == sorted(seen)
    assert len(set(seen)) >= 3, f"rows seen while running: {sorted(set(seen))}"


def test_the_chart_has_a_loss_and_a_dice_series(dlf_training):
    curves = dlf_training["run"].curves
    assert_chart_shows_the_table(curves)
    assert curves.chart.GetName() == "Deep Label Fusion training - model chart"
    assert curves.lossSeries.GetColor() == pytest.approx((0.86, 0.12, 0.12))


def test_progress_and_status_come_while_training(dlf_training):
    events, lines = dlf_training["events"], dlf_training["lines"]
    fractions = [e.fraction for e in events]
    assert len(fractions) >= 5 and fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any("epoch 3/3" in e.message for e in events)
    assert any(line.startswith("epoch 1/3: loss") for line in lines)
    assert dlf_training["run"].lastProgress.message.startswith("model: ")
    assert dlf_training["seconds"] < 120


def test_the_trained_model_is_selectable_for_apply_and_segments(dlf_training, dlf_atlases):
    """The result's model folder goes straight into Apply's settings (what the panel does) and segments."""
    model = dlf_training["result"].modelFolder
    assert model == dlf_training["model"] and (model / "model.safetensors").is_file()
    scene, target, reference, _ = phantom_target_scene(DLF_GRID, 4242)
    logic = FusionLogic(scene, python=sys.executable)
    inputs = FusionInputs(target, atlasFolder=str(dlf_atlases), referenceSegmentation=reference)
    settings = FusionSettings(method=dlf_training["result"].method, modelFolder=str(model), nAtlases=2,
                              preset="fast", device="cpu")
    assert logic.inputProblems(inputs, settings) == []
    result = logic.runBlocking(inputs, settings)
    assert result.run["method"] == "dlf" and Path(result.run["model"]) == model
    assert result.metrics["labels"]["1"]["dice"] > 0.8, result.metrics   # tissue (0.94 measured); a tiny model


def test_the_model_folder_is_then_a_resumable_run(dlf_training):
    logic, model = dlf_training["logic"], dlf_training["model"]
    state = inspectModelFolder(model)
    assert (state.kind, state.method, state.epochsDone, state.finished) == ("run", "dlf", DLF_EPOCHS, True)
    assert state.resumable and state.record["size"] == "small"
    settings = dlf_settings(Path(state.record["atlasFolder"]), model)
    assert logic.describeModelFolder(settings).startswith("A finished Deep Label Fusion training is here (3 epochs, "
                                                          "size Small (CPU, quick)): Resume with more epochs")
    assert logic.trainingProblems(settings) == [f"A training run exists in {model}: Resume it or choose another "
                                                "folder."]
    assert logic.trainingProblems(replace(settings, resume=True)) == []


# ---------------------------------------------------------------------------------------------- cancel and resume

def test_cancel_returns_at_once_and_resume_continues_the_epochs(dlf_atlases, tmp_path):
    import torch

    scene = new_scene()
    logic = FusionLogic(scene, python=sys.executable)
    model = tmp_path / "model"
    long = dlf_settings(dlf_atlases, model, epochs=60, extraArguments=[*TINY_DLF, "--patches-per-target", "2"])
    run = logic.startTraining(long)
    assert wait_until(lambda: (run.poll() or True) and run.curves.table.GetNumberOfRows() >= 2
                      and (model / "checkpoint.pt").is_file() or not run.isRunning(), 120)
    assert run.isRunning(), "the training ended before it could be cancelled"
    t0 = time.perf_counter()
    run.requestCancel()
    assert time.perf_counter() - t0 < 0.5                      # the panel never waits
    assert wait_until(lambda: not run.isRunning(), 10.0)
    with pytest.raises(EngineCancelled):
        run.finish()
    assert logic.activeProcesses() == []
    done = int(torch.load(model / "checkpoint.pt", weights_only=True)["epoch"])
    assert 1 <= done < 60
    state = inspectModelFolder(model)
    assert state.resumable and state.method == "dlf" and not state.finished
    assert "Resume continues it" in logic.describeModelFolder(long)
    assert logic.trainingProblems(long) == [f"A training run exists in {model}: Resume it or choose another folder."]

    resumed = train_and_watch(logic, replace(long, epochs=done + 3, resume=True), run.curves)
    assert resumed["run"].prepared.command[-1] == "--resume"
    assert resumed["run"].curves is run.curves                 # the same table and chart, continued
    assert resumed["rowsAtStart"] >= done                      # the epochs already trained, shown at once
    assert any(line.startswith(f"resuming {model} after epoch {done}") for line in resumed["lines"])
    assert not any(line.startswith("epoch 1/") for line in resumed["lines"]), "the training restarted"
    trained = [int(line.split("/")[0].split()[1]) for line in resumed["lines"] if line.startswith("epoch ")]
    assert trained == list(range(done + 1, done + 4))
    assert run.curves.values(EPOCH) == [float(e) for e in range(1, done + 4)]
    assert all(math.isfinite(v) for v in run.curves.values(LOSS))
    assert resumed["result"].epochs == done + 3 and math.isfinite(resumed["result"].bestValidationDice)
    assert inspectModelFolder(model).finished


# ---------------------------------------------------------------------------------------------- refused at once

def refused(logic, settings: TrainingSettings, started: list) -> str:
    nodes = logic.scene.GetNumberOfNodes()
    with pytest.raises(EngineError) as error:
        logic.startTraining(settings)
    assert not started and logic.scene.GetNumberOfNodes() == nodes
    message = str(error.value)
    assert "\n" not in message and message == " ".join(logic.trainingProblems(settings))
    return message


def test_bad_settings_are_refused_before_any_process_starts(dlf_training, dlf_atlases, tmp_path):
    started = []
    logic = FusionLogic(new_scene(), python=sys.executable,
                        processFactory=lambda command, env: started.append(command) or EngineProcess(command, env))
    run = dlf_training["model"]
    new = tmp_path / "new"
    ok = dlf_settings(dlf_atlases, new)
    assert logic.trainingProblems(ok) == [] and not new.exists()
    assert refused(logic, replace(ok, atlasFolder=""), started) == \
        "Choose the atlas folder to train on (dataset.json, imagesTr, labelsTr)."
    empty = tmp_path / "no_dataset"
    empty.mkdir()
    assert refused(logic, replace(ok, atlasFolder=str(empty)), started) == \
        f"No dataset.json in the atlas folder {empty}."
    assert refused(logic, replace(ok, epochs=0), started) == "Train for at least 1 epoch."
    assert refused(logic, replace(ok, modelFolder=""), started) == \
        "Choose a folder for the model (a new or empty folder)."
    assert refused(logic, replace(ok, method="atlasnet"), started) == \
        "Unknown method to train 'atlasnet' (choose dlf)."
    assert refused(logic, replace(ok, size="huge"), started) == \
        "Unknown model size 'huge' (choose small, standard, large)."
    assert refused(logic, replace(ok, modelFolder=str(run)), started) == \
        f"A training run exists in {run}: Resume it or choose another folder."
    assert refused(logic, replace(ok, modelFolder=str(dlf_atlases / "model")), started) == \
        "Choose a model folder outside the atlas folder (and not holding it)."
    other = tmp_path / "documents"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert refused(logic, replace(ok, modelFolder=str(other)), started) == \
        f"{other} is not empty and holds no training run: choose a new or empty folder."
    segmenter = REPO / "Testing" / "data" / "format1_unet"
    assert refused(logic, replace(ok, modelFolder=str(segmenter)), started) == \
        f"{segmenter} holds a Segmentation network model, not Deep Label Fusion: choose another folder."
    assert refused(logic, replace(ok, modelFolder=str(run), resume=True, size="large"), started) == \
        f"The run in {run} was started with the size Small (CPU, quick): choose it to resume."
    assert refused(logic, replace(ok, modelFolder=str(new), resume=True), started) == \
        f"Nothing to resume in {new}: no epoch has finished there yet; Train starts a new run."
    cacheOnly = tmp_path / "stopped_early"   # cancelled while registering: Train reuses it, Resume has nothing
    (cacheOnly / "registration_cache").mkdir(parents=True)
    assert refused(logic, replace(ok, modelFolder=str(cacheOnly), resume=True), started).startswith("Nothing to")
    assert logic.trainingProblems(replace(ok, modelFolder=str(cacheOnly))) == []
    assert "reuses them" in logic.describeModelFolder(replace(ok, modelFolder=str(cacheOnly)))
    assert not new.exists() and not (dlf_atlases / "model").exists()
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


def test_an_engine_refusal_after_start_is_one_readable_sentence(dlf_atlases, tmp_path):
    """What the panel does not check (here: an image listed in dataset.json is missing) comes back from the engine
    as the CLI's own one-line reason."""
    broken = tmp_path / "broken"
    broken.mkdir()
    dataset = json.loads((dlf_atlases / "dataset.json").read_text())
    dataset["training"][0]["label"] = "./labelsTr/missing.nii.gz"
    (broken / "dataset.json").write_text(json.dumps(dataset))
    logic = FusionLogic(new_scene(), python=sys.executable)
    with pytest.raises(EngineError) as error:
        logic.trainBlocking(dlf_settings(broken, tmp_path / "model"))
    message = str(error.value)
    assert message.endswith("missing.nii.gz: label listed in dataset.json not found"), message
    assert "Traceback" not in message and "\n" not in message


# ---------------------------------------------------------------------------------------------- AtlasNet

@pytest.fixture(scope="module")
def atlasnet_atlases(tmp_path_factory) -> Path:
    return make_phantom_atlas_set(tmp_path_factory.mktemp("train_atlasnet") / "atlases", n_cases=4, seed=1,
                                  **ATLASNET_GRID)


@pytest.fixture(scope="module")
def atlasnet_training(atlasnet_atlases, tmp_path_factory) -> dict:
    scene = new_scene()
    logic = AtlasNetLogic(scene, python=sys.executable)
    model = tmp_path_factory.mktemp("atlasnet_model") / "model"
    settings = TrainingSettings(str(atlasnet_atlases), str(model), "", "small", ATLASNET_EPOCHS, "cpu",
                                extraArguments=list(TINY_ATLASNET))
    return {"scene": scene, "logic": logic, "model": model, **train_and_watch(logic, settings)}


def test_atlasnet_table_has_every_network_s_epochs(atlasnet_training):
    curves, result = atlasnet_training["run"].curves, atlasnet_training["result"]
    assert atlasnet_training["run"].prepared.command[4:6] == ["--method", "atlasnet"]   # the module's method
    n = 2 * ATLASNET_EPOCHS
    assert curves.table.GetNumberOfRows() == n == result.epochs
    assert curves.values(EPOCH) == [float(k) for k in range(1, n + 1)]
    assert curves.values(NETWORK) == [1.0] * ATLASNET_EPOCHS + [2.0] * ATLASNET_EPOCHS
    assert curves.values(NETWORK_EPOCH) == [float(e) for e in range(1, ATLASNET_EPOCHS + 1)] * 2
    assert all(math.isfinite(v) for v in curves.values(LOSS) + curves.values(DICE))
    assert_chart_shows_the_table(curves)
    assert math.isfinite(result.bestValidationDice) and result.method == "atlasnet"


def test_atlasnet_progress_runs_once_over_all_networks(atlasnet_training):
    events = atlasnet_training["events"]
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    first = [e for e in events if e.message.startswith("network 1/2: ")]
    second = [e for e in events if e.message.startswith("network 2/2: ")]
    assert first and second and max(e.fraction for e in first) <= 0.5 <= min(e.fraction for e in second)


def test_the_trained_atlasnet_model_segments_through_the_atlasnet_logic(atlasnet_training):
    model = atlasnet_training["result"].modelFolder
    assert readModelInfo(model).nNetworks == 2
    scene, target, reference, _ = phantom_target_scene(ATLASNET_GRID, 4243)
    logic = AtlasNetLogic(scene, python=sys.executable)
    inputs, settings = AtlasNetInputs(target, referenceSegmentation=reference), AtlasNetSettings(str(model), "cpu")
    assert logic.inputProblems(inputs, settings) == []
    result = logic.runBlocking(inputs, settings)
    assert result.metrics["labels"]["1"]["dice"] > 0.5, result.metrics   # tissue (0.78 measured); a tiny model


def test_atlasnet_folders_of_other_methods_are_refused(atlasnet_training, dlf_training, atlasnet_atlases):
    started = []
    logic = AtlasNetLogic(new_scene(), python=sys.executable,
                          processFactory=lambda command, env: started.append(command) or EngineProcess(command, env))
    dlf = dlf_training["model"]
    settings = TrainingSettings(str(atlasnet_atlases), str(dlf), "atlasnet", "small", 2, "cpu")
    assert refused(logic, settings, started) == \
        f"{dlf} holds a Deep Label Fusion training run, not AtlasNet: choose another folder."
    state = inspectModelFolder(atlasnet_training["model"])
    assert (state.kind, state.method, state.epochsDone, state.finished) == ("run", "atlasnet", 2 * ATLASNET_EPOCHS,
                                                                            True)


# ---------------------------------------------------------------------------------------------- sizes, log lines

@pytest.mark.parametrize("method", ["dlf", "atlasnet"])
def test_every_size_is_a_valid_engine_configuration(method, capsys):
    from atlasseg.cli import main

    resolved = {}
    for name, size in TRAINING_SIZES.items():
        assert main(["train", "--method", method, "--print-config", *size.flagsFor(method)]) == 0
        resolved[name] = json.loads(capsys.readouterr().out)
        assert size.noteFor(method).endswith(".") and size.label
    if method == "dlf":
        channels = [(r["architecture"]["vote_channels"], r["architecture"]["finetune_channels"],
                     r["training"]["patch_size"]) for r in resolved.values()]
        assert channels == [([8, 16, 32], [8, 16, 32, 64], [32, 32, 32]),
                            ([16, 32, 64], [16, 32, 64, 128], [48, 48, 48]),
                            ([32, 64, 128], [32, 64, 128, 256], [48, 48, 48])]
    else:
        assert [(r["architecture"]["backbone_preset"], r["architecture"]["backbone_kwargs"]) for r in
                resolved.values()] == [("cpu", {"channels": [8, 16, 32]}), ("cpu", {}), ("paper", {})]


def test_progress_log_lines_round_trip():
    assert progressLogLine(ProgressEvent(0.42, "epoch 3/20 loss 0.5")) == "[ 42%] epoch 3/20 loss 0.5"
    assert parseProgressLogLine("[ 42%] epoch 3/20 loss 0.5") == ProgressEvent(0.42, "epoch 3/20 loss 0.5")
    assert parseProgressLogLine("[100%] training done") == ProgressEvent(1.0, "training done")
    assert parseProgressLogLine("epoch 3/20: loss 0.5") is None


def test_history_of_an_interrupted_atlasnet_run_is_read_network_by_network(atlasnet_training, tmp_path):
    """A run stopped during its second network: the first network's log, then the second's so far."""
    copy = tmp_path / "stopped"
    shutil.copytree(atlasnet_training["model"], copy, ignore=shutil.ignore_patterns("registration_cache"))
    (copy / "config.json").unlink()        # AtlasNet writes it once every network is trained
    second = sorted((copy / "networks").iterdir())[1] / "training_log.csv"
    second.write_text("".join(second.read_text().splitlines(keepends=True)[:3]))   # header + 2 epochs
    state = inspectModelFolder(copy)
    assert (state.kind, state.method, state.epochsDone, state.finished) == ("run", "atlasnet", ATLASNET_EPOCHS + 2,
                                                                            False)



# ---------------------------------------------------------------------------------------------- the panel section

class StandIn:
    """A Qt widget as the section's code uses it (PythonQt properties as attributes, signals by name)."""

    def __init__(self):
        self.text, self.toolTip, self.enabled, self.visible, self.value = "", "", True, True, 0
        self.slots, self.lines, self.added = {}, [], []

    def connect(self, signal, slot):
        self.slots[signal] = slot

    def click(self):
        self.slots["clicked(bool)"](False)

    def show(self):
        self.visible = True

    def hide(self):
        self.visible = False

    def setValue(self, value):
        self.value = value

    def clear(self):
        self.lines = []

    def appendPlainText(self, text):
        self.lines += text.split("\n")

    def layout(self):
        return self

    def addWidget(self, widget):
        self.added.append(widget)


class ComboStandIn(StandIn):
    def __init__(self):
        super().__init__()
        self.items, self.index = [], -1

    def clear(self):
        self.items, self.index = [], -1

    def addItem(self, text, data):
        self.items.append((text, data))
        self.index = max(self.index, 0)

    @property
    def count(self):
        return len(self.items)

    def findData(self, data):
        return next((k for k, (_, d) in enumerate(self.items) if d == data), -1)

    def setCurrentIndex(self, index):
        self.index = index

    @property
    def currentData(self):
        return self.items[self.index][1]

    def blockSignals(self, block):
        return False


class PlotViewStandIn:
    def setMRMLScene(self, scene):
        self.scene = scene

    def setMinimumHeight(self, height):
        pass

    def setMRMLPlotViewNode(self, node):
        self.node = node


@pytest.fixture
def training_section(monkeypatch, dlf_atlases, tmp_path):
    """The shared Train section (AtlasSegLib.trainingpanel) on stand-in Qt widgets, with the real logic and engine,
    a parameter node with its training fields, and a size small enough for the phantoms."""
    import importlib
    import types

    from AtlasSegLib import training

    qt = types.ModuleType("qt")
    qt.QTimer = type("QTimer", (), {"setInterval": lambda self, ms: None, "connect": lambda self, signal, slot: None,
                                    "start": lambda self: None, "stop": lambda self: None})
    monkeypatch.setitem(sys.modules, "qt", qt)
    scene = new_scene()
    errors = []
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    monkeypatch.setattr(slicer, "qMRMLPlotView", PlotViewStandIn, raising=False)
    monkeypatch.setattr(slicer.util, "errorDisplay", errors.append)
    monkeypatch.setitem(training.TRAINING_SIZES, "tiny", training.TrainingSize(
        "tiny", "Tiny (tests)", {"dlf": tuple(TINY_DLF)}, {"dlf": "Tiny networks for the phantoms."}))
    for name in PANEL_MODULES:                              # imported afresh on the stand-in qt, dropped after
        sys.modules.pop(name, None)
    panel = importlib.import_module("AtlasSegLib.trainingpanel")
    names = ["trainButton", "resumeButton", "trainingPlotLayoutButton", "trainingProgressBar", "trainingStatusLabel",
             "trainingSizeNoteLabel", "trainingFolderNoteLabel", "trainingPlotContainer"]
    ui = types.SimpleNamespace(**{name: StandIn() for name in names},
                               **{name: ComboStandIn() for name in ("trainingMethodComboBox", "trainingSizeComboBox",
                                                                    "trainingDeviceComboBox")})
    logic = FusionLogic(scene, python=sys.executable)
    logic.ensureEngineDependencies = lambda: True
    params = types.SimpleNamespace(trainingAtlasFolder=dlf_atlases, trainingModelFolder=tmp_path / "model",
                                   trainingMethod="dlf", trainingSize="tiny", trainingEpochs=DLF_EPOCHS,
                                   trainingDevice="cpu",
                                   parameterNode=scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode"))
    trained, log = [], StandIn()
    section = panel.TrainingSection(ui, logic, "DeepLabelFusion", trained.append, logWidget=log)
    section.setParameterNode(params)
    section.update()
    yield types.SimpleNamespace(section=section, ui=ui, params=params, trained=trained, errors=errors, log=log,
                                model=tmp_path / "model", scene=scene)
    logic.cancelActiveRuns()
    for name in PANEL_MODULES:
        sys.modules.pop(name, None)


def poll_until_done(section, statuses: list, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while section.isRunning() and time.time() < deadline:
        time.sleep(0.1)
        section.onPoll()
        statuses.append(section.ui.trainingStatusLabel.text)


def test_panel_section_trains_shows_the_plot_cancels_and_resumes(training_section):
    """The Train section's own flow: Train -> live status and plot -> the model handed to Apply; Resume with more
    epochs -> Cancel (the same button) -> Resume again is offered; a folder chosen anew shows its settings."""
    s, ui, params = training_section, training_section.ui, training_section.params
    assert ui.trainingMethodComboBox.items == [("Deep Label Fusion", "dlf")] and not ui.trainingMethodComboBox.enabled
    assert ui.trainingSizeComboBox.currentData == "tiny" and ui.trainingSizeNoteLabel.text.startswith("Tiny")
    assert ui.trainButton.enabled and ui.trainButton.text == "Train"
    assert not ui.resumeButton.enabled and ui.resumeButton.toolTip.startswith("Nothing to resume in ")
    assert ui.trainingFolderNoteLabel.text == "A new model will be trained into this folder."

    ui.trainButton.click()
    assert s.section.isRunning() and ui.trainButton.text == "Cancel training" and not ui.resumeButton.enabled
    assert ui.trainingProgressBar.visible and s.log.lines[0].startswith(f"$ {sys.executable} -m atlasseg train")
    view = ui.trainingPlotContainer.added[0]
    assert view.node.GetPlotChartNodeID() == s.section._run.curves.chart.GetID() and ui.trainingPlotLayoutButton.enabled
    assert view.node.GetParentLayoutNode() is not None and view.node.GetLayoutName() == "DeepLabelFusionTrainingPlot"
    assert panelPlotViewNode(s.scene, "DeepLabelFusionTrainingPlot") is view.node   # one view node, reused
    assert ui.trainingFolderNoteLabel.text.startswith("Training into this folder")
    statuses = []
    poll_until_done(s.section, statuses)
    assert any("(last epoch 1: loss " in text for text in statuses), statuses
    assert len(s.trained) == 1 and s.trained[0].modelFolder == s.model and s.trained[0].method == "dlf"
    assert ui.trainingStatusLabel.text.startswith(f"Trained: {DLF_EPOCHS} epochs, best validation Dice 0.")
    assert not ui.trainingProgressBar.visible and not s.errors
    assert not ui.trainButton.enabled and ui.trainButton.toolTip.startswith("A training run exists in ")
    assert ui.resumeButton.enabled
    assert ui.trainingFolderNoteLabel.text.startswith("A finished Deep Label Fusion training is here (3 epochs, ")

    params.trainingEpochs = 60                       # more epochs, then Resume; Cancel with the same button
    s.section.update()
    ui.resumeButton.click()
    run = s.section._run
    assert run.settings.resume and run.curves is s.trained[0].curves and len(run.curves.rows) == DLF_EPOCHS
    assert wait_until(lambda: (s.section.onPoll() or True) and len(run.curves.rows) > DLF_EPOCHS + 1, 120)
    t0 = time.perf_counter()
    ui.trainButton.click()
    assert time.perf_counter() - t0 < 0.5 and ui.trainingStatusLabel.text == "Cancelling..."
    poll_until_done(s.section, [])
    assert ui.trainingStatusLabel.text.startswith("Cancelled after "), ui.trainingStatusLabel.text
    assert "Resume continues from the last finished epoch" in ui.trainingStatusLabel.text
    assert len(s.trained) == 1 and ui.resumeButton.enabled and not ui.trainButton.enabled

    params.trainingSize, params.trainingEpochs = "standard", 5   # the folder chosen again: its run's settings
    s.section._lastFolder = None
    s.section.update()
    assert (params.trainingSize, params.trainingEpochs) == ("tiny", 60) and ui.resumeButton.enabled
