"""The DeepAtlasReg module's Qt-free logic on a real MRML scene (slicer-core), with the real engine process.

No mocks: a tiny DeepAtlas model is trained once through the module's own Train logic (``atlasseg train --method
deepatlas`` in a subprocess: a few steps of 4-8 channel networks on a 16^3 common grid, about 10 s); the logic then
registers an oblique moving phantom to an oblique, anisotropic fixed one through ``atlasseg register`` and
``atlasseg segment --method deepatlas`` run one after the other in the background, with 3 steps of test-time
optimisation so the field is truly deformable, and loads the outputs as nodes. The transform node is checked against
the engine's own field and warped image, point by point. Without a model, the engine's iterative torch backend
registers the same phantoms (``atlasseg register --backend torch``), labelled by the moving segmentation's segments.
"""

from __future__ import annotations

import ast
import csv
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the 'slicer' package found is not slicer-core (no vtkMRMLScene)", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "DeepAtlasReg"))

from DeepAtlasRegLib import (  # noqa: E402
    BACKENDS,
    PRESETS,
    DeepAtlasInputs,
    DeepAtlasLogic,
    DeepAtlasModelProblem,
    DeepAtlasSettings,
    readRegistrationModel,
)

from atlasseg.phantom import PHANTOM_LABELS, make_phantom, make_phantom_atlas_set  # noqa: E402
from AtlasSegLib import (  # noqa: E402
    EngineCancelled,
    EngineError,
    EngineProcess,
    EngineSequence,
    TrainingSettings,
    inspectModelFolder,
    updateVolumeNodeFromImage,
)
from AtlasSegLib.results import MAP_KIND_ATTRIBUTE, newColorTable  # noqa: E402
from AtlasSegLib.training import DICE, EPOCH, LOSS, REGISTRATION_DICE, SEGMENTATION_LOSS  # noqa: E402
from Testing.slicer_scene import (  # noqa: E402
    array_of,
    assert_under_folder,
    dice,
    label_array_of_segmentation,
    new_scene,
    node_ijk_to_ras,
    segment_names,
    segmentation_from_labels,
    snapshot,
)
from Testing.test_slicer_static import (  # noqa: E402
    load_ui,
    parameter_node_fields,
    qt_app,
    render_panel,
    shared_panel_code,
    ui_ancestors,
    ui_object_names,
    ui_parameter_names,
    ui_widgets,
    widgets_used,
)

MODULE = "DeepAtlasReg"
TINY = ["--grid-shape", "16", "16", "16", "--registration-backbone-kwargs", '{"channels": [4, 8, 8]}',
        "--backbone-kwargs", '{"channels": [4, 8, 16]}', "--pretrain-registration-steps", "4",
        "--pretrain-segmentation-steps", "2", "--round-registration-steps", "2", "--round-segmentation-steps", "1",
        "--val-interval", "1", "--lncc-radius", "1", "--val-fraction", "0.25", "--threads", "1"]
OBLIQUE = tuple(sitk.VersorTransform((0.3, -0.5, 0.8), 0.4).GetMatrix())
FIXED_GRID = {"shape": (22, 26, 18), "spacing": (1.3, 1.6, 2.2), "direction": OBLIQUE}
MOVING_GRID = {"shape": (24, 20, 22), "spacing": (1.5, 1.7, 1.4),
               "direction": tuple(sitk.VersorTransform((0.1, 0.9, -0.2), -0.3).GetMatrix())}
FOREGROUND = {v: n for v, n in PHANTOM_LABELS.items() if v}


# ---------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny DeepAtlas model trained through the module's Train logic (the shared TrainingLogic)."""
    work = tmp_path_factory.mktemp("deepatlas_slicer")
    atlases = make_phantom_atlas_set(work / "atlases", n_cases=4, seed=1, shape=(24, 24, 24), spacing=(1.5,) * 3)
    scene = new_scene()
    logic = DeepAtlasLogic(scene, python=sys.executable)
    settings = TrainingSettings(str(atlases), str(work / "model"), size="small", epochs=1, device="cpu",
                                extraArguments=TINY)
    result = logic.trainBlocking(settings, pollSeconds=0.05)
    return {"model": work / "model", "atlases": atlases, "result": result, "logic": logic, "settings": settings}


@pytest.fixture(scope="module")
def model(trained) -> Path:
    return trained["model"]


@pytest.fixture(scope="module")
def phantoms():
    fixed, fixed_labels = make_phantom(4243, **FIXED_GRID)
    moving, moving_labels = make_phantom(77, **MOVING_GRID)
    for image in (fixed, fixed_labels):
        image.SetOrigin((12.5, -30.25, 7.0))
    for image in (moving, moving_labels):
        image.SetOrigin((8.0, -26.0, 3.5))
    return {"fixed": fixed, "fixed_labels": fixed_labels, "moving": moving, "moving_labels": moving_labels}


