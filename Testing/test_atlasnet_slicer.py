"""The AtlasNetSeg module's Qt-free logic on a real MRML scene (slicer-core), with the real engine process.

No mocks: a tiny AtlasNet model is trained once by the engine's own CLI on phantoms (2 networks, 4-8-16 U-Nets,
affine registrations, about 15 s on 2 cores); the logic then segments an oblique, anisotropic target volume node
through ``python -m atlasseg segment --method atlasnet`` in a subprocess and loads the outputs as nodes.
"""

from __future__ import annotations

import json
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
sys.path.insert(0, str(REPO / "AtlasNetSeg"))

from AtlasNetSegLib import (  # noqa: E402
    AtlasNetInputs,
    AtlasNetLogic,
    AtlasNetSettings,
    ModelFolderProblem,
    readModelInfo,
)

from atlasseg.phantom import PHANTOM_LABELS, make_phantom, make_phantom_atlas_set  # noqa: E402
from AtlasSegLib import EngineCancelled, EngineError, EngineProcess, updateVolumeNodeFromImage  # noqa: E402
from AtlasSegLib.results import MAP_KIND_ATTRIBUTE, PALETTE  # noqa: E402
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

TRAINING_GRID = {"shape": (24, 24, 24), "spacing": (1.5, 1.5, 1.5)}
TARGET_GRID = {"shape": (22, 26, 18), "spacing": (1.3, 1.6, 2.2),        # anisotropic and oblique
               "direction": tuple(sitk.VersorTransform((0.3, -0.5, 0.8), 0.4).GetMatrix())}
FOREGROUND = {v: n for v, n in PHANTOM_LABELS.items() if v}
N_NETWORKS = 2


@pytest.fixture(scope="session")
def atlasnet_model(tmp_path_factory) -> Path:
    """A 2-network AtlasNet model trained by the engine's CLI (8 epochs of tiny U-Nets, affine registrations)."""
    work = tmp_path_factory.mktemp("atlasnet_slicer")
    atlases = make_phantom_atlas_set(work / "atlases", n_cases=4, seed=1, **TRAINING_GRID)
    model = work / "model"
    subprocess.run([sys.executable, "-m", "atlasseg", "train", "--method", "atlasnet", "--atlases", str(atlases),
                    "--output", str(model), "--n-networks", str(N_NETWORKS), "--backbone-kwargs",
                    '{"channels": [4, 8, 16]}', "--epochs", "8", "--patch-size", "16", "16", "16", "--learning-rate",
                    "0.01", "--patches-per-target", "2", "--val-fraction", "0.25", "--preset", "affine", "--device",
                    "cpu", "--quiet"], check=True, capture_output=True, timeout=600)
    return model


@pytest.fixture(scope="module")
def phantom_target() -> tuple[sitk.Image, sitk.Image]:
    image, labels = make_phantom(4243, **TARGET_GRID)
    image.SetOrigin((12.5, -30.25, 7.0))
    labels.SetOrigin((12.5, -30.25, 7.0))
    return image, labels


def target_scene(image: sitk.Image):
    scene = new_scene()
    target = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "oblique target")
    updateVolumeNodeFromImage(target, image)
    return scene, target


@pytest.fixture(scope="module")
def atlasnet_run(atlasnet_model, phantom_target, tmp_path_factory):
    """One real engine run through the logic, with a reference segmentation, per-network segmentations not asked."""
    image, labels = phantom_target
    scene, target = target_scene(image)
    reference = segmentation_from_labels(scene, labels, PHANTOM_LABELS, "phantom reference")
    before = {"target": snapshot(target), "reference": snapshot(reference)}
    logic = AtlasNetLogic(scene, python=sys.executable)
    work = tmp_path_factory.mktemp("atlasnet_work")
    events = []
    t0 = time.perf_counter()
    run = logic.startRun(AtlasNetInputs(target, referenceSegmentation=reference),
                         AtlasNetSettings(str(atlasnet_model), device="cpu"), workDir=work)
    while run.isRunning():
        time.sleep(0.05)
        events += run.poll()
    events += run.poll()
    result = run.finish()
    return {"scene": scene, "logic": logic, "target": target, "reference": reference, "labels": labels,
            "result": result, "events": events, "before": before, "command": list(run.prepared.command),
            "work": work, "output": work / "output", "seconds": time.perf_counter() - t0}


