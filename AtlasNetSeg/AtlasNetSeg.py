"""AtlasNetSeg: segment a volume with a trained AtlasNet model (one network per atlas space) in 3D Slicer.

The module is thin: the widget edits a parameter node, and the logic (AtlasNetSegLib, Qt-free, on the shared
AtlasSegLib) writes the target, runs the headless engine ``atlasseg`` in a background PythonSlicer process and
loads its outputs: the fused segmentation, probability maps per network and the networks' agreement. The *Train a
model* section (AtlasSegLib.trainingpanel) trains an AtlasNet model the same way and selects it for Apply.
"""

import importlib.util
import logging
import pathlib
import sys
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

if importlib.util.find_spec("AtlasSegLib") is None:  # source checkout: the shared library is one folder up
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from AtlasNetSegLib import (  # noqa: E402
    AtlasNetInputs,
    AtlasNetLogic,
    AtlasNetSettings,
    ModelFolderProblem,
    readModelInfo,
)

from AtlasSegLib import (  # noqa: E402
    DEFAULT_SIZE,
    DEVICES,
    MAP_KIND_ATTRIBUTE,
    EngineCancelled,
    EngineError,
    ensureEngineDependencies,
    findEngineRoot,
    missingPipDependencies,
    runSeconds,
    runSelfTests,
    torchIsInstalled,
)
from AtlasSegLib.trainingpanel import TrainingSection  # noqa: E402

POLL_MILLISECONDS = 200
DEVICE_LABELS = {"auto": "Auto", "cpu": "CPU", "gpu": "GPU"}


class AtlasNetSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "AtlasNet"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["AtlasSeg developers"]
        self.parent.helpText = (
            "Segment a target volume with a trained AtlasNet model: the target is registered to each of the "
            "model's atlases, each atlas's network segments it in that atlas's space, and the predictions are "
            "warped back and fused. Results (segmentation, probability maps per network, the networks' agreement "
            "and, with a reference, a Dice / HD95 table) appear in one subject-hierarchy folder per run. Train a "
            "model in the Train a model section (or with 'atlasseg train --method atlasnet'). See the "
            "<a href='https://github.com/atlasseg/SlicerAtlasSeg'>documentation</a>.")
        self.parent.acknowledgementText = "AtlasNet after Vakalopoulou et al. (MICCAI 2018)."


@parameterNodeWrapper
class AtlasNetSegParameterNode:
    """Everything the panel edits; saved with the scene."""

    targetVolume: vtkMRMLScalarVolumeNode
    extraModality1: vtkMRMLScalarVolumeNode
    extraModality2: vtkMRMLScalarVolumeNode
    referenceSegmentation: vtkMRMLSegmentationNode
    modelFolder: pathlib.Path
    device: str = "auto"
    networkSegmentations: bool = False
    # the Train a model section
    trainingAtlasFolder: pathlib.Path
    trainingMethod: str = "atlasnet"
    trainingSize: str = DEFAULT_SIZE
    trainingEpochs: Annotated[int, WithinRange(1, 100000)] = 20
    trainingDevice: str = "auto"
    trainingModelFolder: pathlib.Path


def _pathText(path) -> str:
    text = str(path or "")
    return "" if text in ("", ".") else text


class AtlasNetSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None
        self.training = None    # the Train a model section
        self._modalities = []   # the chosen model's modalities (empty while the folder is not a usable model)
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_MILLISECONDS)
        self._timer.connect("timeout()", self.onPollRun)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/AtlasNetSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = AtlasNetSegLogic()

        for device in DEVICES:
            self.ui.deviceComboBox.addItem(DEVICE_LABELS.get(device, device), device)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.mapSelector.addAttribute("vtkMRMLScalarVolumeNode", MAP_KIND_ATTRIBUTE)
        self.ui.mapSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onMapSelected)
        self.ui.mapOpacitySlider.connect("valueChanged(double)", self.onMapOpacityChanged)
        self.ui.progressBar.hide()
        self.training = TrainingSection(self.ui, self.logic, "AtlasNetSeg", self.onModelTrained, DEVICE_LABELS)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """The module is closed (or reloaded): cancel the run without waiting for it and stop polling."""
        if self.logic is not None:
            self.logic.cancelActiveRuns()   # the segmentation and the training
        self._forgetRun("Cancelled: the module was closed.")
        if self.training is not None:
            self.training.forget("Cancelled: the module was closed; Resume continues from the last finished epoch.")
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event) -> None:
        """The scene closes: its nodes go, so a running segmentation is cancelled (without waiting for it)."""
        self.logic.onSceneStartClose()
        self._forgetRun("Cancelled: the scene was closed.")
        self.training.forget("Cancelled: the scene was closed; Resume continues from the last finished epoch.")
        self.setParameterNode(None)

    def _forgetRun(self, message: str) -> None:
        """Stop polling a run that was cancelled from elsewhere (scene or module closed)."""
        self._timer.stop()
        if self._run is None:
            return
        self._run = None
        self.ui.progressBar.hide()
        self.ui.statusLabel.text = message
        self.ui.applyButton.text = "Apply"

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

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

    # ------------------------------------------------------------------ parameter node <-> widgets not bound by name
    def updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        wasBlocked = self.ui.deviceComboBox.blockSignals(True)
        self.ui.deviceComboBox.setCurrentIndex(max(self.ui.deviceComboBox.findData(p.device), 0))
        self.ui.deviceComboBox.blockSignals(wasBlocked)
        self._updateModelInfo(_pathText(p.modelFolder))
        self._updateApplyButton()
        self.training.update()

    def _updateModelInfo(self, folder: str) -> None:
        """What the model is (or what is wrong with the folder), and one target selector per model modality."""
        try:
            model = readModelInfo(folder)
        except ModelFolderProblem as problem:
            model, self.ui.modelInfoLabel.text = None, str(problem)
        else:
            self.ui.modelInfoLabel.text = model.summary()
        modalities = self._modalities = model.modalities if model is not None else []
        self.ui.targetVolumeLabel.text = f"Target volume ({modalities[0]}):" if modalities else "Target volume:"
        for k, (label, selector) in enumerate(((self.ui.extraModality1Label, self.ui.extraModality1Selector),
                                               (self.ui.extraModality2Label, self.ui.extraModality2Selector)),
                                              start=1):
            label.visible = selector.visible = k < len(modalities)
            if k < len(modalities):
                label.text = f"Modality {k + 1} ({modalities[k]}):"

    def onDeviceChanged(self, _index: int) -> None:
        if self._parameterNode is not None:
            self._parameterNode.device = self.ui.deviceComboBox.currentData

    # ------------------------------------------------------------------ inputs and settings
    def _inputs(self) -> AtlasNetInputs:
        """The target and as many further modalities as the model takes (hidden selectors are ignored)."""
        p = self._parameterNode
        extra = [node for node in (p.extraModality1, p.extraModality2)[:max(len(self._modalities) - 1, 0)]
                 if node is not None]
        return AtlasNetInputs(p.targetVolume, extra, p.referenceSegmentation)

    def _settings(self) -> AtlasNetSettings:
        p = self._parameterNode
        return AtlasNetSettings(_pathText(p.modelFolder), p.device, p.networkSegmentations)

    def _updateApplyButton(self) -> None:
        if self._run is not None:
            cancelling = self._run.isCancelling()
            self.ui.applyButton.text = "Cancelling..." if cancelling else "Cancel"
            self.ui.applyButton.enabled = not cancelling
            self.ui.applyButton.toolTip = "Stop the running segmentation"
            return
        problems = self.logic.inputProblems(self._inputs(), self._settings())
        self.ui.applyButton.text = "Apply"
        self.ui.applyButton.enabled = not problems
        self.ui.applyButton.toolTip = " ".join(problems) or "Segment the target with every network of the model"

    # ------------------------------------------------------------------ run
    def onApplyButton(self) -> None:
        if self._run is not None:   # Cancel: returns at once; the timer sees the engine end (killed after a grace)
            self._run.requestCancel()
            self.ui.statusLabel.text = "Cancelling..."
            self._updateApplyButton()
            return
        if not self.logic.ensureEngineDependencies():
            return
        try:
            self._run = self.logic.startRun(self._inputs(), self._settings())
        except EngineError as error:
            slicer.util.errorDisplay(f"Cannot start the segmentation: {error}")
            return
        logging.info("AtlasNetSeg: running %s", " ".join(self._run.prepared.command))
        self.ui.progressBar.setValue(0)
        self.ui.progressBar.show()
        self.ui.statusLabel.text = "Starting the engine..."
        self._updateApplyButton()
        self._timer.start()

    def onPollRun(self) -> None:
        run = self._run
        if run is None:
            self._timer.stop()
            return
        run.poll()
        self.ui.progressBar.setValue(int(round(1000 * run.lastProgress.fraction)))
        if not run.isCancelling():
            self.ui.statusLabel.text = run.lastProgress.message
        if run.isRunning():
            self._updateApplyButton()
            return
        self._timer.stop()
        self._run = None
        try:
            with slicer.util.WaitCursor():
                result = run.finish()
        except EngineCancelled:
            self.ui.statusLabel.text = "Cancelled."
        except EngineError as error:
            logging.error("AtlasNetSeg engine log:\n%s", run.log)
            self.ui.statusLabel.text = "Failed."
            slicer.util.errorDisplay(f"Segmentation failed: {error}")
        else:
            self._showResult(result)
        finally:
            self.ui.progressBar.hide()
            self._updateApplyButton()

    def _showResult(self, result) -> None:
        seconds = runSeconds(result.run)
        summary = f"Done in {seconds:.0f} s with {len(result.run.get('networks', []))} networks."
        if result.metrics:
            summary += f" Mean Dice {result.metrics['mean']['dice']:.3f}."
        self.ui.statusLabel.text = summary
        slicer.util.setSliceViewerLayers(background=self._parameterNode.targetVolume)
        if result.metricsTable is not None:
            self.ui.metricsTableView.setMRMLTableNode(result.metricsTable)
        if result.agreement is not None:
            self.ui.mapSelector.setCurrentNode(result.agreement)

    def onModelTrained(self, result) -> None:
        """A training ended: its model is the one Apply uses."""
        if self._parameterNode is not None:
            self._parameterNode.modelFolder = pathlib.Path(result.modelFolder)

    # ------------------------------------------------------------------ results
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