def volume_scene(phantoms):
    scene = new_scene()
    nodes = {}
    for key, name in (("fixed", "oblique fixed"), ("moving", "oblique moving")):
        nodes[key] = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        updateVolumeNodeFromImage(nodes[key], phantoms[key])
    return scene, nodes["fixed"], nodes["moving"]


@pytest.fixture(scope="module")
def registration(model, phantoms, tmp_path_factory):
    """One real engine run through the logic: register (3 optimisation steps) then F_S's segmentation."""
    scene, fixed, moving = volume_scene(phantoms)
    segmentation = segmentation_from_labels(scene, phantoms["moving_labels"], PHANTOM_LABELS, "moving labels")
    before = {"fixed": snapshot(fixed), "moving": snapshot(moving), "segmentation": snapshot(segmentation)}
    logic = DeepAtlasLogic(scene, python=sys.executable)
    work = tmp_path_factory.mktemp("deepatlas_work")
    events = []
    t0 = time.perf_counter()
    run = logic.startRun(DeepAtlasInputs(fixed, moving, segmentation),
                         DeepAtlasSettings(str(model), iterations=3, device="cpu"), workDir=work)
    while run.isRunning():
        time.sleep(0.05)
        events += run.poll()
    events += run.poll()
    log = run.newLogLines()
    result = run.finish()
    return {"scene": scene, "logic": logic, "fixed": fixed, "moving": moving, "segmentation": segmentation,
            "result": result, "events": events, "log": log, "before": before, "run": run, "work": work,
            "output": work / "output", "seconds": time.perf_counter() - t0}


def engine_array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def ras(lps) -> np.ndarray:
    return np.asarray(lps, dtype=float) * [-1.0, -1.0, 1.0]


# ---------------------------------------------------------------------------------------------- training

def test_train_section_trains_a_deepatlas_model_and_tables_its_log(trained):
    """The shared Train logic drives ``atlasseg train --method deepatlas``: the table holds the engine's log rows
    (by step, F_R's loss, F_S's validation Dice, and the other two columns), and the folder is a finished model."""
    result, model = trained["result"], trained["model"]
    assert trained["logic"].trainingMethods() == {"deepatlas": "DeepAtlas"}
    command = trained["logic"].trainingCommand(trained["settings"])
    assert command[command.index("--method") + 1] == "deepatlas"
    assert command[command.index("--pretrain-registration-steps") + 1] == "300"   # the Small size's, then TINY's
    with open(model / "training_log.csv", newline="") as handle:
        log = list(csv.DictReader(handle))
    assert len(result.history) == len(log) >= 3
    for row, entry in zip(result.history, log):
        assert row[EPOCH] == float(entry["step"])
        for column, name in ((LOSS, "registration_loss"), (DICE, "val_dice_segmentation"),
                             (SEGMENTATION_LOSS, "segmentation_loss"), (REGISTRATION_DICE, "val_dice_registration")):
            assert row[column] == pytest.approx(float(entry[name]), nan_ok=True), column
    curves = result.curves
    assert curves.columns == [EPOCH, LOSS, DICE, SEGMENTATION_LOSS, REGISTRATION_DICE]
    assert curves.values(EPOCH) == [float(r["step"]) for r in log] and curves.chart.GetXAxisTitle() == "step"
    config = json.loads((model / "config.json").read_text())
    assert result.method == "deepatlas" and result.bestValidationDice == pytest.approx(
        config["validation"]["best_mean_dice"])
    state = inspectModelFolder(model)
    assert (state.kind, state.method, state.finished, state.epochsDone) == ("run", "deepatlas", True, len(log))
    assert "finished DeepAtlas training" in trained["logic"].describeModelFolder(trained["settings"])


# ---------------------------------------------------------------------------------------------- the model folder

def test_model_summary_comes_from_config_json(model):
    info = readRegistrationModel(model)
    assert info.labels == PHANTOM_LABELS and info.modalities == ["MRI"] and info.gridShape == (16, 16, 16)
    assert info.deformation == "svf" and info.labelledCases == 3
    assert info.summary() == ("DeepAtlas (svf field on a 16x16x16 common grid, trained with 3 labelled case(s)); "
                              "labels: tissue, ventricles, deep nucleus, hippocampus; modality: MRI")


