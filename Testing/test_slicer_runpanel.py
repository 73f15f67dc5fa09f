"""The Apply part of the module panels (AtlasSegLib.runpanel.RunSection) on stand-in Qt widgets, with the modules'
real Qt-free logic on a real MRML scene (slicer-core) and the real engine process (``python -m atlasseg``).

No mocks of the work: Apply writes a phantom target, starts the engine (``--preset fast``, ``--device cpu``) and
the section's timer handler is called as Slicer's timer would; progress, status and engine log lines arrive while
it runs, the results are shown when it ends; Cancel returns at once and the engine stops; a run that cannot start
says why in one line. Deep Label Fusion's panel has an engine log pane, AtlasNet's has none.
"""

from __future__ import annotations

import contextlib
import sys
import time
import types
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the 'slicer' package found is not slicer-core (no vtkMRMLScene)", allow_module_level=True)

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / module) for module in ("AtlasNetSeg", "DeepLabelFusion")]

from AtlasNetSegLib import AtlasNetInputs, AtlasNetLogic, AtlasNetSettings  # noqa: E402
from DeepLabelFusionLib import FusionInputs, FusionLogic, FusionSettings  # noqa: E402

from atlasseg.phantom import PHANTOM_LABELS, make_phantom, make_phantom_atlas_set  # noqa: E402
from AtlasSegLib import DEFAULT_SIZE, updateVolumeNodeFromImage  # noqa: E402
from AtlasSegLib.results import MAP_KIND_ATTRIBUTE, mapStyle  # noqa: E402
from Testing.slicer_scene import new_scene, segmentation_from_labels  # noqa: E402
from Testing.test_atlasnet_slicer import atlasnet_model  # noqa: E402, F401  (the fixture of a tiny trained model)
from Testing.test_slicer_training import REPO, StandIn, wait_until  # noqa: E402

GRID = {"shape": (20, 24, 22), "spacing": (1.6, 1.4, 1.9)}
N_ATLASES = 3
DLF_TOOLTIP = "Register the atlases to the target and fuse their labels"
PANEL_MODULES = ("AtlasSegLib.enginepanel", "AtlasSegLib.runpanel")


class NodeSelectorStandIn(StandIn):
    """A qMRMLNodeComboBox as the section uses it."""

    def __init__(self):
        super().__init__()
        self.node, self.attributes = None, []

    def addAttribute(self, nodeClass, attribute):
        self.attributes.append((nodeClass, attribute))

    def setCurrentNode(self, node):
        self.node = node
        self.slots["currentNodeChanged(vtkMRMLNode*)"](node)   # Qt signals the change

    def currentNode(self):
        return self.node


class SliderStandIn(StandIn):
    def blockSignals(self, block):
        return False


class TableViewStandIn(StandIn):
    def setMRMLTableNode(self, node):
        self.table = node


def panel_ui(logPane: bool) -> types.SimpleNamespace:
    """The Apply part's widgets of a module panel: Deep Label Fusion's has the engine log pane, AtlasNet's not."""
    ui = types.SimpleNamespace(applyButton=StandIn(), progressBar=StandIn(), statusLabel=StandIn(),
                               metricsTableView=TableViewStandIn(), mapSelector=NodeSelectorStandIn(),
                               mapOpacitySlider=SliderStandIn())
    if logPane:
        ui.logTextEdit, ui.logCollapsibleButton = StandIn(), StandIn()
        ui.logCollapsibleButton.collapsed = True
    return ui


@pytest.fixture(scope="module")
def atlases(tmp_path_factory) -> Path:
    return make_phantom_atlas_set(tmp_path_factory.mktemp("runpanel") / "atlases", n_cases=N_ATLASES, seed=3,
                                  **GRID)