def engine_array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


# ---------------------------------------------------------------------------------------------- the model folder

def test_model_summary_comes_from_config_json(atlasnet_model):
    model = readModelInfo(atlasnet_model)
    config = json.loads((atlasnet_model / "config.json").read_text())
    assert model.atlasIds == config["architecture"]["atlas_ids"] and model.nNetworks == N_NETWORKS
    assert model.labels == PHANTOM_LABELS and model.modalities == ["MRI"]
    assert model.registration == {"backend": "torch", "preset": "affine"}
    summary = model.summary()
    assert summary.startswith(f"AtlasNet, {N_NETWORKS} networks (unet, mean fusion) on atlases ")
    assert all(a in summary for a in model.atlasIds) and "labels: tissue, ventricles" in summary


def wrong_folders(tmp_path: Path, model: Path) -> dict[str, tuple[Path, str]]:
    """Folders a user could pick by mistake -> (folder, what the message must say)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(model / name, incomplete / name)
    return {"empty": (empty, f"{empty} is not a model folder (no config.json); train one with: atlasseg train "
                             "--method atlasnet"),
            "missing": (tmp_path / "nope", f"The model folder {tmp_path / 'nope'} does not exist."),
            "dlf": (REPO / "Testing" / "data" / "format1_dlf", "holds a Deep Label Fusion model (open it in the "
                    "DeepLabelFusion module), not an AtlasNet model."),
            "segmenter": (REPO / "Testing" / "data" / "format1_unet", "holds a Segmentation network model, not an "
                          "AtlasNet model."),
            "incomplete": (incomplete, f"{incomplete / 'atlases.safetensors'} is missing")}


@pytest.mark.parametrize("case", ["empty", "missing", "dlf", "segmenter", "incomplete"])
def test_wrong_model_folder_is_refused_before_the_engine_starts(case, atlasnet_model, phantom_target, tmp_path):
    folder, expected = wrong_folders(tmp_path, atlasnet_model)[case]
    scene, target = target_scene(phantom_target[0])
    started = []
    logic = AtlasNetLogic(scene, python=sys.executable,
                          processFactory=lambda command, env: started.append(command) or EngineProcess(command, env))
    nodes = scene.GetNumberOfNodes()
    with pytest.raises(EngineError) as error:
        logic.startRun(AtlasNetInputs(target), AtlasNetSettings(str(folder), device="cpu"))
    assert expected in str(error.value) and "\n" not in str(error.value)
    assert isinstance(error.value, EngineError) and not started and scene.GetNumberOfNodes() == nodes
    assert logic.inputProblems(AtlasNetInputs(target), AtlasNetSettings(str(folder)))[0] == str(error.value)
    with pytest.raises(ModelFolderProblem):
        readModelInfo(folder)


def test_input_problems_are_explained(atlasnet_model, phantom_target):
    scene, target = target_scene(phantom_target[0])
    logic = AtlasNetLogic(scene, python=sys.executable)
    assert logic.inputProblems(AtlasNetInputs(target), AtlasNetSettings(str(atlasnet_model))) == []
    assert logic.inputProblems(AtlasNetInputs(None), AtlasNetSettings(str(atlasnet_model))) == [
        "Select a target volume."]
    assert logic.inputProblems(AtlasNetInputs(target, [target]), AtlasNetSettings(str(atlasnet_model))) == [
        "The model takes 1 image(s) per target (MRI); select 1, in that order."]
    assert logic.inputProblems(AtlasNetInputs(target), AtlasNetSettings(str(atlasnet_model), device="tpu")) == [
        "Unknown device 'tpu' (choose auto, cpu, gpu)."]
    assert logic.inputProblems(AtlasNetInputs(target), AtlasNetSettings(""))[0].startswith(
        "Choose a trained AtlasNet model folder")


# ---------------------------------------------------------------------------------------------- the engine run

def test_command_is_the_engine_cli(atlasnet_run, atlasnet_model):
    command, work = atlasnet_run["command"], atlasnet_run["work"]
    assert command[:4] == [sys.executable, "-m", "atlasseg", "segment"]
    for flag, value in (("--method", "atlasnet"), ("--model", str(atlasnet_model)), ("--device", "cpu"),
                        ("--preset", "affine"), ("--backend", "torch"), ("--output", str(work / "output"))):
        assert command[command.index(flag) + 1] == value, flag
    assert "--maps" in command and "--reference" in command
    assert command[command.index("--target") + 1] == str(work / "target_0000.nii.gz")
    label_check = json.loads((Path(command[command.index("--atlases") + 1]) / "dataset.json").read_text())
    assert {int(v): n for v, n in label_check["labels"].items()} == PHANTOM_LABELS
    assert label_check["modality"] == {"0": "MRI"}


def test_run_reports_progress_while_running(atlasnet_run):
    fractions = [e.fraction for e in atlasnet_run["events"]]
    messages = " ".join(e.message for e in atlasnet_run["events"])
    assert len(fractions) >= 3 and fractions == sorted(fractions) and fractions[-1] == 1.0
    assert "affine" in messages and "AtlasNet" in messages
    assert atlasnet_run["seconds"] < 120


def test_target_written_and_results_loaded_on_the_target_grid(atlasnet_run, phantom_target):
    """Geometry round trip: node -> engine file (LPS) -> result nodes exactly on the target's RAS grid."""
    written = sitk.ReadImage(str(atlasnet_run["work"] / "target_0000.nii.gz"))
    image = phantom_target[0]
    for getter in ("GetSpacing", "GetOrigin", "GetDirection"):
        assert np.abs(np.subtract(getattr(written, getter)(), getattr(image, getter)())).max() < 1e-4, getter
    assert np.array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(image))
    result, target = atlasnet_run["result"], atlasnet_run["target"]
    for node in result.maps():
        assert np.array_equal(node_ijk_to_ras(node), node_ijk_to_ras(target)), node.GetName()
        assert node.GetNodeReference("AtlasSegTarget") is target
        assert node.GetImageData().GetDimensions() == image.GetSize()


