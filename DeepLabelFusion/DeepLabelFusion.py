"""DeepLabelFusion: multi-atlas segmentation (majority, weighted voting, JLF, STAPLE, Deep Label Fusion) in 3D Slicer.

The module is thin: the widget edits a parameter node, and the logic (DeepLabelFusionLib, Qt-free) writes the
inputs, runs the headless engine ``atlasseg`` in a background PythonSlicer process and loads its outputs. The
*Train a model* section (AtlasSegLib.trainingpanel) trains a Deep Label Fusion model the same way and selects it
for Apply.
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
from DeepLabelFusionLib import (  # noqa: E402
    BACKENDS,
    DEFAULT_BACKEND,
    DEFAULT_PRESET,
    DEVICES,
    JLF_DEFAULTS,
    MAP_KIND_ATTRIBUTE,
    METHODS,
    PRESETS,
    EngineCancelled,
    EngineError,
    FusionInputs,
    FusionLogic,
    FusionSettings,
    methodDescription,
    readAtlasFolderModalities,
)

from AtlasSegLib import (  # noqa: E402
    DEFAULT_SIZE,
    ensureEngineDependencies,
    findEngineRoot,
    missingPipDependencies,
    runSeconds,
    runSelfTests,
    torchIsInstalled,
)
from AtlasSegLib.trainingpanel import TrainingSection  # noqa: E402

POLL_MILLISECONDS = 200
# what the panel's choices are called on screen (the engine's names are the combo boxes' data)
BACKEND_LABELS = {"torch": "Built-in (PyTorch; GPU when present)", "greedy": "Greedy (PICSL; CPU)"}
PRESET_LABELS = {"fast": "Fast (preview)", "default": "Default", "accurate": "Accurate (slower)",
                 "affine": "Affine only"}
DEVICE_LABELS = {"auto": "Auto (GPU when available)", "cpu": "CPU", "gpu": "GPU (CUDA)"}


class DeepLabelFusion(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Deep Label Fusion"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["AtlasSeg developers"]
        self.parent.helpText = (
            "Segment a target volume with a set of atlases: every atlas is registered to the target and the "
            "warped atlas labels are fused by majority voting, local weighted voting, joint label fusion, STAPLE "
            "or Deep Label Fusion. Results (segmentation, vote and agreement maps, on request weight maps per "
            "atlas, and with a reference the oracle coverage map and Dice / HD95 table) appear in one "
            "subject-hierarchy folder per run; the segmentation can instead overwrite an existing one. "
            "See the <a href='https://github.com/atlasseg/SlicerAtlasSeg'>documentation</a>.")
        self.parent.acknowledgementText = (
            "Joint label fusion after Wang & Yushkevich (2013); Deep Label Fusion after Xie et al. (MedIA 2023).")


@parameterNodeWrapper
class DeepLabelFusionParameterNode:
    """Everything the panel edits; saved with the scene."""

    targetVolume: vtkMRMLScalarVolumeNode
    extraModality1: vtkMRMLScalarVolumeNode
    extraModality2: vtkMRMLScalarVolumeNode
    referenceSegmentation: vtkMRMLSegmentationNode
    outputSegmentation: vtkMRMLSegmentationNode
    show3D: bool = False
    weightMaps: bool = False
    atlasesFromScene: bool = False
    atlasFolder: pathlib.Path
    atlasImages: list[vtkMRMLScalarVolumeNode]
    atlasSegmentations: list[vtkMRMLSegmentationNode]
    method: str = "jlf"
    modelFolder: pathlib.Path
    nAtlases: Annotated[int, WithinRange(1, 500)] = 10
    backend: str = DEFAULT_BACKEND
    preset: str = DEFAULT_PRESET
    device: str = "auto"
    jlfAlpha: Annotated[float, WithinRange(0.0, 100.0)] = JLF_DEFAULTS["alpha"]
    jlfBeta: Annotated[float, WithinRange(0.0, 100.0)] = JLF_DEFAULTS["beta"]
    jlfPatchRadius: Annotated[int, WithinRange(0, 10)] = JLF_DEFAULTS["patch_radius"]
    jlfSearchRadius: Annotated[int, WithinRange(0, 10)] = JLF_DEFAULTS["search_radius"]
    seed: int = 0
    # the Train a model section
    trainingAtlasFolder: pathlib.Path
    trainingMethod: str = "dlf"
    trainingSize: str = DEFAULT_SIZE
    trainingEpochs: Annotated[int, WithinRange(1, 100000)] = 20
    trainingDevice: str = "auto"
    trainingModelFolder: pathlib.Path


def _pathText(path) -> str:
    text = str(path or "")
    return "" if text in ("", ".") else text


class DeepLabelFusionWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None
        self.training = None            # the Train a model section
        self._lastSegmentation = None   # the last run's segmentation, for "Show in 3D" after the run
        self._modalityCount = None      # modalities of the chosen atlas set (None: not known)
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_MILLISECONDS)
        self._timer.connect("timeout()", self.onPollRun)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DeepLabelFusion.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DeepLabelFusionLogic()

        self._fillCombo(self.ui.methodComboBox, METHODS)
        self._fillCombo(self.ui.backendComboBox, {b: BACKEND_LABELS.get(b, b) for b in BACKENDS})
        self._fillCombo(self.ui.presetComboBox, {p: PRESET_LABELS.get(p, p.capitalize()) for p in PRESETS})
        self._fillCombo(self.ui.deviceComboBox, {d: DEVICE_LABELS.get(d, d) for d in DEVICES})
        for combo, name in ((self.ui.methodComboBox, "method"), (self.ui.backendComboBox, "backend"),
                            (self.ui.presetComboBox, "preset"), (self.ui.deviceComboBox, "device")):
            combo.connect("currentIndexChanged(int)", lambda _index, c=combo, n=name: self._comboChanged(c, n))
        self.ui.atlasFolderRadioButton.connect("toggled(bool)", self.onAtlasSourceChanged)
        self.ui.addAtlasPairButton.connect("clicked()", self.onAddAtlasPair)
        self.ui.removeAtlasPairButton.connect("clicked()", self.onRemoveAtlasPair)
        self.ui.atlasSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onAtlasSegmentationPicked)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.mapSelector.addAttribute("vtkMRMLScalarVolumeNode", MAP_KIND_ATTRIBUTE)
        self.ui.mapSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onMapSelected)
        self.ui.mapOpacitySlider.connect("valueChanged(double)", self.onMapOpacityChanged)
        self.ui.show3DCheckBox.connect("toggled(bool)", self.onShow3DToggled)
        self.ui.progressBar.hide()
        self.training = TrainingSection(self.ui, self.logic, "DeepLabelFusion", self.onModelTrained, DEVICE_LABELS,
                                        self.ui.logTextEdit)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    @staticmethod
    def _fillCombo(combo, items: dict) -> None:
        combo.clear()
        for value, text in items.items():
            combo.addItem(text, value)

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
        self._lastSegmentation = None
        self.setParameterNode(None)

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
        for combo, value in ((self.ui.methodComboBox, p.method), (self.ui.backendComboBox, p.backend),
                             (self.ui.presetComboBox, p.preset), (self.ui.deviceComboBox, p.device)):
            wasBlocked = combo.blockSignals(True)
            combo.setCurrentIndex(max(combo.findData(value), 0))
            combo.blockSignals(wasBlocked)
        self.ui.atlasFolderRadioButton.blockSignals(True)
        self.ui.atlasFolderRadioButton.checked = not p.atlasesFromScene
        self.ui.atlasSceneRadioButton.checked = p.atlasesFromScene
        self.ui.atlasFolderRadioButton.blockSignals(False)
        self.ui.atlasFolderWidget.visible = not p.atlasesFromScene
        self.ui.atlasPairsWidget.visible = p.atlasesFromScene
        self.ui.methodNoteLabel.text = methodDescription(p.method)
        self.ui.modelFolderLabel.visible = self.ui.modelFolderPathLineEdit.visible = p.method == "dlf"
        self.ui.jlfGroupBox.enabled = p.method == "jlf"
        self._updateModalityLabels()
        self._updateAtlasPairsTable()
        self._updateApplyButton()
        self.training.update()

    def _updateModalityLabels(self) -> None:
        """The target's label names its modality as the atlas set does; one selector per further modality of the
        set (all of them while the set is not known)."""
        p = self._parameterNode
        modalities = [] if p.atlasesFromScene else readAtlasFolderModalities(_pathText(p.atlasFolder))
        self._modalityCount = 1 if p.atlasesFromScene else (len(modalities) or None)
        self.ui.targetVolumeLabel.text = (f"Target volume (modality 1: {modalities[0]}):" if modalities
                                          else "Target volume (modality 1):")
        for k, (label, selector) in enumerate(((self.ui.extraModality1Label, self.ui.extraModality1Selector),
                                               (self.ui.extraModality2Label, self.ui.extraModality2Selector)),
                                              start=1):
            label.visible = selector.visible = self._modalityCount is None or k < self._modalityCount
            label.text = f"Modality {k + 1} ({modalities[k]}):" if k < len(modalities) else f"Modality {k + 1}:"

    def _comboChanged(self, combo, parameterName: str) -> None:
        if self._parameterNode is not None:
            setattr(self._parameterNode, parameterName, combo.currentData)

    def onAtlasSourceChanged(self, folderChecked: bool) -> None:
        if self._parameterNode is not None:
            self._parameterNode.atlasesFromScene = not folderChecked

    def onAtlasSegmentationPicked(self, segmentationNode) -> None:
        """Pre-select the segmentation's source volume as the atlas image when Slicer knows it."""
        if segmentationNode is None:
            return
        source = segmentationNode.GetNodeReference(segmentationNode.GetReferenceImageGeometryReferenceRole())
        if source is not None and source.IsA("vtkMRMLScalarVolumeNode"):
            self.ui.atlasImageSelector.setCurrentNode(source)

    def onAddAtlasPair(self) -> None:
        image, segmentation = self.ui.atlasImageSelector.currentNode(), self.ui.atlasSegmentationSelector.currentNode()
        if image is None or segmentation is None:
            slicer.util.warningDisplay("Select an atlas image and its segmentation first.")
            return
        with slicer.util.NodeModify(self._parameterNode.parameterNode):
            self._parameterNode.atlasImages = [*self._parameterNode.atlasImages, image]
            self._parameterNode.atlasSegmentations = [*self._parameterNode.atlasSegmentations, segmentation]

    def onRemoveAtlasPair(self) -> None:
        rows = sorted({index.row() for index in self.ui.atlasPairsTableWidget.selectedIndexes()}, reverse=True)
        images, segmentations = list(self._parameterNode.atlasImages), list(self._parameterNode.atlasSegmentations)
        for row in rows:
            del images[row], segmentations[row]
        with slicer.util.NodeModify(self._parameterNode.parameterNode):
            self._parameterNode.atlasImages = images
            self._parameterNode.atlasSegmentations = segmentations

    def _updateAtlasPairsTable(self) -> None:
        pairs = list(zip(self._parameterNode.atlasImages, self._parameterNode.atlasSegmentations))
        table = self.ui.atlasPairsTableWidget
        table.setRowCount(len(pairs))
        for row, (image, segmentation) in enumerate(pairs):
            for column, node in enumerate((image, segmentation)):
                table.setItem(row, column, qt.QTableWidgetItem(node.GetName() if node else "(deleted)"))

    # ------------------------------------------------------------------ inputs and settings
    def _inputs(self) -> FusionInputs:
        p = self._parameterNode
        extra = [n for n in (p.extraModality1, p.extraModality2) if n is not None]
        if self._modalityCount is not None:   # selectors hidden for this atlas set are ignored
            extra = [n for n in (p.extraModality1, p.extraModality2)[:self._modalityCount - 1] if n is not None]
        pairs = list(zip(p.atlasImages, p.atlasSegmentations)) if p.atlasesFromScene else []
        return FusionInputs(p.targetVolume, extra, "" if p.atlasesFromScene else _pathText(p.atlasFolder), pairs,
                            p.referenceSegmentation, p.outputSegmentation)

    def _settings(self) -> FusionSettings:
        p = self._parameterNode
        return FusionSettings(p.method, p.nAtlases, p.backend, p.preset, p.device, _pathText(p.modelFolder),
                              p.jlfAlpha, p.jlfBeta, p.jlfPatchRadius, p.jlfSearchRadius, p.seed,
                              weightMaps=p.weightMaps, show3D=p.show3D)

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
        self.ui.applyButton.toolTip = " ".join(problems) or "Register the atlases to the target and fuse their labels"

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
        logging.info("DeepLabelFusion: running %s", " ".join(self._run.prepared.command))
        self.ui.logTextEdit.clear()
        self.ui.logTextEdit.appendPlainText("$ " + " ".join(self._run.prepared.command))
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
        self._appendLog(run.newLogLines())
        self.ui.progressBar.setValue(int(round(1000 * run.lastProgress.fraction)))
        if not run.isCancelling():
            self.ui.statusLabel.text = run.lastProgress.message
        if run.isRunning():
            self._updateApplyButton()
            return
        self._appendLog(run.newLogLines())
        self._timer.stop()
        self._run = None
        try:
            with slicer.util.WaitCursor():
                result = run.finish()
        except EngineCancelled:
            self.ui.statusLabel.text = "Cancelled."
        except EngineError as error:
            logging.error("DeepLabelFusion engine log:\n%s", run.log)
            self.ui.statusLabel.text = "Failed."
            self.ui.logCollapsibleButton.collapsed = False   # the engine's own words, next to the message
            slicer.util.errorDisplay(f"Segmentation failed: {error}")
        else:
            self._showResult(result)
        finally:
            self.ui.progressBar.hide()
            self._updateApplyButton()

    def _appendLog(self, lines) -> None:
        if lines:
            self.ui.logTextEdit.appendPlainText("\n".join(lines))

    def _forgetRun(self, message: str) -> None:
        """Stop polling a run that was cancelled from elsewhere (scene or module closed)."""
        self._timer.stop()
        if self._run is None:
            return
        self._run = None
        self.ui.progressBar.hide()
        self.ui.statusLabel.text = message
        self.ui.applyButton.text = "Apply"

    def _showResult(self, result) -> None:
        seconds = runSeconds(result.run)
        summary = f"Done in {seconds:.0f} s with {len(result.run.get('atlases', []))} atlases."
        if result.metrics:
            summary += f" Mean Dice {result.metrics['mean']['dice']:.3f}."
        self.ui.statusLabel.text = summary
        self._lastSegmentation = result.segmentation
        slicer.util.setSliceViewerLayers(background=self._parameterNode.targetVolume)
        if result.metricsTable is not None:
            self.ui.metricsTableView.setMRMLTableNode(result.metricsTable)
        if result.agreement is not None:
            self.ui.mapSelector.setCurrentNode(result.agreement)

    def onModelTrained(self, result) -> None:
        """A training ended: its model is the one Apply uses (Deep Label Fusion), on its atlas set when none is
        chosen yet."""
        p = self._parameterNode
        if p is None:
            return
        with slicer.util.NodeModify(p.parameterNode):
            p.modelFolder = pathlib.Path(result.modelFolder)
            if result.method in METHODS:
                p.method = result.method
            if not p.atlasesFromScene and not _pathText(p.atlasFolder):
                p.atlasFolder = p.trainingAtlasFolder
        self.ui.settingsCollapsibleButton.collapsed = False

    def onShow3DToggled(self, show: bool) -> None:
        """After a run, the checkbox shows or hides that run's segmentation in 3D at once."""
        node = self._lastSegmentation
        if node is not None and slicer.mrmlScene.IsNodePresent(node):
            self.logic.showIn3D(node, show)

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