def wrong_folders(tmp_path: Path, model: Path) -> dict[str, tuple[Path, str]]:
    empty = tmp_path / "empty"
    empty.mkdir()
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(model / name, incomplete / name)
    atlasnet = tmp_path / "atlasnet"
    atlasnet.mkdir()
    (atlasnet / "config.json").write_text('{"format": "atlasseg-model", "version": 2, "method": "atlasnet"}')
    return {"unset": (Path(""), "Choose a trained DeepAtlas model folder (train one with: atlasseg train --method "
                                "deepatlas"),
            "empty": (empty, f"{empty} is not a model folder (no config.json); train one with"),
            "missing": (tmp_path / "nope", f"The model folder {tmp_path / 'nope'} does not exist."),
            "dlf": (REPO / "Testing" / "data" / "format1_dlf", "holds a Deep Label Fusion model (open it in the "
                    "DeepLabelFusion module), not a DeepAtlas model."),
            "atlasnet": (atlasnet, "holds a AtlasNet model (open it in the AtlasNetSeg module), not a DeepAtlas"),
            "incomplete": (incomplete, f"{incomplete / 'reference.safetensors'} is missing")}


@pytest.mark.parametrize("case", ["unset", "empty", "missing", "dlf", "atlasnet", "incomplete"])
def test_wrong_model_folder_is_refused_before_the_engine_starts(case, model, phantoms, tmp_path):
    folder, expected = wrong_folders(tmp_path, model)[case]
    scene, fixed, moving = volume_scene(phantoms)
    started = []
    logic = DeepAtlasLogic(scene, python=sys.executable,
                           processFactory=lambda command, env: started.append(command) or EngineProcess(command, env))
    nodes = scene.GetNumberOfNodes()
    text = "" if case == "unset" else str(folder)
    with pytest.raises(EngineError) as error:
        logic.startRun(DeepAtlasInputs(fixed, moving), DeepAtlasSettings(text, device="cpu"))
    assert expected in str(error.value) and "\n" not in str(error.value)
    assert not started and scene.GetNumberOfNodes() == nodes
    assert logic.inputProblems(DeepAtlasInputs(fixed, moving), DeepAtlasSettings(text))[0] == str(error.value)
    with pytest.raises(DeepAtlasModelProblem):
        readRegistrationModel(text)


def test_input_problems_are_explained(model, phantoms):
    scene, fixed, moving = volume_scene(phantoms)
    logic = DeepAtlasLogic(scene, python=sys.executable)
    settings = DeepAtlasSettings(str(model))
    assert logic.inputProblems(DeepAtlasInputs(fixed, moving), settings) == []
    assert logic.inputProblems(DeepAtlasInputs(None, None), settings) == ["Select a fixed volume.",
                                                                          "Select a moving volume."]
    assert logic.inputProblems(DeepAtlasInputs(fixed, moving), DeepAtlasSettings(str(model), preset="slow")) == [
        f"Unknown preset 'slow' (choose {', '.join(PRESETS)})."]
    assert logic.inputProblems(DeepAtlasInputs(fixed, moving), DeepAtlasSettings(str(model), device="tpu")) == [
        "Unknown device 'tpu' (choose auto, cpu, gpu)."]


# ---------------------------------------------------------------------------------------------- the engine run

def test_commands_are_the_engine_cli_one_after_the_other(registration, model):
    prepared, work = registration["run"].prepared, registration["work"]
    (first, register), (second, segment) = prepared.steps
    assert prepared.command == register and isinstance(registration["run"].process, EngineSequence)
    assert register[:4] == [sys.executable, "-m", "atlasseg", "register"]
    for flag, value in (("--fixed", str(work / "fixed_0000.nii.gz")), ("--moving", str(work / "moving_0000.nii.gz")),
                        ("--moving-label", str(work / "moving_label.nii.gz")), ("--model", str(model)),
                        ("--output", str(work / "output" / "registration")), ("--preset", "default"),
                        ("--iterations", "3"), ("--device", "cpu")):
        assert register[register.index(flag) + 1] == value, flag
    assert segment[:4] == [sys.executable, "-m", "atlasseg", "segment"]
    for flag, value in (("--method", "deepatlas"), ("--target", str(work / "fixed_0000.nii.gz")),
                        ("--output", str(work / "output" / "segmentation"))):
        assert segment[segment.index(flag) + 1] == value, flag
    fractions = [e.fraction for e in registration["events"]]
    messages = [e.message for e in registration["events"]]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert messages[0] == first and second in messages and fractions[messages.index(second)] == 0.5
    assert f"$ {' '.join(segment)}" in registration["log"]
    assert registration["seconds"] < 60