@pytest.fixture
def panel(monkeypatch):
    """AtlasSegLib.runpanel imported afresh on a stand-in qt (a timer that the test drives), with slicer.util's
    dialogs, wait cursor and slice-view call recorded; dropped again afterwards."""
    import importlib

    qt = types.ModuleType("qt")
    qt.QTimer = type("QTimer", (), {"setInterval": lambda self, ms: None, "connect": lambda self, signal, slot: None,
                                    "start": lambda self: None, "stop": lambda self: None})
    monkeypatch.setitem(sys.modules, "qt", qt)
    scene = new_scene()
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    recorded = types.SimpleNamespace(errors=[], layers=[], waitCursors=0)

    @contextlib.contextmanager
    def waitCursor():
        recorded.waitCursors += 1
        yield

    monkeypatch.setattr(slicer.util, "errorDisplay", recorded.errors.append)
    monkeypatch.setattr(slicer.util, "WaitCursor", waitCursor)
    monkeypatch.setattr(slicer.util, "setSliceViewerLayers", lambda **layers: recorded.layers.append(layers))
    for name in PANEL_MODULES:
        sys.modules.pop(name, None)
    runpanel = importlib.import_module("AtlasSegLib.runpanel")
    logics = []
    yield types.SimpleNamespace(runpanel=runpanel, scene=scene, recorded=recorded, logics=logics)
    for logic in logics:
        logic.cancelActiveRuns()
    for name in PANEL_MODULES:
        sys.modules.pop(name, None)


def phantom_target(scene, seed: int = 4242):
    image, labels = make_phantom(seed, **GRID)
    target = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "phantom target")
    updateVolumeNodeFromImage(target, image)
    return target, segmentation_from_labels(scene, labels, PHANTOM_LABELS, "phantom reference")


def dlf_section(panel, inputs: FusionInputs, settings: FusionSettings, logPane: bool = True):
    """The Apply part as Deep Label Fusion's panel builds it, on the real FusionLogic."""
    logic = FusionLogic(panel.scene, python=sys.executable)
    logic.ensureEngineDependencies = lambda: True
    panel.logics.append(logic)
    results = []
    section = panel.runpanel.RunSection(panel_ui(logPane), logic, "DeepLabelFusion", lambda: inputs,
                                        lambda: settings, DLF_TOOLTIP, "atlases", results.append)
    section.updateButtons()
    return section, results


def poll_until_done(section, seconds: float = 180) -> list[tuple[int, str]]:
    """Call the section's timer handler as Slicer's timer does until the run ends: (progress, status) seen."""
    seen = []
    deadline = time.time() + seconds
    while section.isRunning() and time.time() < deadline:
        time.sleep(0.1)
        section.onPoll()
        seen.append((section.ui.progressBar.value, section.ui.statusLabel.text))
    assert not section.isRunning(), "the engine did not end in time"
    return seen