class DeepLabelFusionLogic(ScriptedLoadableModuleLogic, FusionLogic):
    """Slicer-side logic: the Qt-free FusionLogic on slicer.mrmlScene plus first-use dependency installs.

    Python console::

        logic = slicer.util.getModuleLogic("DeepLabelFusion")
        result = logic.runBlocking(FusionInputs(getNode("target"), atlasFolder="/data/atlases"),
                                   FusionSettings(method="jlf", nAtlases=5))
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        FusionLogic.__init__(self, slicer.mrmlScene)

    def getParameterNode(self) -> DeepLabelFusionParameterNode:
        return DeepLabelFusionParameterNode(super().getParameterNode())

    def ensureEngineDependencies(self, askConfirmation: bool = True) -> bool:
        """Install what the engine needs on first use, after asking (see AtlasSegLib.dependencies)."""
        return ensureEngineDependencies("Deep Label Fusion", askConfirmation)


class DeepLabelFusionTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer: geometry round trip and a phantom segmentation end to end through the logic."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        # Reload and Test calls runTest directly: a skip (engine packages not installed yet) stays a skip
        runSelfTests(self, [self.test_GeometryRoundTrip, self.test_PhantomSegmentation], self.setUp)

    def test_GeometryRoundTrip(self):
        import numpy as np
        import SimpleITK as sitk
        from DeepLabelFusionLib import ijkToRasFromImage, updateVolumeNodeFromImage, volumeNodeToImage

        image = sitk.GetImageFromArray(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6))
        image.SetSpacing((0.7, 1.3, 2.9))
        image.SetOrigin((12.5, -30.25, 7.0))
        rotation = sitk.VersorTransform((0.3, -0.5, 0.8), 0.4)
        image.SetDirection(rotation.GetMatrix())
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "oblique")
        updateVolumeNodeFromImage(node, image)
        matrix = vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(matrix)
        expected = ijkToRasFromImage(image)
        for r in range(4):
            for c in range(4):
                self.assertAlmostEqual(matrix.GetElement(r, c), expected[r, c], places=9)
        back = volumeNodeToImage(node)
        np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=1e-12)
        np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-12)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
        self.delayDisplay("geometry round trip exact")

    def test_PhantomSegmentation(self):
        import tempfile

        import numpy as np
        import SimpleITK as sitk
        from DeepLabelFusionLib import updateVolumeNodeFromImage

        sys.path.insert(0, str(findEngineRoot()))
        from atlasseg.phantom import make_phantom, make_phantom_atlas_set

        geometry = {"shape": (24, 28, 24), "spacing": (1.5, 1.3, 1.6)}
        folder = pathlib.Path(tempfile.mkdtemp()) / "atlases"
        make_phantom_atlas_set(folder, n_cases=3, seed=5, **geometry)
        image, labels = make_phantom(999, **geometry)
        target = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "phantom target")
        updateVolumeNodeFromImage(target, image)
        reference = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "phantom reference")
        updateVolumeNodeFromImage(reference, labels)
        logic = DeepLabelFusionLogic()
        if missingPipDependencies() or not torchIsInstalled():
            self.skipTest("engine dependencies missing: open the Deep Label Fusion module once to install them")
        result = logic.runBlocking(
            FusionInputs(target, atlasFolder=str(folder), referenceSegmentation=reference),
            FusionSettings(method="weighted", nAtlases=3, preset="fast", device="cpu", weightMaps=True, show3D=True),
            onProgress=lambda fraction, message: self.delayDisplay(f"{fraction:.0%} {message}", 10))
        names = {result.segmentation.GetSegmentation().GetNthSegment(k).GetName()
                 for k in range(result.segmentation.GetSegmentation().GetNumberOfSegments())}
        self.assertEqual(names, {"tissue", "ventricles", "deep nucleus", "hippocampus"})
        self.assertEqual(len(result.weightMaps), 3)
        self.assertTrue(result.segmentation.GetSegmentation().ContainsRepresentation("Closed surface"))
        self.assertGreater(result.metrics["labels"]["1"]["dice"], 0.8)
        labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        slicer.modules.segmentations.logic().ExportAllSegmentsToLabelmapNode(result.segmentation, labelmap)
        self.assertTrue(np.any(slicer.util.arrayFromVolume(labelmap)))
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(reference), sitk.GetArrayFromImage(labels)))
        self.delayDisplay(f"phantom segmented, tissue Dice {result.metrics['labels']['1']['dice']:.3f}")