def test_geometry_round_trip_onto_the_fixed_grid(registration, phantoms):
    """Nodes -> engine files (LPS) -> result nodes exactly on the fixed volume's RAS grid, the transform's grid
    too."""
    for key in ("fixed", "moving"):
        written = sitk.ReadImage(str(registration["work"] / f"{key}_0000.nii.gz"))
        for getter in ("GetSpacing", "GetOrigin", "GetDirection"):
            assert np.abs(np.subtract(getattr(written, getter)(), getattr(phantoms[key], getter)())).max() < 1e-4
        assert np.array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(phantoms[key]))
    result, fixed = registration["result"], registration["fixed"]
    grid = node_ijk_to_ras(fixed)
    for node in (result.warpedVolume, result.jacobian):
        assert np.array_equal(node_ijk_to_ras(node), grid), node.GetName()
        assert node.GetImageData().GetDimensions() == phantoms["fixed"].GetSize()
    transform = result.transform.GetTransformFromParent()
    data = transform.GetDisplacementGrid()
    direction = np.array([[transform.GetGridDirectionMatrix().GetElement(r, c) for c in range(3)] for r in range(3)])
    assert data.GetDimensions() == phantoms["fixed"].GetSize()
    assert np.array_equal(direction @ np.diag(data.GetSpacing()), grid[:3, :3])
    assert np.array_equal(np.array(data.GetOrigin()), grid[:3, 3])


def test_transform_node_moves_points_where_the_engine_says(registration, phantoms):
    """The grid transform's *from parent* is the engine's forward field in RAS (fixed point -> moving point), so
    the moving intensity at the mapped point is the engine's warped image at the fixed point; *to parent* (what the
    Transforms module inverts to) brings the point back within a small fraction of a voxel, as the engine's
    inverse field does."""
    result, output = registration["result"], registration["output"] / "registration"
    forward = sitk.DisplacementFieldTransform(sitk.ReadImage(str(output / "transform_forward.nii.gz"),
                                                             sitk.sitkVectorFloat64))
    inverse = sitk.DisplacementFieldTransform(sitk.ReadImage(str(output / "transform_inverse.nii.gz"),
                                                             sitk.sitkVectorFloat64))
    fixed, moving = phantoms["fixed"], phantoms["moving"]
    warped = sitk.ReadImage(str(output / "warped_moving.nii.gz"))
    fromParent = result.transform.GetTransformFromParent()
    toParent = result.transform.GetTransformToParent()
    displacement = np.abs(sitk.GetArrayFromImage(sitk.ReadImage(str(output / "transform_forward.nii.gz"))))
    assert displacement.max() > 1.0   # a real deformation, not the identity
    rng = np.random.default_rng(5)
    compared = 0
    for _ in range(300):
        index = [int(rng.integers(2, n - 2)) for n in fixed.GetSize()]
        point = np.array(fixed.TransformIndexToPhysicalPoint(index))                  # LPS
        mapped = np.array(fromParent.TransformPoint(ras(point).tolist()))             # RAS, by the node
        assert np.abs(mapped - ras(forward.TransformPoint(point.tolist()))).max() < 1e-3
        back = np.array(toParent.TransformPoint(mapped.tolist()))
        assert np.abs(back - ras(point)).max() < 0.05 * min(fixed.GetSpacing())
        continuous = np.array(moving.TransformPhysicalPointToContinuousIndex(ras(mapped).tolist()))
        if np.all(continuous > 1) and np.all(continuous < np.array(moving.GetSize()) - 2):   # on the moving grid
            engine_back = np.array(inverse.TransformPoint(ras(mapped).tolist()))   # the inverse lives there
            assert np.abs(engine_back - point).max() < 0.25 * min(fixed.GetSpacing())
            value = moving.EvaluateAtPhysicalPoint(ras(mapped).tolist(), sitk.sitkLinear)
            assert value == pytest.approx(warped.GetPixel(index), abs=1e-3 * (1 + abs(value)))
            compared += 1
    assert compared > 100


def test_warped_segmentation_is_the_engines_with_the_model_labels(registration, phantoms):
    result, scene, fixed = registration["result"], registration["scene"], registration["fixed"]
    output = registration["output"] / "registration"
    names = segment_names(result.warpedSegmentation)
    assert names and set(names) <= set(FOREGROUND.values())
    loaded = label_array_of_segmentation(scene, result.warpedSegmentation, fixed, PHANTOM_LABELS)
    engine = engine_array(output / "warped_label.nii.gz")
    assert np.array_equal(loaded, engine)
    reference = sitk.GetArrayFromImage(phantoms["fixed_labels"])
    for value in np.unique(engine[engine > 0]):
        assert dice(loaded == value, reference == value) == dice(engine == value, reference == value)
    assert dice(loaded > 0, reference > 0) > 0.5     # tissue and all: the moving labels land on the fixed anatomy
    assert [result.colorTable.GetColorName(v) for v in range(5)] == [PHANTOM_LABELS[v] for v in range(5)]