def test_apply_runs_the_engine_shows_progress_log_and_the_result(panel, atlases):
    scene = panel.scene
    composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")   # a slice view, for the map display
    target, reference = phantom_target(scene)
    section, results = dlf_section(panel, FusionInputs(target, atlasFolder=str(atlases),
                                                       referenceSegmentation=reference),
                                   FusionSettings(method="weighted", nAtlases=N_ATLASES, preset="fast", device="cpu"))
    ui = section.ui
    assert (ui.applyButton.text, ui.applyButton.enabled, ui.applyButton.toolTip) == ("Apply", True, DLF_TOOLTIP)
    assert not ui.progressBar.visible and ui.mapSelector.attributes == [("vtkMRMLScalarVolumeNode",
                                                                         MAP_KIND_ATTRIBUTE)]

    t0 = time.perf_counter()
    ui.applyButton.click()
    assert section.isRunning() and time.perf_counter() - t0 < 5.0
    assert (ui.applyButton.text, ui.applyButton.enabled, ui.applyButton.toolTip) == \
        ("Cancel", True, "Stop the running segmentation")
    assert ui.progressBar.visible and ui.progressBar.value == 0 and ui.statusLabel.text == "Starting the engine..."
    assert ui.logTextEdit.lines[0].startswith(f"$ {sys.executable} -m atlasseg segment ")
    seen = poll_until_done(section)

    progress = [value for value, _ in seen]
    assert progress == sorted(progress) and len(set(progress)) >= 3, progress   # the bar moves while it runs
    statuses = {status for _, status in seen[:-1]}
    assert len(statuses) >= 3 and "Starting the engine..." not in statuses, statuses   # the engine's own words
    assert len(ui.logTextEdit.lines) > 3, ui.logTextEdit.lines                            # its log, line by line
    assert len(results) == 1 and not panel.recorded.errors and panel.recorded.waitCursors == 1
    result = results[0]
    assert ui.statusLabel.text.startswith("Done in ") and f" s with {N_ATLASES} atlases. Mean Dice 0." in \
        ui.statusLabel.text, ui.statusLabel.text
    assert panel.recorded.layers == [{"background": target}]
    assert ui.metricsTableView.table is result.metricsTable and result.metricsTable is not None
    assert ui.mapSelector.currentNode() is result.agreement is not None
    assert composite.GetForegroundVolumeID() == result.agreement.GetID()            # the map over its target
    assert composite.GetBackgroundVolumeID() == target.GetID()
    assert ui.mapOpacitySlider.value == mapStyle(result.agreement).opacity
    ui.mapOpacitySlider.slots["valueChanged(double)"](0.25)
    assert composite.GetForegroundOpacity() == pytest.approx(0.25)
    assert not ui.progressBar.visible and (ui.applyButton.text, ui.applyButton.enabled) == ("Apply", True)
    assert ui.logCollapsibleButton.collapsed                                          # opened on failures only
    assert panel.logics[0].activeProcesses() == []


def test_cancel_returns_at_once_and_the_status_says_cancelled(panel, atlases):
    target, _ = phantom_target(panel.scene, 4243)
    section, results = dlf_section(panel, FusionInputs(target, atlasFolder=str(atlases)),
                                   FusionSettings(method="jlf", nAtlases=N_ATLASES, preset="accurate", device="cpu"))
    ui, logic = section.ui, panel.logics[0]
    ui.applyButton.click()
    assert wait_until(lambda: (section.onPoll() or True) and ui.progressBar.value > 0 or not section.isRunning(),
                      120), "no progress from the engine"
    assert section.isRunning(), "the engine ended before it could be cancelled"
    t0 = time.perf_counter()
    ui.applyButton.click()                                       # the same button cancels
    assert time.perf_counter() - t0 < 0.5                        # the panel never waits for the engine
    assert ui.statusLabel.text == "Cancelling..."
    assert (ui.applyButton.text, ui.applyButton.enabled) == ("Cancelling...", False)
    statuses = [status for _, status in poll_until_done(section, 30)]
    assert set(statuses[:-1]) <= {"Cancelling..."}               # the engine's progress no longer overwrites it
    assert ui.statusLabel.text == "Cancelled." and not results and not panel.recorded.errors
    assert not ui.progressBar.visible and (ui.applyButton.text, ui.applyButton.enabled) == ("Apply", True)
    assert logic.activeProcesses() == [] and panel.recorded.waitCursors == 1


def test_closing_the_scene_cancels_without_waiting(panel, atlases):
    target, _ = phantom_target(panel.scene, 4244)
    section, results = dlf_section(panel, FusionInputs(target, atlasFolder=str(atlases)),
                                   FusionSettings(method="jlf", nAtlases=N_ATLASES, preset="accurate", device="cpu"))
    training = types.SimpleNamespace(messages=[])
    training.forget = training.messages.append
    section.ui.applyButton.click()
    assert section.isRunning()
    t0 = time.perf_counter()
    section.closing("scene", training)
    assert time.perf_counter() - t0 < 0.5 and not section.isRunning()
    assert section.ui.statusLabel.text == "Cancelled: the scene was closed."
    assert training.messages == ["Cancelled: the scene was closed; Resume continues from the last finished epoch."]
    assert section.ui.applyButton.text == "Apply" and not section.ui.progressBar.visible
    assert wait_until(lambda: panel.logics[0].activeProcesses() == [], 10.0) and not results