def test_segmentation_is_the_engines_with_the_model_label_names_and_colours(atlasnet_run):
    result, scene = atlasnet_run["result"], atlasnet_run["scene"]
    title = "AtlasNet - oblique target"
    assert result.segmentation.GetName() == f"{title} segmentation"
    names = segment_names(result.segmentation)
    assert names and set(names) <= set(FOREGROUND.values())
    segmentation = result.segmentation.GetSegmentation()
    for k in range(segmentation.GetNumberOfSegments()):
        value = next(v for v, n in FOREGROUND.items() if n == segmentation.GetNthSegment(k).GetName())
        assert segmentation.GetNthSegment(k).GetColor() == pytest.approx(PALETTE[value - 1], abs=0.5 / 255)
    assert [result.colorTable.GetColorName(v) for v in range(5)] == [PHANTOM_LABELS[v] for v in range(5)]
    loaded = label_array_of_segmentation(scene, result.segmentation, atlasnet_run["target"], PHANTOM_LABELS)
    engine = engine_array(atlasnet_run["output"] / "segmentation.nii.gz")
    assert np.array_equal(loaded, engine)
    for value in np.unique(engine[engine > 0]):
        assert dice(loaded == value, engine == value) == 1.0


def test_dice_against_the_reference_equals_the_engines(atlasnet_run):
    result, scene = atlasnet_run["result"], atlasnet_run["scene"]
    loaded = label_array_of_segmentation(scene, result.segmentation, atlasnet_run["target"], PHANTOM_LABELS)
    reference = sitk.GetArrayFromImage(atlasnet_run["labels"])
    engine = json.loads((atlasnet_run["output"] / "metrics.json").read_text())
    assert result.metrics == engine
    for value in FOREGROUND:
        ours = dice(loaded == value, reference == value) if np.any(loaded == value) else 0.0
        assert ours == pytest.approx(engine["labels"][str(value)]["dice"], abs=1e-12), FOREGROUND[value]
    table = result.metricsTable.GetTable()
    assert table.GetNumberOfRows() == len(FOREGROUND) + 1
    assert table.GetValue(0, 1).ToDouble() == pytest.approx(engine["labels"]["1"]["dice"], abs=1e-12)
    assert engine["labels"]["1"]["dice"] > 0.5  # tissue: a real segmentation, not an empty one


