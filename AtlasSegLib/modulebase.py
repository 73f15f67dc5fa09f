"""The Slicer classes every AtlasSeg module builds on (needs Slicer: imported by the module files only, never by the
Qt-free library or its tests).

:class:`AtlasSegWidget` loads the module's ``Resources/UI/<Module>.ui``, creates the module logic, the Apply part
(:class:`~AtlasSegLib.runpanel.RunSection`) and the *Train a model* section
(:class:`~AtlasSegLib.trainingpanel.TrainingSection`), binds the parameter node to the widgets and refreshes the
panel whenever it changes, and cancels the engine runs (without waiting) when the module or the scene closes. A
module's widget adds its own widgets (``setupPanel``), refreshes them (``updatePanel``), says what Apply runs
(``inputs``, ``settings``) and takes the results (``onResult``, ``onModelTrained``).

:class:`AtlasSegModule` lists the module in Slicer; :class:`AtlasSegLogic` puts a module's Qt-free logic on
``slicer.mrmlScene`` with its parameter node and the first-use installation of the engine's dependencies;
:class:`TrainingParameters` holds the Train section's parameter-node fields; :class:`AtlasSegTest` runs a module's
self tests, each from an empty scene.
"""

import pathlib
import sys
from typing import Annotated

import slicer
import vtk
from slicer.parameterNodeWrapper import WithinRange
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from .dependencies import ensureEngineDependencies
from .engine import DEVICES
from .enginepanel import DEVICE_LABELS, connectComboToParameter, fillCombo, selectComboData
from .run import EngineLogic
from .runpanel import RunSection
from .selftest import runSelfTests
from .training import DEFAULT_SIZE
from .trainingpanel import TrainingSection


class AtlasSegModule(ScriptedLoadableModule):
    """An AtlasSeg module in Slicer's module list: in the Segmentation category, by the AtlasSeg developers; a
    module gives its ``moduleTitle``, ``moduleHelpText`` and ``moduleAcknowledgementText``."""

    moduleTitle = ""
    moduleHelpText = ""
    moduleAcknowledgementText = ""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = self.moduleTitle
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["AtlasSeg developers"]
        self.parent.helpText = self.moduleHelpText
        self.parent.acknowledgementText = self.moduleAcknowledgementText


class TrainingParameters:
    """The Train section's fields of a module's parameter node: its ``@parameterNodeWrapper`` class derives from
    this one (Slicer reads the inherited annotations). No method chosen: the module's first trainable method."""

    trainingAtlasFolder: pathlib.Path
    trainingMethod: str = ""
    trainingSize: str = DEFAULT_SIZE
    trainingEpochs: Annotated[int, WithinRange(1, 100000)] = 20
    trainingDevice: str = "auto"
    trainingModelFolder: pathlib.Path


class AtlasSegLogic(ScriptedLoadableModuleLogic):
    """Slicer-side logic: the module's Qt-free logic (the next base class, an EngineLogic) on slicer.mrmlScene, its
    parameter node (``parameterNodeClass``) and the first-use dependency installation, which names
    ``engineTitle``."""

    parameterNodeClass = None
    engineTitle = ""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        EngineLogic.__init__(self, slicer.mrmlScene)

    def getParameterNode(self):
        return self.parameterNodeClass(super().getParameterNode())

    def ensureEngineDependencies(self, askConfirmation: bool = True) -> bool:
        """Install what the engine needs on first use, after asking (see AtlasSegLib.dependencies)."""
        return ensureEngineDependencies(self.engineTitle, askConfirmation)


class AtlasSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """A module panel: the module's own widgets, the Apply part and the Train section on one parameter node.

    The panel's device choice (``deviceComboBox``, the parameter ``device``) and the Train section's offer the
    engine's devices, named by ``deviceLabels``. A module sets ``applyToolTip`` (what Apply does), ``counted`` (what
    a run counts, for the status line: "atlases", "networks") and ``deviceLabels``, and implements
    ``setupPanel()``, ``updatePanel(parameterNode)``, ``inputs()``, ``settings()`` and ``onModelTrained(result)``;
    ``onResult(result)`` when it uses a finished run's results itself. A panel with an engine log pane
    (``logTextEdit``) shows the engine's output of both sections there.
    """

    applyToolTip = ""
    counted = ""
    deviceLabels = None

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.runSection = None   # the Apply part: run, progress, cancel, status, engine log, result maps
        self.training = None     # the Train a model section

    # ------------------------------------------------------------------ module hooks
    def createLogic(self):
        """The module's logic: its file's ``<Module>Logic`` class (Slicer's naming, as for ``<Module>Test``)."""
        return getattr(sys.modules[type(self).__module__], f"{self.moduleName}Logic")()

    def setupPanel(self) -> None:
        """The module's own widgets and state (``self.ui``, ``self.logic`` exist; the parameter node comes next)."""

    def updatePanel(self, parameterNode) -> None:
        """The module's own widgets from the parameter node (those not bound by name)."""

    def inputs(self):
        raise NotImplementedError

    def settings(self):
        raise NotImplementedError

    def onResult(self, result) -> None:
        """A run ended; the Apply part has shown its status, maps and metrics."""

    def onModelTrained(self, result) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath(f"UI/{self.moduleName}.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = self.createLogic()
        labels = self.deviceLabels or DEVICE_LABELS
        fillCombo(self.ui.deviceComboBox, {device: labels.get(device, device) for device in DEVICES})
        connectComboToParameter(self.ui.deviceComboBox, lambda: self._parameterNode, "device")
        self.setupPanel()
        self.runSection = RunSection(self.ui, self.logic, self.moduleName, self.inputs, self.settings,
                                     self.applyToolTip, self.counted, self.onResult)
        self.training = TrainingSection(self.ui, self.logic, self.moduleName, self.onModelTrained, self.deviceLabels,
                                        getattr(self.ui, "logTextEdit", None))

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """The module is closed (or reloaded): cancel the runs without waiting for them and stop polling."""
        if self.runSection is not None:
            self.runSection.closing("module", self.training)   # the segmentation and the training
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event) -> None:
        """The scene closes: its nodes go, so a running segmentation or training is cancelled (without waiting)."""
        self.runSection.closing("scene", self.training)
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ------------------------------------------------------------------ parameter node
    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.targetVolume:
            self._parameterNode.targetVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = parameterNode
        self.training.setParameterNode(parameterNode)
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
            self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        if self._parameterNode is None:
            return
        selectComboData(self.ui.deviceComboBox, self._parameterNode.device)
        self.updatePanel(self._parameterNode)
        self.runSection.updateButtons()
        self.training.update()


class AtlasSegTest(ScriptedLoadableModuleTest):
    """A module's self tests inside Slicer (``selfTests``: the names of its test methods), each from an empty
    scene."""

    selfTests: tuple[str, ...] = ()

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        # Reload and Test calls runTest directly: a skip (engine packages not installed yet) stays a skip
        runSelfTests(self, [getattr(self, name) for name in self.selfTests], self.setUp)