def test_an_engine_failure_opens_the_log_pane_and_says_why(panel, atlases, tmp_path):
    import json
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(atlases, broken)
    dataset = json.loads((broken / "dataset.json").read_text())
    dataset["training"][0]["label"] = "./labelsTr/missing.nii.gz"     # what the panel does not check
    (broken / "dataset.json").write_text(json.dumps(dataset))
    target, _ = phantom_target(panel.scene, 4245)
    section, results = dlf_section(panel, FusionInputs(target, atlasFolder=str(broken)),
                                   FusionSettings(method="majority", nAtlases=N_ATLASES, preset="fast", device="cpu"))
    assert section.ui.applyButton.enabled
    section.ui.applyButton.click()
    poll_until_done(section)
    assert section.ui.statusLabel.text == "Failed." and not results
    assert not section.ui.logCollapsibleButton.collapsed                  # the engine's own words, beside the dialog
    [message] = panel.recorded.errors
    assert message.startswith("Segmentation failed: ") and message.endswith("missing.nii.gz: label listed in "
                                                                            "dataset.json not found"), message
    assert "\n" not in message and "Traceback" not in message
    assert section.ui.applyButton.text == "Apply" and not section.ui.progressBar.visible


def test_a_run_that_cannot_start_says_why_in_one_line(panel, atlases):
    """The reasons are Apply's tooltip (the button is off); clicked anyway (inputs changed since), nothing starts and
    one line says why."""
    section, results = dlf_section(panel, FusionInputs(None, atlasFolder=str(atlases)),
                                   FusionSettings(method="weighted", nAtlases=N_ATLASES, preset="fast", device="cpu"))
    ui = section.ui
    assert not ui.applyButton.enabled and ui.applyButton.toolTip == "Select a target volume."
    ui.applyButton.click()
    assert panel.recorded.errors == ["Cannot start the segmentation: Select a target volume."]
    assert not section.isRunning() and not ui.progressBar.visible and ui.statusLabel.text == ""
    assert ui.logTextEdit.lines == [] and panel.logics[0].activeProcesses() == [] and not results


def test_atlasnet_panel_has_no_log_pane_and_says_why_it_cannot_start(panel, tmp_path):
    """AtlasNet's panel: the same section without the engine log pane; a folder that is not a model is refused
    before any process starts."""
    logic = AtlasNetLogic(panel.scene, python=sys.executable)
    logic.ensureEngineDependencies = lambda: True
    panel.logics.append(logic)
    target, _ = phantom_target(panel.scene, 4246)
    folder = tmp_path / "not_a_model"
    folder.mkdir()
    inputs, settings = AtlasNetInputs(target), AtlasNetSettings(str(folder), "cpu")
    section = panel.runpanel.RunSection(panel_ui(logPane=False), logic, "AtlasNetSeg", lambda: inputs,
                                        lambda: settings, "Segment the target with every network of the model",
                                        "networks")
    assert section.logWidget is None and section.logSection is None
    section.updateButtons()
    problems = logic.inputProblems(inputs, settings)
    assert problems and not section.ui.applyButton.enabled and section.ui.applyButton.toolTip == " ".join(problems)
    section.ui.applyButton.click()
    [message] = panel.recorded.errors
    assert message == f"Cannot start the segmentation: {' '.join(problems)}" and "\n" not in message
    assert not section.isRunning() and logic.activeProcesses() == []
    section.forget("Cancelled: the module was closed.")          # nothing running: nothing changes
    assert section.ui.statusLabel.text == ""


# ---------------------------------------------------------------------------------------------- the module panels