def test_fixed_segmentation_is_the_segmentation_networks(registration):
    result, scene = registration["result"], registration["scene"]
    engine = engine_array(registration["output"] / "segmentation" / "segmentation.nii.gz")
    assert result.fixedSegmentation.GetName() == (
        "DeepAtlas - oblique moving to oblique fixed F_S segmentation of oblique fixed")
    if engine.any():
        loaded = label_array_of_segmentation(scene, result.fixedSegmentation, registration["fixed"], PHANTOM_LABELS)
        assert np.array_equal(loaded, engine)
    assert not result.fixedSegmentation.GetDisplayNode().GetVisibility()
    assert result.run["segmentation"]["method"] == "deepatlas" and result.run["registration"]["command"] == "register"
    assert result.run["timings_s"]["total"] == pytest.approx(
        result.run["registration"]["timings_s"]["total"] + result.run["segmentation"]["timings_s"]["total"])


def test_jacobian_map_is_the_engines_and_styled_around_one(registration):
    result, logic, scene = registration["result"], registration["logic"], registration["scene"]
    engine = engine_array(registration["output"] / "registration" / "jacobian_determinant.nii.gz")
    assert np.array_equal(array_of(result.jacobian), engine)
    assert result.jacobian.GetAttribute(MAP_KIND_ATTRIBUTE) == "jacobian"
    display = result.jacobian.GetDisplayNode()
    assert display.GetColorNodeID() == "vtkMRMLColorTableNodefMRI"
    assert (display.GetWindow(), display.GetLevel()) == (2.0, 1.0)
    stats = result.jacobianStats
    assert stats["min"] == pytest.approx(float(engine.min()), rel=1e-6)
    assert stats["max"] == pytest.approx(float(engine.max()), rel=1e-6)
    assert (result.folding is None) == (stats["folding_percent"] == 0.0)
    composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    logic.showJacobian(result)
    assert composite.GetForegroundVolumeID() == result.jacobian.GetID()
    assert composite.GetBackgroundVolumeID() == registration["fixed"].GetID()
    assert result.maps() == [result.jacobian]


def test_folding_voxels_are_highlighted(registration, tmp_path):
    """Where the engine's Jacobian determinant is <= 0 the results hold a magenta 'folding' segment, exactly those
    voxels."""
    output = tmp_path / "output"
    shutil.copytree(registration["output"], output)
    path = output / "registration" / "jacobian_determinant.nii.gz"
    jacobian = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(jacobian)
    array[5:8, 6:9, 4:6] = -0.5
    array[10, 10, 10] = 0.0
    folded = sitk.GetImageFromArray(array)
    folded.CopyInformation(jacobian)
    sitk.WriteImage(folded, str(path))
    scene, fixed = registration["scene"], registration["fixed"]
    result = registration["logic"].loadResults(output, DeepAtlasInputs(fixed, registration["moving"]),
                                               registration["run"].settings)
    assert segment_names(result.folding) == ["folding (J <= 0)"]
    segment = result.folding.GetSegmentation().GetNthSegment(0)
    assert segment.GetColor() == pytest.approx((1.0, 0.0, 1.0))
    loaded = label_array_of_segmentation(scene, result.folding, fixed, {0: "background", 1: "folding (J <= 0)"})
    assert np.array_equal(loaded == 1, array <= 0) and np.count_nonzero(loaded) == 3 * 3 * 2 + 1
    names = [scene.GetNthNode(k).GetName() or "" for k in range(scene.GetNumberOfNodes())]
    assert not [n for n in names if n.startswith("__AtlasSeg")], names


def test_results_sit_in_one_folder_and_inputs_are_untouched(registration):
    result, scene = registration["result"], registration["scene"]
    sh = scene.GetSubjectHierarchyNode()
    assert sh.GetItemName(result.folderItemID) == "DeepAtlas - oblique moving to oblique fixed"
    assert_under_folder(scene, result.folderItemID, [result.transform, result.warpedVolume, result.jacobian,
                                                     result.warpedSegmentation, result.fixedSegmentation,
                                                     result.colorTable])
    assert result.transform.IsA("vtkMRMLGridTransformNode")
    assert result.warpedVolume.GetName() == "DeepAtlas - oblique moving to oblique fixed warped oblique moving"
    for key in ("fixed", "moving", "segmentation"):
        assert snapshot(registration[key]) == registration["before"][key], key
    assert registration["moving"].GetParentTransformNode() is None   # the user applies the transform


# ---------------------------------------------------------------------------------------------- no model: iterative

