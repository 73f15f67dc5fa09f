"""DeepLabelFusion: multi-atlas segmentation (majority, weighted voting, JLF, STAPLE, Deep Label Fusion) in 3D Slicer.

The module is thin: the widget edits a parameter node, and the logic (DeepLabelFusionLib, Qt-free) writes the
inputs, runs the headless engine ``atlasseg`` in a background PythonSlicer process and loads its outputs. The
*Train a model* section (AtlasSegLib.trainingpanel) trains a Deep Label Fusion model the same way and selects it
for Apply. What every AtlasSeg panel does (Apply, progress, cancel, status, engine log, result maps: AtlasSegLib.
runpanel; the parameter node and closing: AtlasSegLib.modulebase) is shared; this file holds the module's own
widgets and words.
"""

import importlib.util
import pathlib
import sys
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper

if importlib.util.find_spec("AtlasSegLib") is None:  # source checkout: the shared library is one folder up
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from DeepLabelFusionLib import (  # noqa: E402
    BACKENDS,
    DEFAULT_BACKEND,
    DEFAULT_PRESET,
    JLF_DEFAULTS,
    METHODS,
    PRESETS,
    FusionInputs,
    FusionLogic,
    FusionSettings,
    methodDescription,
    readAtlasFolderModalities,
)

from AtlasSegLib import findEngineRoot, missingPipDependencies, torchIsInstalled  # noqa: E402
from AtlasSegLib.enginepanel import connectComboToParameter, fillCombo, pathText, selectComboData  # noqa: E402
from AtlasSegLib.modulebase import (  # noqa: E402
    AtlasSegLogic,
    AtlasSegModule,
    AtlasSegTest,
    AtlasSegWidget,
    TrainingParameters,
)
from AtlasSegLib.sampledata import modelOffer, registerSampleData  # noqa: E402

# what the panel's choices are called on screen (the engine's names are the combo boxes' data)
BACKEND_LABELS = {"torch": "Built-in (PyTorch; GPU when present)", "greedy": "Greedy (PICSL; CPU)"}
PRESET_LABELS = {"fast": "Fast (preview)", "default": "Default", "accurate": "Accurate (slower)",
                 "affine": "Affine only"}
DEVICE_LABELS = {"auto": "Auto (GPU when available)", "cpu": "CPU", "gpu": "GPU (CUDA)"}


class DeepLabelFusion(AtlasSegModule):
    moduleTitle = "Deep Label Fusion"
    moduleHelpText = (
        "Segment a target volume with a set of atlases: every atlas is registered to the target and the "
        "warped atlas labels are fused by majority voting, local weighted voting, joint label fusion, STAPLE "
        "or Deep Label Fusion. Results (segmentation, vote and agreement maps, on request weight maps per "
        "atlas, and with a reference the oracle coverage map and Dice / HD95 table) appear in one "
        "subject-hierarchy folder per run; the segmentation can instead overwrite an existing one. "
        "See the <a href='https://github.com/atlasseg/SlicerAtlasSeg'>documentation</a>.")
    moduleAcknowledgementText = (
        "Joint label fusion after Wang & Yushkevich (2013); Deep Label Fusion after Xie et al. (MedIA 2023). "
        "Sample data: Medical Segmentation Decathlon Task04 Hippocampus (CC BY-SA 4.0; Simpson et al. 2019, "
        "Antonelli et al. 2022).")

    def __init__(self, parent):
        super().__init__(parent)
        # the sample atlas set in Sample Data, once the application (and Sample Data) has started
        slicer.app.connect("startupCompleted()", lambda: registerSampleData("DeepLabelFusion"))


@parameterNodeWrapper
class DeepLabelFusionParameterNode(TrainingParameters):
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