class WidgetStandIn(NodeSelectorStandIn, TableViewStandIn):
    """Any other widget of a module's .ui, as the module code uses it."""

    def __init__(self):
        super().__init__()
        self.checked, self.collapsed, self.rows = False, False, {}

    def setCurrentNode(self, node):
        self.node = node
        self.slots.get("currentNodeChanged(vtkMRMLNode*)", lambda node: None)(node)

    def blockSignals(self, block):
        return False

    def setMRMLScene(self, scene):
        self.scene = scene

    def setRowCount(self, count):
        self.rows = {row: cells for row, cells in self.rows.items() if row < count}

    def setItem(self, row, column, item):
        self.rows.setdefault(row, {})[column] = item

    def selectedIndexes(self):
        return []


def stand_in_ui(module: str) -> types.SimpleNamespace:
    """Every named widget of the module's .ui as a stand-in (what slicer.util.childWidgetVariables gives)."""
    import xml.etree.ElementTree as ET

    from Testing.test_slicer_training import ComboStandIn

    widgets = ET.parse(REPO / module / "Resources" / "UI" / f"{module}.ui").getroot().iter("widget")
    return types.SimpleNamespace(**{w.get("name"): ComboStandIn() if w.get("class") == "QComboBox" else
                                    WidgetStandIn() for w in widgets})


def slicer_stand_ins() -> dict[str, types.ModuleType]:
    """What the module files need of Slicer beyond slicer-core, as Slicer 5.x behaves: the scripted-module base
    classes (the logic's ``__init__`` calls ``super().__init__()``) and the parameter node wrapper (typed fields
    with defaults, inherited annotations read, a change modifies the node)."""
    import typing
    import unittest

    scripted = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            super().__init__()
            self.parent, self.moduleName = parent, type(self).__name__

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            super().__init__()
            self.moduleName = type(self).__name__[:-len("Widget")]
            self.parent, self.layout = parent, StandIn()

        def setup(self):
            pass

        def resourcePath(self, filename):
            return str(REPO / self.moduleName / "Resources" / filename)

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            super().__init__()
            self.moduleName = type(self).__name__[:-len("Logic")]

        def getParameterNode(self):
            return slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode") or \
                slicer.mrmlScene.AddNode(_singleton(self.moduleName))

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=None):
            pass

    def _singleton(name):
        node = slicer.vtkMRMLScriptedModuleNode()
        node.SetSingletonTag(name)
        return node

    scripted.__dict__.update(ScriptedLoadableModule=ScriptedLoadableModule, ScriptedLoadableModuleLogic=
                             ScriptedLoadableModuleLogic, ScriptedLoadableModuleTest=ScriptedLoadableModuleTest,
                             ScriptedLoadableModuleWidget=ScriptedLoadableModuleWidget)

    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    values: dict[str, dict] = {}

    def parameterNodeWrapper(cls):
        hints = typing.get_type_hints(cls, include_extras=True)

        def default(name, hint):
            if hasattr(cls, name):
                return getattr(cls, name)
            hint = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
            return {str: "", bool: False, int: 0, float: 0.0, Path: Path()}.get(hint, [] if typing.get_origin(
                hint) is list else None)

        class Wrapper:
            fields = {name: default(name, hint) for name, hint in hints.items()}

            def __init__(self, parameterNode):
                object.__setattr__(self, "parameterNode", parameterNode)
                values.setdefault(parameterNode.GetID(), dict(self.fields))

            def __getattr__(self, name):
                if name in self.fields:
                    return values[self.parameterNode.GetID()][name]
                return getattr(self.parameterNode, name)   # AddObserver, RemoveObserver, ...

            def __setattr__(self, name, value):
                assert name in self.fields, f"{name} is not a parameter"
                values[self.parameterNode.GetID()][name] = value
                self.parameterNode.Modified()

            def connectGui(self, gui):
                return 1

            def disconnectGui(self, tag):
                pass

        Wrapper.__name__ = cls.__name__
        return Wrapper

    wrapper.parameterNodeWrapper, wrapper.WithinRange = parameterNodeWrapper, lambda low, high: (low, high)
    return {"slicer.ScriptedLoadableModule": scripted, "slicer.parameterNodeWrapper": wrapper}