def test_probability_maps_per_network_and_the_agreement_map(atlasnet_run):
    result, output = atlasnet_run["result"], atlasnet_run["output"]
    networks = result.run["networks"]
    assert sorted(result.networkProbabilityMaps) == [n["index"] for n in networks] == list(range(N_NETWORKS))
    assert sorted(result.probabilityMaps) == sorted(FOREGROUND.values())
    for network in networks:
        maps = result.networkProbabilityMaps[network["index"]]
        assert sorted(maps) == sorted(FOREGROUND.values())
        name = f"AtlasNet - oblique target network {network['index']} ({network['atlas']}) probability tissue"
        assert maps["tissue"].GetName() == name
        assert np.array_equal(array_of(maps["tissue"]), engine_array(Path(result.run["files"][
            f"probability_{network['index']}_1"])))
    assert len(result.maps()) == (N_NETWORKS + 1) * len(FOREGROUND) + 2   # + agreement, oracle
    fused = array_of(result.probabilityMaps["tissue"])
    assert fused.dtype == np.float32 and 0.0 <= fused.min() and fused.max() <= 1.0 + 1e-6 and fused.max() > 0.5
    agreement = array_of(result.agreement)
    assert np.array_equal(agreement, engine_array(output / "maps" / "agreement.nii.gz"))
    assert set(np.unique(agreement)) <= {0.0, 0.5, 1.0} and agreement.max() == 1.0
    assert result.agreement.GetName() == "AtlasNet - oblique target network agreement"
    assert result.agreement.GetAttribute(MAP_KIND_ATTRIBUTE) == "agreement"
    assert result.probabilityMaps["tissue"].GetAttribute(MAP_KIND_ATTRIBUTE) == "probability"


def test_maps_are_shown_one_at_a_time_over_the_target(atlasnet_run):
    result, scene, logic = atlasnet_run["result"], atlasnet_run["scene"], atlasnet_run["logic"]
    composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    logic.showMap(result.agreement)
    assert composite.GetBackgroundVolumeID() == atlasnet_run["target"].GetID()
    assert composite.GetForegroundVolumeID() == result.agreement.GetID()
    assert composite.GetForegroundOpacity() == pytest.approx(0.5)
    tissue = result.networkProbabilityMaps[1]["tissue"]
    logic.showMap(tissue, opacity=0.3)
    assert composite.GetForegroundVolumeID() == tissue.GetID() and composite.GetForegroundOpacity() == 0.3
    display = tissue.GetDisplayNode()
    assert display.GetColorNodeID() == "vtkMRMLColorTableNodeRainbow" and display.GetApplyThreshold()