class DeepLabelFusionWidget(AtlasSegWidget):
    applyToolTip = "Register the atlases to the target and fuse their labels"
    counted = "atlases"
    deviceLabels = DEVICE_LABELS

    # ------------------------------------------------------------------ setup
    def setupPanel(self) -> None:
        fillCombo(self.ui.methodComboBox, METHODS)
        fillCombo(self.ui.backendComboBox, {b: BACKEND_LABELS.get(b, b) for b in BACKENDS})
        fillCombo(self.ui.presetComboBox, {p: PRESET_LABELS.get(p, p.capitalize()) for p in PRESETS})
        for combo, name in ((self.ui.methodComboBox, "method"), (self.ui.backendComboBox, "backend"),
                            (self.ui.presetComboBox, "preset")):
            connectComboToParameter(combo, lambda: self._parameterNode, name)
        self.ui.atlasFolderRadioButton.connect("toggled(bool)", self.onAtlasSourceChanged)
        self.ui.addAtlasPairButton.connect("clicked()", self.onAddAtlasPair)
        self.ui.removeAtlasPairButton.connect("clicked()", self.onRemoveAtlasPair)
        self.ui.atlasSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onAtlasSegmentationPicked)
        self.ui.show3DCheckBox.connect("toggled(bool)", self.onShow3DToggled)
        self._lastSegmentation = None   # the last run's segmentation, for "Show in 3D" after the run
        self._modalityCount = None      # modalities of the chosen atlas set (None: not known)

    def onSceneStartClose(self, caller, event) -> None:
        self._lastSegmentation = None
        super().onSceneStartClose(caller, event)

    # ------------------------------------------------------------------ parameter node <-> widgets not bound by name
    def updatePanel(self, p) -> None:
        for combo, value in ((self.ui.methodComboBox, p.method), (self.ui.backendComboBox, p.backend),
                             (self.ui.presetComboBox, p.preset)):
            selectComboData(combo, value)
        self.ui.atlasFolderRadioButton.blockSignals(True)
        self.ui.atlasFolderRadioButton.checked = not p.atlasesFromScene
        self.ui.atlasSceneRadioButton.checked = p.atlasesFromScene
        self.ui.atlasFolderRadioButton.blockSignals(False)
        self.ui.atlasFolderWidget.visible = not p.atlasesFromScene
        self.ui.atlasPairsWidget.visible = p.atlasesFromScene
        # a method that needs a model says so under it, and which shipped model Apply uses when none is chosen
        notes = (methodDescription(p.method), self._modelOffer(p).message)
        self.ui.methodNoteLabel.text = " ".join(note for note in notes if note)
        self.ui.modelFolderLabel.visible = self.ui.modelFolderPathLineEdit.visible = p.method == "dlf"
        self.ui.jlfGroupBox.enabled = p.method == "jlf"
        self._updateModalityLabels()
        self._updateAtlasPairsTable()

    def _updateModalityLabels(self) -> None:
        """The target's label names its modality as the atlas set does; one selector per further modality of the
        set (all of them while the set is not known)."""
        p = self._parameterNode
        modalities = [] if p.atlasesFromScene else readAtlasFolderModalities(pathText(p.atlasFolder))
        self._modalityCount = 1 if p.atlasesFromScene else (len(modalities) or None)
        self.ui.targetVolumeLabel.text = (f"Target volume (modality 1: {modalities[0]}):" if modalities
                                          else "Target volume (modality 1):")
        for k, (label, selector) in enumerate(((self.ui.extraModality1Label, self.ui.extraModality1Selector),
                                               (self.ui.extraModality2Label, self.ui.extraModality2Selector)),
                                              start=1):
            label.visible = selector.visible = self._modalityCount is None or k < self._modalityCount
            label.text = f"Modality {k + 1} ({modalities[k]}):" if k < len(modalities) else f"Modality {k + 1}:"

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
    def inputs(self) -> FusionInputs:
        p = self._parameterNode
        extra = [n for n in (p.extraModality1, p.extraModality2) if n is not None]
        if self._modalityCount is not None:   # selectors hidden for this atlas set are ignored
            extra = [n for n in (p.extraModality1, p.extraModality2)[:self._modalityCount - 1] if n is not None]
        pairs = list(zip(p.atlasImages, p.atlasSegmentations)) if p.atlasesFromScene else []
        return FusionInputs(p.targetVolume, extra, "" if p.atlasesFromScene else pathText(p.atlasFolder), pairs,
                            p.referenceSegmentation, p.outputSegmentation)

    @staticmethod
    def _modelOffer(p):
        return modelOffer(p.method, pathText(p.modelFolder), needsModel=p.method == "dlf")

    def settings(self) -> FusionSettings:
        p = self._parameterNode
        modelFolder = pathText(p.modelFolder) or self._modelOffer(p).folder
        return FusionSettings(p.method, p.nAtlases, p.backend, p.preset, p.device, modelFolder,
                              p.jlfAlpha, p.jlfBeta, p.jlfPatchRadius, p.jlfSearchRadius, p.seed,
                              weightMaps=p.weightMaps, show3D=p.show3D)

    # ------------------------------------------------------------------ results
    def onResult(self, result) -> None:
        """A run ended (the Apply part has shown its status, maps and metrics): its segmentation, for Show in 3D."""
        self._lastSegmentation = result.segmentation

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
            if not p.atlasesFromScene and not pathText(p.atlasFolder):
                p.atlasFolder = p.trainingAtlasFolder
        self.ui.settingsCollapsibleButton.collapsed = False

    def onShow3DToggled(self, show: bool) -> None:
        """After a run, the checkbox shows or hides that run's segmentation in 3D at once."""
        node = self._lastSegmentation
        if node is not None and slicer.mrmlScene.IsNodePresent(node):
            self.logic.showIn3D(node, show)


class DeepLabelFusionLogic(AtlasSegLogic, FusionLogic):
    """Slicer-side logic: the Qt-free FusionLogic on slicer.mrmlScene plus first-use dependency installs.

    Python console::

        logic = slicer.util.getModuleLogic("DeepLabelFusion")
        result = logic.runBlocking(FusionInputs(getNode("target"), atlasFolder="/data/atlases"),
                                   FusionSettings(method="jlf", nAtlases=5))
    """

    parameterNodeClass = DeepLabelFusionParameterNode
    engineTitle = "Deep Label Fusion"


class DeepLabelFusionTest(AtlasSegTest):
    """Runs inside Slicer: geometry round trip and a phantom segmentation end to end through the logic."""

    selfTests = ("test_GeometryRoundTrip", "test_PhantomSegmentation")

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