@pytest.fixture
def module_file(panel, monkeypatch):
    """Load a module file (DeepLabelFusion.py, AtlasNetSeg.py) as Slicer does, on the stand-ins and slicer-core."""
    import importlib.util

    for name, stand_in in slicer_stand_ins().items():
        monkeypatch.setitem(sys.modules, name, stand_in)
    panel.qt = sys.modules["qt"]
    panel.qt.QTableWidgetItem = lambda text: text
    ui = {}
    monkeypatch.setattr(slicer.util, "loadUI", lambda path: ui.setdefault("widget", WidgetStandIn()), raising=False)
    monkeypatch.setattr(slicer.util, "childWidgetVariables", lambda widget: ui["ui"], raising=False)
    # the application object: the modules hook their Sample Data entry to its start-up signal
    panel.connected = []
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(
        connect=lambda signal, slot: panel.connected.append(signal)), raising=False)
    loaded = []

    def load(module: str):
        ui["ui"] = stand_in_ui(module)
        spec = importlib.util.spec_from_file_location(module, REPO / module / f"{module}.py")
        code = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, module, code)
        spec.loader.exec_module(code)
        loaded.append(code)
        return code

    yield load
    for name in ("AtlasSegLib.modulebase", "AtlasSegLib.trainingpanel"):
        sys.modules.pop(name, None)


def open_panel(code, module: str):
    info = types.SimpleNamespace()
    getattr(code, module)(info)
    widget = getattr(code, f"{module}Widget")(WidgetStandIn())
    widget.setup()
    widget.logic.ensureEngineDependencies = lambda: True
    return info, widget


def test_deep_label_fusion_panel_runs_through_the_shared_code(module_file, panel, atlases):
    """DeepLabelFusion.py's panel on stand-in widgets: the module's own widgets and hooks, the shared Apply part and
    Train section, the parameter node (with the Train section's inherited fields), a phantom segmentation."""
    code = module_file("DeepLabelFusion")
    info, widget = open_panel(code, "DeepLabelFusion")
    assert panel.connected == ["startupCompleted()"]     # its Sample Data entry, registered once Slicer is up
    assert (info.title, info.categories, info.contributors) == ("Deep Label Fusion", ["Segmentation"],
                                                                ["AtlasSeg developers"])
    assert info.helpText.endswith("documentation</a>.") and "Xie et al." in info.acknowledgementText
    logic, ui, p = widget.logic, widget.ui, widget._parameterNode
    assert isinstance(logic, code.DeepLabelFusionLogic) and logic.scene is panel.scene and logic.python
    assert isinstance(p, code.DeepLabelFusionParameterNode) and logic.getParameterNode().parameterNode is \
        p.parameterNode
    assert (p.method, p.trainingMethod, p.trainingSize, p.trainingEpochs, p.trainingDevice) == \
        ("jlf", "", DEFAULT_SIZE, 20, "auto")
    assert ui.deviceComboBox.items == list(zip(code.DEVICE_LABELS.values(), code.DEVICE_LABELS))
    assert ui.trainingDeviceComboBox.items == ui.deviceComboBox.items
    assert ui.trainingMethodComboBox.currentData == "dlf" and widget.training.settings().method == "dlf"
    assert not ui.applyButton.enabled and ui.applyButton.toolTip.startswith("Select a target volume.")
    assert ui.logTextEdit is widget.runSection.logWidget is widget.training.logWidget

    target, reference = phantom_target(panel.scene)
    with slicer.util.NodeModify(p.parameterNode):
        p.targetVolume, p.referenceSegmentation, p.atlasFolder = target, reference, atlases
        p.method, p.nAtlases, p.preset = "weighted", N_ATLASES, "fast"
    ui.deviceComboBox.setCurrentIndex(ui.deviceComboBox.findData("cpu"))
    ui.deviceComboBox.slots["currentIndexChanged(int)"](ui.deviceComboBox.index)   # the user picks the CPU
    assert p.device == "cpu" and ui.methodComboBox.currentData == "weighted"
    assert ui.applyButton.enabled and ui.applyButton.toolTip == DLF_TOOLTIP
    assert ui.methodNoteLabel.text and not ui.modelFolderLabel.visible and not ui.jlfGroupBox.enabled

    ui.applyButton.click()
    assert ui.applyButton.text == "Cancel" and widget.runSection.isRunning()
    poll_until_done(widget.runSection)
    assert ui.statusLabel.text.startswith("Done in ") and not panel.recorded.errors
    assert widget._lastSegmentation is not None                        # the module's onResult hook
    assert panel.recorded.layers == [{"background": target}]
    ui.show3DCheckBox.slots["toggled(bool)"](True)
    assert widget._lastSegmentation.GetSegmentation().ContainsRepresentation("Closed surface")

    widget.onSceneStartClose(None, None)
    assert widget._parameterNode is None and widget._lastSegmentation is None
    widget.cleanup()
    assert code.DeepLabelFusionTest.selfTests and all(callable(getattr(code.DeepLabelFusionTest, name))
                                                      for name in code.DeepLabelFusionTest.selfTests)