def test_iterative_backends_need_no_model_folder(phantoms, tmp_path):
    """torch and greedy need no model (whether greedy is installed the engine says); the learned backend names the
    model folder; an unknown backend is named. Without a model a labelmap volume's values are the labels, named by
    its colour table."""
    scene, fixed, moving = volume_scene(phantoms)
    logic = DeepAtlasLogic(scene, python=sys.executable)
    assert BACKENDS == ("learned", "torch", "greedy")
    empty = tmp_path / "empty"
    empty.mkdir()
    for backend in ("torch", "greedy"):
        assert logic.inputProblems(DeepAtlasInputs(fixed, moving), DeepAtlasSettings(str(empty), backend=backend)
                                   ) == [], backend
    learned = logic.inputProblems(DeepAtlasInputs(fixed, moving), DeepAtlasSettings(str(empty)))
    assert len(learned) == 1 and f"{empty} is not a model folder" in learned[0]
    assert logic.inputProblems(DeepAtlasInputs(fixed, moving), DeepAtlasSettings(backend="ants")) == [
        "Unknown registration backend 'ants' (choose learned, torch, greedy)."]
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "moving labelmap")   # values as they are
    updateVolumeNodeFromImage(labelmap, phantoms["moving_labels"])
    iterative = DeepAtlasSettings(backend="torch")
    assert logic.runLabels(DeepAtlasInputs(fixed, moving, labelmap), iterative)[0] == {
        0: "background", **{v: f"label {v}" for v in FOREGROUND}}
    labelmap.CreateDefaultDisplayNodes()
    labelmap.GetDisplayNode().SetAndObserveColorNodeID(newColorTable(scene, "names", PHANTOM_LABELS, {}).GetID())
    assert logic.runLabels(DeepAtlasInputs(fixed, moving, labelmap), iterative)[0] == PHANTOM_LABELS


def test_iterative_torch_registration_without_a_model(phantoms, tmp_path):
    """``--backend torch`` (preset fast) through the real engine: one register command with no model, no
    optimisation steps and no F_S step; the transform, warped volume and warped segmentation load, labelled by the
    moving segments in order, and the warped labels fit the fixed anatomy better than the unregistered ones."""
    scene, fixed, moving = volume_scene(phantoms)
    names = {0: "background", **{k: name for k, name in enumerate(reversed(FOREGROUND.values()), start=1)}}
    order = {v: k for k, v in names.items()}   # segments in another order than the phantom's values
    relabelled = sitk.ChangeLabel(phantoms["moving_labels"], {v: order[n] for v, n in FOREGROUND.items()})
    segmentation = segmentation_from_labels(scene, relabelled, names, "moving labels")
    logic = DeepAtlasLogic(scene, python=sys.executable)
    run = logic.startRun(DeepAtlasInputs(fixed, moving, segmentation),
                         DeepAtlasSettings(str(tmp_path / "unused"), preset="fast", iterations=5, device="cpu",
                                           backend="torch"), workDir=tmp_path / "work")
    while run.isRunning():
        time.sleep(0.05)
    result = run.finish()   # an engine failure raises EngineError with its message
    (_, command), = run.prepared.steps
    assert command[command.index("--backend") + 1] == "torch" and command[command.index("--preset") + 1] == "fast"
    assert "--model" not in command and "--iterations" not in command and "segment" not in command
    assert result.run["registration"]["registration"]["backend"] == "torch" and "segmentation" not in result.run
    assert result.fixedSegmentation is None and result.transform.IsA("vtkMRMLGridTransformNode")
    assert result.warpedVolume.GetImageData().GetDimensions() == phantoms["fixed"].GetSize()
    assert [result.colorTable.GetColorName(v) for v in names] == list(names.values())
    assert scene.GetSubjectHierarchyNode().GetItemName(result.folderItemID) == (
        "Iterative registration (torch) - oblique moving to oblique fixed")
    reference = sitk.GetArrayFromImage(phantoms["fixed_labels"]) > 0
    warped = label_array_of_segmentation(scene, result.warpedSegmentation, fixed, names)
    unregistered = sitk.GetArrayFromImage(sitk.Resample(phantoms["moving_labels"], phantoms["fixed_labels"],
                                                        sitk.Transform(), sitk.sitkNearestNeighbor)) > 0
    assert dice(warped > 0, reference) > max(0.8, dice(unregistered, reference) + 0.3)   # about 0.93 and 0.25
    assert set(segment_names(result.warpedSegmentation)) <= set(FOREGROUND.values())


# ---------------------------------------------------------------------------------------------- cancel, sequences

def test_cancel_stops_the_engine_and_starts_no_further_step(model, phantoms):
    scene, fixed, moving = volume_scene(phantoms)
    nodes_before = scene.GetNumberOfNodes()
    run = DeepAtlasLogic(scene, python=sys.executable).startRun(
        DeepAtlasInputs(fixed, moving), DeepAtlasSettings(str(model), iterations=100000, device="cpu"))
    work = run.prepared.workDir
    time.sleep(1.0)
    assert run.isRunning()
    t0 = time.perf_counter()
    run.cancel()
    assert time.perf_counter() - t0 < 6.0
    assert not run.isRunning() and run.process.current.returnCode() != 0
    assert run.process.current.command == run.prepared.steps[0][1]   # the segmentation never started
    with pytest.raises(EngineCancelled):
        run.finish()
    assert not work.exists() and scene.GetNumberOfNodes() == nodes_before