class AtlasNetSegLogic(ScriptedLoadableModuleLogic, AtlasNetLogic):
    """Slicer-side logic: the Qt-free AtlasNetLogic on slicer.mrmlScene plus first-use dependency installs.

    Python console::

        logic = slicer.util.getModuleLogic("AtlasNetSeg")
        result = logic.runBlocking(AtlasNetInputs(getNode("target")), AtlasNetSettings(modelFolder="/models/an"))
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        AtlasNetLogic.__init__(self, slicer.mrmlScene)

    def getParameterNode(self) -> AtlasNetSegParameterNode:
        return AtlasNetSegParameterNode(super().getParameterNode())

    def ensureEngineDependencies(self, askConfirmation: bool = True) -> bool:
        """Install what the engine needs on first use, after asking (see AtlasSegLib.dependencies)."""
        return ensureEngineDependencies("AtlasNet", askConfirmation)


class AtlasNetSegTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer: the model-folder check, then a tiny model trained on phantoms and used through the
    logic on an oblique target."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        # Reload and Test calls runTest directly: a skip (engine packages not installed yet) stays a skip
        runSelfTests(self, [self.test_WrongModelFolderIsExplained, self.test_PhantomSegmentation], self.setUp)

    def test_WrongModelFolderIsExplained(self):
        import tempfile

        folder = pathlib.Path(tempfile.mkdtemp())
        with self.assertRaises(ModelFolderProblem):
            readModelInfo(folder)
        (folder / "config.json").write_text('{"format": "atlasseg-model", "version": 2, "method": "dlf"}')
        with self.assertRaisesRegex(ModelFolderProblem, "not an AtlasNet model"):
            readModelInfo(folder)
        self.delayDisplay("wrong model folders are explained")

    def test_PhantomSegmentation(self):
        import numpy as np

        from AtlasSegLib import updateVolumeNodeFromImage

        if missingPipDependencies() or not torchIsInstalled():
            self.skipTest("engine dependencies missing: open the AtlasNet module once to install them")
        sys.path.insert(0, str(findEngineRoot()))
        import SimpleITK as sitk

        from atlasseg.phantom import make_phantom

        model = self._trainTinyModel()
        image, _ = make_phantom(999, shape=(22, 26, 18), spacing=(1.3, 1.6, 2.2),
                                direction=tuple(sitk.VersorTransform((0.2, -0.4, 0.9), 0.35).GetMatrix()))
        target = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "phantom target")
        updateVolumeNodeFromImage(target, image)
        result = AtlasNetSegLogic().runBlocking(
            AtlasNetInputs(target), AtlasNetSettings(str(model), "cpu", networkSegmentations=True),
            onProgress=lambda fraction, message: self.delayDisplay(f"{fraction:.0%} {message}", 10))
        self.assertEqual(len(result.networkProbabilityMaps), 2)
        self.assertEqual(len(result.networkSegmentations), 2)
        self.assertIsNotNone(result.agreement)
        self.assertTrue(np.all(slicer.util.arrayFromVolume(result.agreement) >= 0.0))
        self.delayDisplay(f"phantom segmented with {len(result.networkProbabilityMaps)} networks")

    def _trainTinyModel(self) -> pathlib.Path:
        """Two 4-8-16 U-Nets on four phantoms, affine registrations: about 20 s on a laptop CPU."""
        import subprocess
        import tempfile

        from atlasseg.phantom import make_phantom_atlas_set
        from AtlasSegLib import engineEnvironment, pythonExecutable

        work = pathlib.Path(tempfile.mkdtemp())
        make_phantom_atlas_set(work / "atlases", n_cases=4, seed=1, shape=(24, 24, 24), spacing=(1.5, 1.5, 1.5))
        self.delayDisplay("training a tiny AtlasNet model (about 20 s)")
        subprocess.run([pythonExecutable(), "-m", "atlasseg", "train", "--method", "atlasnet", "--atlases",
                        str(work / "atlases"), "--output", str(work / "model"), "--n-networks", "2",
                        "--backbone-kwargs", '{"channels": [4, 8, 16]}', "--epochs", "8", "--patch-size", "16", "16",
                        "16", "--learning-rate", "0.01", "--val-fraction", "0.25", "--preset", "affine", "--device",
                        "cpu", "--quiet"], check=True, env=engineEnvironment(findEngineRoot()))
        return work / "model"