def test_atlasnet_panel_runs_through_the_shared_code(module_file, panel, request, tmp_path):
    """AtlasNetSeg.py's panel on stand-in widgets, without a log pane: a folder that is not a model says why; a
    trained model segments the phantom (progress, status, maps, metrics); the module's self tests run through the
    shared runner (the quick one here)."""
    code = module_file("AtlasNetSeg")
    info, widget = open_panel(code, "AtlasNetSeg")
    assert info.title == "AtlasNet" and "Vakalopoulou" in info.acknowledgementText
    ui, p = widget.ui, widget._parameterNode
    assert not hasattr(ui, "logTextEdit") and widget.runSection.logWidget is None
    assert widget.training.logWidget is None
    assert ui.deviceComboBox.items == [("Auto", "auto"), ("CPU", "cpu"), ("GPU", "gpu")]
    assert ui.trainingMethodComboBox.currentData == "atlasnet"
    target, reference = phantom_target(panel.scene)
    p.targetVolume, p.modelFolder = target, tmp_path
    assert ui.modelInfoLabel.text and ui.applyButton.toolTip.startswith(ui.modelInfoLabel.text)   # what is wrong
    assert not ui.applyButton.enabled and not ui.extraModality1Selector.visible
    ui.applyButton.click()
    [message] = panel.recorded.errors
    assert message.startswith("Cannot start the segmentation: ") and "\n" not in message
    assert widget.logic.activeProcesses() == []

    p.modelFolder, p.referenceSegmentation, p.device = request.getfixturevalue("atlasnet_model"), reference, "cpu"
    assert ui.applyButton.enabled and ui.applyButton.toolTip == "Segment the target with every network of the model"
    ui.applyButton.click()
    progress = [value for value, _ in poll_until_done(widget.runSection)]
    assert progress == sorted(progress) and len(set(progress)) >= 3, progress
    assert ui.statusLabel.text.startswith("Done in ") and " s with 2 networks. Mean Dice " in ui.statusLabel.text
    assert ui.mapSelector.currentNode() is not None and ui.metricsTableView.table is not None
    assert panel.recorded.errors == [message] and widget.logic.activeProcesses() == []

    test = code.AtlasNetSegTest()
    test.selfTests = ("test_WrongModelFolderIsExplained",)
    test.runTest()
    widget.cleanup()
