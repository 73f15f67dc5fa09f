"""AtlasNetSeg: segment a volume with a trained AtlasNet model (one network per atlas space) in 3D Slicer.

The module is thin: the widget edits a parameter node, and the logic (AtlasNetSegLib, Qt-free, on the shared
AtlasSegLib) writes the target, runs the headless engine ``atlasseg`` in a background PythonSlicer process and
loads its outputs: the fused segmentation, probability maps per network and the networks' agreement. The *Train a
model* section (AtlasSegLib.trainingpanel) trains an AtlasNet model the same way and selects it for Apply. What
every AtlasSeg panel does (Apply, progress, cancel, status, result maps: AtlasSegLib.runpanel; the parameter node
and closing: AtlasSegLib.modulebase) is shared; this file holds the module's own widgets and words.
"""

import importlib.util
import pathlib
import sys

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import parameterNodeWrapper

if importlib.util.find_spec("AtlasSegLib") is None:  # source checkout: the shared library is one folder up
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from AtlasNetSegLib import (  # noqa: E402
    AtlasNetInputs,
    AtlasNetLogic,
    AtlasNetSettings,
    ModelFolderProblem,
    readModelInfo,
)

from AtlasSegLib import findEngineRoot, missingPipDependencies, torchIsInstalled  # noqa: E402
from AtlasSegLib.enginepanel import pathText  # noqa: E402
from AtlasSegLib.modulebase import (  # noqa: E402
    AtlasSegLogic,
    AtlasSegModule,
    AtlasSegTest,
    AtlasSegWidget,
    TrainingParameters,
)
from AtlasSegLib.sampledata import registerSampleData  # noqa: E402


class AtlasNetSeg(AtlasSegModule):
    moduleTitle = "AtlasNet"
    moduleHelpText = (
        "Segment a target volume with a trained AtlasNet model: the target is registered to each of the "
        "model's atlases, each atlas's network segments it in that atlas's space, and the predictions are "
        "warped back and fused. Results (segmentation, probability maps per network, the networks' agreement "
        "and, with a reference, a Dice / HD95 table) appear in one subject-hierarchy folder per run. Train a "
        "model in the Train a model section (or with 'atlasseg train --method atlasnet'). See the "
        "<a href='https://github.com/atlasseg/SlicerAtlasSeg'>documentation</a>.")
    moduleAcknowledgementText = "AtlasNet after Vakalopoulou et al. (MICCAI 2018)."

    def __init__(self, parent):
        super().__init__(parent)
        # the sample atlas set in Sample Data (its targets, and its atlases to train on), once Slicer has started
        slicer.app.connect("startupCompleted()", lambda: registerSampleData("AtlasNetSeg"))


@parameterNodeWrapper
class AtlasNetSegParameterNode(TrainingParameters):
    """Everything the panel edits; saved with the scene."""

    targetVolume: vtkMRMLScalarVolumeNode
    extraModality1: vtkMRMLScalarVolumeNode
    extraModality2: vtkMRMLScalarVolumeNode
    referenceSegmentation: vtkMRMLSegmentationNode
    modelFolder: pathlib.Path
    device: str = "auto"
    networkSegmentations: bool = False


DEVICE_LABELS = {"auto": "Auto", "cpu": "CPU", "gpu": "GPU"}   # the device choices as this panel names them


class AtlasNetSegWidget(AtlasSegWidget):
    applyToolTip = "Segment the target with every network of the model"
    counted = "networks"
    deviceLabels = DEVICE_LABELS

    def setupPanel(self) -> None:
        self._modalities = []   # the chosen model's modalities (empty while the folder is not a usable model)

    # ------------------------------------------------------------------ parameter node <-> widgets not bound by name
    def updatePanel(self, p) -> None:
        self._updateModelInfo(pathText(p.modelFolder))

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

    # ------------------------------------------------------------------ inputs and settings
    def inputs(self) -> AtlasNetInputs:
        """The target and as many further modalities as the model takes (hidden selectors are ignored)."""
        p = self._parameterNode
        extra = [node for node in (p.extraModality1, p.extraModality2)[:max(len(self._modalities) - 1, 0)]
                 if node is not None]
        return AtlasNetInputs(p.targetVolume, extra, p.referenceSegmentation)

    def settings(self) -> AtlasNetSettings:
        p = self._parameterNode
        return AtlasNetSettings(pathText(p.modelFolder), p.device, p.networkSegmentations)

    def onModelTrained(self, result) -> None:
        """A training ended: its model is the one Apply uses."""
        if self._parameterNode is not None:
            self._parameterNode.modelFolder = pathlib.Path(result.modelFolder)


class AtlasNetSegLogic(AtlasSegLogic, AtlasNetLogic):
    """Slicer-side logic: the Qt-free AtlasNetLogic on slicer.mrmlScene plus first-use dependency installs.

    Python console::

        logic = slicer.util.getModuleLogic("AtlasNetSeg")
        result = logic.runBlocking(AtlasNetInputs(getNode("target")), AtlasNetSettings(modelFolder="/models/an"))
    """

    parameterNodeClass = AtlasNetSegParameterNode
    engineTitle = "AtlasNet"


class AtlasNetSegTest(AtlasSegTest):
    """Runs inside Slicer: the model-folder check, then a tiny model trained on phantoms and used through the
    logic on an oblique target."""

    selfTests = ("test_WrongModelFolderIsExplained", "test_PhantomSegmentation")

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