def test_engine_sequence_runs_steps_in_order_and_stops_at_a_failure():
    """The shared EngineSequence: each step's progress within its share, its messages and log lines in order; a
    failing step ends the sequence with its exit code and its stderr."""
    def step(code: str) -> list[str]:
        return [sys.executable, "-c", code]

    sequence = EngineSequence([("first", step("print('PROGRESS 0.5 half of one')")),
                               ("second", step("print('PROGRESS 1.0 all of two')"))])
    assert sequence.wait(30) == 0
    events = sequence.progressEvents()
    assert [(e.fraction, e.message) for e in events] == [(0.0, "first"), (0.25, "half of one"), (0.5, "second"),
                                                         (1.0, "all of two")]
    log = sequence.newLogLines()
    assert log[0] == "[  0%] first" and any(line.startswith("$ ") for line in log)
    failing = EngineSequence([("bad", step("import sys; sys.stderr.write('boom\\n'); sys.exit(3)")),
                              ("never", step("print('no')"))])
    assert failing.wait(30) == 3 and list(failing.stderrLines) == ["boom"]
    assert failing.current.command[-1].startswith("import sys") and not failing.cancelled


# ---------------------------------------------------------------------------------------------- the panel

def ui_path() -> Path:
    return REPO / MODULE / "Resources" / "UI" / f"{MODULE}.ui"


def test_ui_widgets_parameters_and_sections():
    """Every widget the module and the shared panel code use is in the .ui; bound parameters are fields of the
    parameter node; the Train section is the shared one, collapsed; inputs explain themselves."""
    names = ui_object_names(ui_path())
    own = set(re.findall(r"self\.ui\.(\w+)", (REPO / MODULE / f"{MODULE}.py").read_text()))
    used = own | widgets_used(shared_panel_code()) | widgets_used((REPO / "AtlasSegLib" / "trainingpanel.py"
                                                                   ).read_text())
    assert not sorted(used - set(names)), sorted(used - set(names))
    bound = ui_parameter_names(ui_path())
    fields = parameter_node_fields(REPO / MODULE / f"{MODULE}.py")
    assert {"fixedVolume", "movingVolume", "movingSegmentation", "modelFolder", "iterations", "segmentFixed",
            "trainingAtlasFolder", "trainingEpochs", "trainingModelFolder"} <= bound <= fields
    assert {"backend", "preset", "device"} <= fields and "backendComboBox" in names   # combos the module fills
    widgets = ui_widgets(ui_path())
    for name in ("trainButton", "resumeButton", "trainingModelFolderPathLineEdit"):
        assert "trainCollapsibleButton" in ui_ancestors(ui_path(), name)
    inputs = {"QComboBox", "QSpinBox", "QCheckBox", "ctkPathLineEdit", "qMRMLNodeComboBox"}
    for name, widget in widgets.items():
        if widget.get("class") in inputs:
            assert widget.find("property[@name='toolTip']") is not None, f"{name} has no tooltip"
    assert not (set(names) & {"logTextEdit", "logCollapsibleButton"})