def test_per_network_segmentations_only_when_asked(atlasnet_run):
    first = atlasnet_run["result"]
    names = [atlasnet_run["scene"].GetNthNode(k).GetName() or "" for k in
             range(atlasnet_run["scene"].GetNumberOfNodes())]
    assert first.networkSegmentations == {} and not [n for n in names if "network 0" in n and "segmentation" in n]
    scene, target = target_scene(atlasnet_run["labels"])   # the same grid: load the same outputs again
    asked = AtlasNetLogic(scene, python=sys.executable).loadResults(
        atlasnet_run["output"], AtlasNetInputs(target), AtlasNetSettings(networkSegmentations=True))
    assert sorted(asked.networkSegmentations) == list(range(N_NETWORKS))
    sh = scene.GetSubjectHierarchyNode()
    for index, node in asked.networkSegmentations.items():
        atlas = asked.run["networks"][index]["atlas"]
        assert node.GetName() == f"AtlasNet - oblique target network {index} ({atlas}) segmentation"
        assert not node.GetDisplayNode().GetVisibility()
        assert sh.GetItemName(sh.GetItemParent(sh.GetItemByDataNode(node))) == f"Network {index} ({atlas})"
        loaded = label_array_of_segmentation(scene, node, target, PHANTOM_LABELS)
        assert np.array_equal(loaded, engine_array(atlasnet_run["output"] / "maps" / f"segmentation_{index}.nii.gz"))


def test_results_sit_in_one_subject_hierarchy_folder(atlasnet_run):
    result, scene = atlasnet_run["result"], atlasnet_run["scene"]
    sh = scene.GetSubjectHierarchyNode()
    folder = result.folderItemID
    assert sh.GetItemName(folder) == "AtlasNet - oblique target" and sh.GetItemParent(folder) == sh.GetSceneItemID()
    assert_under_folder(scene, folder, [result.segmentation, result.colorTable, result.metricsTable, *result.maps()])
    fused_item = sh.GetItemByDataNode(result.probabilityMaps["tissue"])
    assert sh.GetItemName(sh.GetItemParent(fused_item)) == "Probability maps"


def test_inputs_are_not_modified_and_nothing_is_left_behind(atlasnet_run):
    assert snapshot(atlasnet_run["target"]) == atlasnet_run["before"]["target"]
    assert snapshot(atlasnet_run["reference"]) == atlasnet_run["before"]["reference"]
    scene = atlasnet_run["scene"]
    names = [scene.GetNthNode(k).GetName() or "" for k in range(scene.GetNumberOfNodes())]
    assert not [n for n in names if n.startswith("__AtlasSeg")], names


# ---------------------------------------------------------------------------------------------- cancel, errors

def test_cancel_stops_the_process_quickly(atlasnet_model, phantom_target):
    scene, target = target_scene(phantom_target[0])
    nodes_before = scene.GetNumberOfNodes()
    run = AtlasNetLogic(scene, python=sys.executable).startRun(
        AtlasNetInputs(target), AtlasNetSettings(str(atlasnet_model), device="cpu", preset="accurate"))
    work = run.prepared.workDir
    deadline = time.time() + 60
    while not run.poll() and run.isRunning() and time.time() < deadline:
        time.sleep(0.05)
    assert run.isRunning(), "the engine ended before it could be cancelled"
    t0 = time.perf_counter()
    run.cancel()
    assert time.perf_counter() - t0 < 6.0
    assert not run.isRunning() and run.process.returnCode() != 0
    with pytest.raises(EngineCancelled):
        run.finish()
    assert not work.exists() and scene.GetNumberOfNodes() == nodes_before


def test_a_damaged_model_is_a_readable_engine_error(atlasnet_model, phantom_target, tmp_path):
    """What the panel cannot see (the weights do not match their checksum) comes back from the engine as one
    sentence naming the file."""
    damaged = tmp_path / "damaged"
    shutil.copytree(atlasnet_model, damaged, ignore=shutil.ignore_patterns("registration_cache", "networks"))
    data = bytearray((damaged / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (damaged / "model.safetensors").write_bytes(bytes(data))
    scene, target = target_scene(phantom_target[0])
    with pytest.raises(EngineError) as error:
        AtlasNetLogic(scene, python=sys.executable).runBlocking(
            AtlasNetInputs(target), AtlasNetSettings(str(damaged), device="cpu"))
    message = str(error.value)
    assert "model.safetensors" in message and "checksum" in message, message
    assert "Traceback" not in message and "\n" not in message
