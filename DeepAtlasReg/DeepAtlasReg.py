"""DeepAtlasReg: register a moving volume to a fixed one with a trained DeepAtlas model in 3D Slicer.

The module is thin: the widget edits a parameter node, and the logic (DeepAtlasRegLib, Qt-free, on the shared
AtlasSegLib) writes the volumes, runs the headless engine ``atlasseg`` (``register``, then ``segment --method
deepatlas``) in a background PythonSlicer process and loads its outputs: a grid transform Slicer's Transforms module
can apply and invert, the warped moving volume and segmentation, the Jacobian determinant map with the folding voxels
highlighted, and the segmentation network's segmentation of the fixed volume. Without a model, the engine's iterative
backends (``register --backend torch|greedy``) register the pair instead. The *Train a model* section
(AtlasSegLib.trainingpanel) trains a DeepAtlas model the same way and selects it for Apply. What every AtlasSeg panel
does (Apply, progress, cancel, status, result maps: AtlasSegLib.runpanel; the parameter node and closing:
AtlasSegLib.modulebase) is shared; this file holds the module's own widgets and words.
"""

import importlib.util
import pathlib
import sys
from typing import Annotated

import slicer
from slicer import vtkMRMLNode, vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper

if importlib.util.find_spec("AtlasSegLib") is None:  # source checkout: the shared library is one folder up
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from DeepAtlasRegLib import (  # noqa: E402
    BACKENDS,
    LEARNED,
    PRESETS,
    DeepAtlasInputs,
    DeepAtlasLogic,
    DeepAtlasModelProblem,
    DeepAtlasSettings,
    readRegistrationModel,
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

# worded as DeepLabelFusion's BACKEND_LABELS: what it is, then where it runs
BACKEND_LABELS = {LEARNED: "Trained DeepAtlas model (fast)", "torch": "Built-in iterative (PyTorch; GPU when present)",
                  "greedy": "Greedy (PICSL; CPU)"}
PRESET_LABELS = {"fast": "Fast (one network pass)", "default": "Default (one network pass)",
                 "accurate": "Accurate (plus 50 optimisation steps)", "affine": "Affine pre-alignment only"}
ITERATIVE_PRESET_LABELS = {"fast": "Fast (preview)", "default": "Default", "accurate": "Accurate (slower)",
                           "affine": "Affine only"}
ITERATIVE_NOTE = ("No model needed: the deformation is optimised for this pair (slower than a trained network's "
                  "pass); the moving segmentation's segments are the labels.")


class DeepAtlasReg(AtlasSegModule):
    moduleTitle = "DeepAtlas registration"
    moduleHelpText = (
        "Register a moving volume (and its segmentation) to a fixed volume with a trained DeepAtlas model: the "
        "registration network gives a deformation whose transform node the Transforms module can apply to any node "
        "and invert; the warped volume and segmentation, the Jacobian determinant map (folding, J &lt;= 0, "
        "highlighted) and the segmentation network's segmentation of the fixed volume appear in one "
        "subject-hierarchy folder per run. Train a model in the Train a model section (or with 'atlasseg train "
        "--method deepatlas'), or register without one with the built-in iterative or Greedy registration. See the <a href='https://github.com/atlasseg/SlicerAtlasSeg'>documentation</a>.")
    moduleAcknowledgementText = "DeepAtlas after Xu and Niethammer (MICCAI 2019)."


@parameterNodeWrapper
class DeepAtlasRegParameterNode(TrainingParameters):
    """Everything the panel edits; saved with the scene."""

    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    movingSegmentation: vtkMRMLNode      # a segmentation or a labelmap volume of the moving volume
    modelFolder: pathlib.Path
    backend: str = LEARNED               # learned (the model), torch or greedy (iterative, no model)
    preset: str = "default"
    iterations: Annotated[int, WithinRange(-1, 10000)] = -1
    device: str = "auto"
    segmentFixed: bool = True


class DeepAtlasRegWidget(AtlasSegWidget):
    applyToolTip = "Register the moving volume to the fixed one (and segment the fixed volume)"
    counted = "registrations"

    def setupPanel(self) -> None:
        fillCombo(self.ui.backendComboBox, {b: BACKEND_LABELS.get(b, b) for b in BACKENDS})
        fillCombo(self.ui.presetComboBox, {p: PRESET_LABELS.get(p, p.capitalize()) for p in PRESETS})
        for combo, name in ((self.ui.backendComboBox, "backend"), (self.ui.presetComboBox, "preset")):
            connectComboToParameter(combo, lambda: self._parameterNode, name)
        self.ui.metricsTableView.hide()   # the shared Results part's table: registration has no metrics

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        p = self._parameterNode
        volumes = slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
        if not p.fixedVolume and volumes:
            p.fixedVolume = volumes[0]
        if not p.movingVolume and len(volumes) > 1:
            p.movingVolume = volumes[1]

    # ------------------------------------------------------------------ parameter node <-> widgets not bound by name
    def updatePanel(self, p) -> None:
        selectComboData(self.ui.backendComboBox, p.backend)
        selectComboData(self.ui.presetComboBox, p.preset)
        learned = p.backend == LEARNED
        # the presets mean other things to the network (passes, steps) and to an iterative backend (quality)
        labels = PRESET_LABELS if learned else ITERATIVE_PRESET_LABELS
        for index in range(self.ui.presetComboBox.count):
            preset = self.ui.presetComboBox.itemData(index)
            self.ui.presetComboBox.setItemText(index, labels.get(preset, preset.capitalize()))
        # no model, no F_S and no test-time optimisation steps with an iterative backend
        for widget in (self.ui.modelFolderLabel, self.ui.modelFolderPathLineEdit, self.ui.iterationsLabel,
                       self.ui.iterationsSpinBox):
            widget.visible = learned
        self.ui.segmentFixedCheckBox.enabled = learned
        if not learned:
            self.ui.modelInfoLabel.text = ITERATIVE_NOTE
            return
        try:
            self.ui.modelInfoLabel.text = readRegistrationModel(pathText(p.modelFolder)).summary()
        except DeepAtlasModelProblem as problem:
            self.ui.modelInfoLabel.text = str(problem)

    # ------------------------------------------------------------------ inputs and settings
    def inputs(self) -> DeepAtlasInputs:
        p = self._parameterNode
        return DeepAtlasInputs(p.fixedVolume, p.movingVolume, p.movingSegmentation)

    def settings(self) -> DeepAtlasSettings:
        p = self._parameterNode
        return DeepAtlasSettings(pathText(p.modelFolder), p.preset, p.iterations, p.device, p.segmentFixed,
                                 p.backend)

    def onResult(self, result) -> None:
        """The status says how regular the deformation is; the Jacobian map is shown over the fixed volume."""
        stats = result.jacobianStats
        self.ui.statusLabel.text = (
            f"Done in {result.run['timings_s']['total']:.0f} s: folding in {stats.get('folding_percent', 0.0):.3f}% "
            f"of the voxels, Jacobian determinant {stats.get('min', float('nan')):.2f} to "
            f"{stats.get('max', float('nan')):.2f}. Apply the transform to any node in the Transforms module.")
        self.ui.mapSelector.setCurrentNode(result.jacobian)

    def onModelTrained(self, result) -> None:
        """A training ended: its model is the one Apply uses."""
        if self._parameterNode is not None:
            self._parameterNode.modelFolder = pathlib.Path(result.modelFolder)


class DeepAtlasRegLogic(AtlasSegLogic, DeepAtlasLogic):
    """Slicer-side logic: the Qt-free DeepAtlasLogic on slicer.mrmlScene plus first-use dependency installs.

    Python console::

        logic = slicer.util.getModuleLogic("DeepAtlasReg")
        result = logic.runBlocking(DeepAtlasInputs(getNode("fixed"), getNode("moving")),
                                   DeepAtlasSettings(modelFolder="/models/deepatlas"))
        # without a model: DeepAtlasSettings(backend="torch", preset="fast")
    """

    parameterNodeClass = DeepAtlasRegParameterNode
    engineTitle = "DeepAtlas"


class DeepAtlasRegTest(AtlasSegTest):
    """Runs inside Slicer: the model-folder check, then a tiny model trained on phantoms registers an oblique
    moving phantom to a fixed one through the logic, and the transform node maps points as the engine's field."""

    selfTests = ("test_WrongModelFolderIsExplained", "test_PhantomRegistration")

    def test_WrongModelFolderIsExplained(self):
        import tempfile

        folder = pathlib.Path(tempfile.mkdtemp())
        with self.assertRaises(DeepAtlasModelProblem):
            readRegistrationModel(folder)
        (folder / "config.json").write_text('{"format": "atlasseg-model", "version": 2, "method": "atlasnet"}')
        with self.assertRaisesRegex(DeepAtlasModelProblem, "not a DeepAtlas model"):
            readRegistrationModel(folder)
        self.delayDisplay("wrong model folders are explained")

    def test_PhantomRegistration(self):
        import numpy as np

        from AtlasSegLib import updateVolumeNodeFromImage

        if missingPipDependencies() or not torchIsInstalled():
            self.skipTest("engine dependencies missing: open the DeepAtlas module once to install them")
        sys.path.insert(0, str(findEngineRoot()))
        import SimpleITK as sitk

        from atlasseg.phantom import make_phantom

        model = self._trainTinyModel()
        nodes = []
        for seed, name in ((998, "phantom fixed"), (999, "phantom moving")):
            image, _ = make_phantom(seed, shape=(22, 26, 18), spacing=(1.3, 1.6, 2.2),
                                    direction=tuple(sitk.VersorTransform((0.2, -0.4, 0.9), 0.35).GetMatrix()))
            nodes.append(slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name))
            updateVolumeNodeFromImage(nodes[-1], image)
        result = DeepAtlasRegLogic().runBlocking(
            DeepAtlasInputs(*nodes), DeepAtlasSettings(str(model), iterations=3, device="cpu"),
            onProgress=lambda fraction, message: self.delayDisplay(f"{fraction:.0%} {message}", 10))
        self.assertIsNotNone(result.fixedSegmentation)
        self.assertTrue(np.all(np.isfinite(slicer.util.arrayFromVolume(result.jacobian))))
        point = nodes[0].GetOrigin()
        moved = result.transform.GetTransformFromParent().TransformPoint(point)
        back = result.transform.GetTransformToParent().TransformPoint(moved)
        self.assertLess(float(np.max(np.abs(np.subtract(back, point)))), 0.5)   # the Transforms module inverts it
        self.delayDisplay(f"phantom registered; folding {result.jacobianStats['folding_percent']:.3f}%")

    def _trainTinyModel(self) -> pathlib.Path:
        """A tiny DeepAtlas model on four phantoms: a few steps of each network, about 10 s on a laptop CPU."""
        import subprocess
        import tempfile

        from atlasseg.phantom import make_phantom_atlas_set
        from AtlasSegLib import engineEnvironment, pythonExecutable

        work = pathlib.Path(tempfile.mkdtemp())
        make_phantom_atlas_set(work / "atlases", n_cases=4, seed=1, shape=(24, 24, 24), spacing=(1.5, 1.5, 1.5))
        self.delayDisplay("training a tiny DeepAtlas model (about 10 s)")
        subprocess.run([pythonExecutable(), "-m", "atlasseg", "train", "--method", "deepatlas", "--atlases",
                        str(work / "atlases"), "--output", str(work / "model"), "--grid-shape", "16", "16", "16",
                        "--registration-backbone-kwargs", '{"channels": [4, 8, 8]}', "--backbone-kwargs",
                        '{"channels": [4, 8, 16]}', "--epochs", "1", "--pretrain-registration-steps", "4",
                        "--pretrain-segmentation-steps", "2", "--round-registration-steps", "2",
                        "--lncc-radius", "1", "--val-fraction", "0.25", "--device", "cpu", "--quiet"],
                       check=True, env=engineEnvironment(findEngineRoot()))
        return work / "model"