def test_module_file_structure_and_self_test():
    """The module classes on the shared base, a ScriptedLoadableModuleTest whose listed tests exist, and CMake
    listing every file of the module."""
    source = (REPO / MODULE / f"{MODULE}.py").read_text()
    tree = ast.parse(source)
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    assert {f"{MODULE}", f"{MODULE}Widget", f"{MODULE}Logic", f"{MODULE}Test"} <= set(classes)
    test = classes[f"{MODULE}Test"]
    methods = {node.name for node in test.body if isinstance(node, ast.FunctionDef)}
    listed = next(ast.literal_eval(node.value) for node in test.body if isinstance(node, ast.Assign)
                  and node.targets[0].id == "selfTests")
    assert listed and set(listed) <= methods and all(name.startswith("test_") for name in listed)
    cmake = (REPO / MODULE / "CMakeLists.txt").read_text()
    assert "slicer_add_python_unittest" in cmake and "WITH_GENERIC_TESTS" in cmake
    files = [item.replace("${MODULE_NAME}", MODULE) for item in re.findall(r"^\s+(\$\{MODULE_NAME\}\S+|Resources\S+)",
                                                                           cmake, re.M)]
    lib = {p.relative_to(REPO / MODULE).as_posix() for p in (REPO / MODULE / f"{MODULE}Lib").glob("*.py")}
    assert lib <= set(files) and all((REPO / MODULE / f).is_file() for f in files)
    icon = (REPO / MODULE / "Resources" / "Icons" / f"{MODULE}.png").read_bytes()
    assert icon[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(icon[16:20], "big") == 128
    assert f"add_subdirectory({MODULE})" in (REPO / "CMakeLists.txt").read_text() or MODULE in (
        REPO / "CMakeLists.txt").read_text()


def deepatlas_example(panel) -> None:
    """The state of a finished run, with the texts of a real one: hippocampus_042 registered to hippocampus_017 by
    the benchmark's deepatlas_5 model trained at f219c0a (`atlasseg register`, 6 s on 2 CPU cores; the model line
    as the panel reads it from that folder)."""
    from PySide6.QtWidgets import QComboBox, QLabel, QLineEdit, QWidget

    for name, text in (("fixedVolumeSelector", "hippocampus_017"), ("movingVolumeSelector", "hippocampus_042"),
                       ("movingSegmentationSelector", "hippocampus_042 segmentation"),
                       ("mapSelector", "DeepAtlas - hippocampus_042 to hippocampus_017 Jacobian determinant"),
                       ("backendComboBox", "Trained DeepAtlas model (fast)"),
                       ("presetComboBox", "Default (one network pass)"), ("deviceComboBox", "Auto")):
        panel.findChild(QComboBox, name).addItem(text)
    panel.findChild(QLineEdit, "modelFolderPathLineEdit").setText("/data/models/deepatlas-hippocampus")
    panel.findChild(QLabel, "modelInfoLabel").setText(
        "DeepAtlas (svf field on a 48x64x48 common grid, trained with 5 labelled case(s)); labels: Anterior, "
        "Posterior; modality: MRI")
    panel.findChild(QLabel, "statusLabel").setText(
        "Done in 6 s: folding in 0.000% of the voxels, Jacobian determinant 0.05 to 7.16. Apply the transform to "
        "any node in the Transforms module.")
    panel.findChild(QWidget, "progressBar").hide()
    panel.findChild(QWidget, "metricsTableView").hide()


def test_ui_loads_and_renders_offscreen(tmp_path):
    qt_app()
    from PySide6.QtGui import QImage
    from PySide6.QtWidgets import QPushButton, QWidget

    widget = load_ui(ui_path())
    for name in ui_object_names(ui_path()):
        assert name == MODULE or widget.findChild(QWidget, name) is not None, name
    assert isinstance(widget.findChild(QWidget, "applyButton"), QPushButton)
    png = tmp_path / "panel.png"
    width, height = render_panel(MODULE, png, deepatlas_example)
    image = QImage(str(png))
    assert (image.width(), image.height()) == (width, height) and width >= 400 and height >= 350
    colours = {image.pixel(x, y) for x in range(0, width, 7) for y in range(0, height, 7)}
    assert len(colours) > 20, "the rendering is blank"


def test_module_library_does_not_copy_the_shared_library():
    shared = set()
    for path in (REPO / "AtlasSegLib").glob("*.py"):
        shared |= {n.name for n in ast.parse(path.read_text()).body if isinstance(n, (ast.FunctionDef,
                                                                                       ast.ClassDef))}
    for path in (REPO / MODULE / f"{MODULE}Lib").glob("*.py"):
        own = {n.name for n in ast.parse(path.read_text()).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        assert not own & shared, f"{path.name} redefines {sorted(own & shared)}"


def test_module_help_names_the_engine_commands():
    """The engine commands the module runs are the documented CLI (``atlasseg register --help`` lists its flags)."""
    help_text = subprocess.run([sys.executable, "-m", "atlasseg", "register", "--help"], capture_output=True,
                               text=True, timeout=60, check=True).stdout
    for flag in ("--fixed", "--moving", "--moving-label", "--model", "--output", "--preset", "--iterations"):
        assert flag in help_text


def test_broken_moving_volume_is_refused_naming_the_node(phantoms, tmp_path):
    """The shared input writer applies the engine's image rules here too (no model needed: iterative backend)."""
    from Testing.test_slicer_logic import broken_volume

    scene, fixed, moving = volume_scene(phantoms)
    image, expected = broken_volume("nan", phantoms["moving"])
    updateVolumeNodeFromImage(moving, image)
    started = []
    logic = DeepAtlasLogic(scene, python=sys.executable, processFactory=lambda *a: started.append(a))
    with pytest.raises(EngineError) as error:
        logic.startRun(DeepAtlasInputs(fixed, moving), DeepAtlasSettings(backend="torch", device="cpu"),
                       workDir=tmp_path / "work")
    assert str(error.value) == f"Volume '{moving.GetName()}': {expected}." and not started


if __name__ == "__main__":   # PYTHONPATH=.:Testing python Testing/test_deepatlas_slicer.py: rewrite the screenshot
    out = REPO / MODULE / "Resources" / "Screenshots" / f"{MODULE}_panel.png"
    print(render_panel(MODULE, out, deepatlas_example), out)
