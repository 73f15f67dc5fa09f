"""The DeepLabelFusion module's Qt-free logic on a real MRML scene (slicer-core), with the real engine process.

No mocks: volumes go through Slicer's own NRRD reader, segmentations through Slicer's segmentation logic, and
the engine runs as a subprocess (this interpreter, ``-m atlasseg``) on small phantoms with ``--preset fast``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the 'slicer' package found is not slicer-core (no vtkMRMLScene)", allow_module_level=True)
import vtk  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "DeepLabelFusion"))

from DeepLabelFusionLib import (  # noqa: E402
    EngineCancelled,
    EngineError,
    FusionInputs,
    FusionLogic,
    FusionSettings,
    GeometryError,
    ProgressEvent,
    ijkToRasFromImage,
    parseProgressLine,
    readableEngineError,
    updateVolumeNodeFromImage,
    volumeNodeToImage,
)

from atlasseg.phantom import PHANTOM_LABELS, make_phantom, make_phantom_atlas_set  # noqa: E402
from AtlasSegLib.geometry import vtkMatrixToNumpy  # noqa: E402
from AtlasSegLib.results import MAP_STYLES, PALETTE  # noqa: E402
from Testing.slicer_scene import (  # noqa: E402
    array_of,
    dice,
    label_array_of_segmentation,
    new_scene,
    node_ijk_to_ras,
    segment_names,
    segmentation_from_labels,
    snapshot,
)

PHANTOM_GRID = {"shape": (20, 24, 22), "spacing": (1.6, 1.4, 1.9),
                "direction": tuple(sitk.VersorTransform((0.2, -0.4, 0.9), 0.35).GetMatrix())}
FAST = {"preset": "fast", "device": "cpu"}


def oblique_image(dtype=np.int16) -> sitk.Image:
    image = sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 1000, (5, 6, 7)).astype(dtype))
    image.SetSpacing((0.7, 1.3, 2.9))
    image.SetOrigin((12.5, -30.25, 7.0))
    image.SetDirection(sitk.VersorTransform((0.3, -0.5, 0.8), 0.4).GetMatrix())
    return image


def voxel_ras(node, ijk) -> np.ndarray:
    return (node_ijk_to_ras(node) @ np.append(np.asarray(ijk, float), 1.0))[:3]


def voxel_lps(image: sitk.Image, ijk) -> np.ndarray:
    return np.asarray(image.TransformContinuousIndexToPhysicalPoint([float(v) for v in ijk]))


# ---------------------------------------------------------------------------------------------- geometry

def test_geometry_matches_slicers_own_nrrd_reader(tmp_path):
    """Our LPS->RAS mapping equals what Slicer's reader builds from the same file, voxel for voxel."""
    image = oblique_image()
    path = tmp_path / "oblique.nrrd"
    sitk.WriteImage(image, str(path))
    scene = new_scene()
    read_by_slicer = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "read by Slicer")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(read_by_slicer)

    assert np.abs(node_ijk_to_ras(read_by_slicer) - ijkToRasFromImage(image)).max() < 1e-9
    for ijk in [(0, 0, 0), (6, 5, 4), (3.5, 1.25, 2.0)]:
        ras = voxel_ras(read_by_slicer, ijk)
        lps = voxel_lps(image, ijk)
        assert np.abs(ras - lps * np.array([-1, -1, 1])).max() < 1e-9
    back = volumeNodeToImage(read_by_slicer)
    assert np.abs(np.array(back.GetOrigin()) - image.GetOrigin()).max() < 1e-9
    assert np.abs(np.array(back.GetSpacing()) - image.GetSpacing()).max() < 1e-12
    assert np.abs(np.array(back.GetDirection()) - image.GetDirection()).max() < 1e-12
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))


def test_geometry_round_trip_image_node_image_is_exact():
    image = oblique_image(np.float32)
    scene = new_scene()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "oblique")
    updateVolumeNodeFromImage(node, image)
    assert node.GetImageData().GetDimensions() == image.GetSize()
    assert node.GetSpacing() == pytest.approx(image.GetSpacing(), abs=1e-12)
    for ijk in [(0, 0, 0), (6, 5, 4), (1, 4, 3)]:
        assert np.abs(voxel_ras(node, ijk) - voxel_lps(image, ijk) * [-1, -1, 1]).max() < 1e-9
    back = volumeNodeToImage(node)
    for getter in ("GetSpacing", "GetOrigin", "GetDirection"):
        assert np.abs(np.subtract(getattr(back, getter)(), getattr(image, getter)())).max() < 1e-12, getter
    assert back.GetPixelID() == sitk.sitkFloat32
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))


def test_linear_parent_transform_is_applied_and_shear_is_refused():
    scene = new_scene()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "moved")
    image = oblique_image()
    updateVolumeNodeFromImage(node, image)
    rigid = vtk.vtkTransform()
    rigid.Translate(10.0, -4.0, 2.5)
    rigid.RotateWXYZ(30.0, 0.0, 0.0, 1.0)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "rigid")
    transform.SetMatrixTransformToParent(rigid.GetMatrix())
    node.SetAndObserveTransformNodeID(transform.GetID())
    world = volumeNodeToImage(node)
    ijk = (6, 5, 4)
    expected_ras = vtkMatrixToNumpy(rigid.GetMatrix()) @ np.append(voxel_ras(node, ijk), 1.0)
    assert np.abs(voxel_lps(world, ijk) * [-1, -1, 1] - expected_ras[:3]).max() < 1e-9
    local = volumeNodeToImage(node, world=False)
    assert np.abs(np.subtract(local.GetOrigin(), image.GetOrigin())).max() < 1e-9

    shear = vtk.vtkMatrix4x4()
    shear.SetElement(0, 1, 0.3)
    transform.SetMatrixTransformToParent(shear)
    with pytest.raises(GeometryError, match="sheared"):
        volumeNodeToImage(node)


# ---------------------------------------------------------------------------------------------- engine process

def test_progress_lines_and_error_messages_are_parsed():
    assert parseProgressLine("PROGRESS 0.4250 registration 3/10\n") == ProgressEvent(0.425, "registration 3/10")
    assert parseProgressLine("segmentation: out/segmentation.nii.gz") is None
    failure = ["Traceback (most recent call last):", "atlasseg segment: error: x.nii: file not found"]
    assert readableEngineError(2, failure) == "x.nii: file not found"
    oom = readableEngineError(1, ["Traceback (most recent call last):", "  File ...",
                                  "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB"])
    assert "Device: CPU" in oom and "Traceback" not in oom
    assert "signal 9" in readableEngineError(-9, [])
    kernel = readableEngineError(1, ["RuntimeError: CUDA error: no kernel image is available for execution on the "
                                     "device"])
    assert "Device: CPU" in kernel and "PyTorch Utils" in kernel
    driver = readableEngineError(1, ["RuntimeError: CUDA driver version is insufficient for CUDA runtime version"])
    assert "Device: CPU" in driver


@pytest.fixture(scope="module")
def phantom_atlases(tmp_path_factory) -> Path:
    return make_phantom_atlas_set(tmp_path_factory.mktemp("dlf") / "atlases", n_cases=3, seed=11, **PHANTOM_GRID)


@pytest.fixture(scope="module")
def phantom_target() -> tuple[sitk.Image, sitk.Image]:
    return make_phantom(4242, **PHANTOM_GRID)


def phantom_scene(image: sitk.Image, labels: sitk.Image):
    """A fresh scene with the phantom as target volume and its labels as reference segmentation."""
    scene = new_scene()
    target = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "phantom target")
    updateVolumeNodeFromImage(target, image)
    return scene, target, segmentation_from_labels(scene, labels, PHANTOM_LABELS, "phantom reference")


@pytest.fixture(scope="module")
def weighted_run(phantom_atlases, phantom_target, tmp_path_factory):
    """One real engine run through the logic: folder atlases, reference segmentation, weighted voting."""
    image, labels = phantom_target
    scene, target, reference = phantom_scene(image, labels)
    before = {"target": snapshot(target), "reference": snapshot(reference)}
    logic = FusionLogic(scene, python=sys.executable)
    events = []
    work = tmp_path_factory.mktemp("weighted_work")
    t0 = time.perf_counter()
    run = logic.startRun(FusionInputs(target, atlasFolder=str(phantom_atlases), referenceSegmentation=reference),
                         FusionSettings(method="weighted", nAtlases=3, **FAST), workDir=work)
    command = list(run.prepared.command)
    while run.isRunning():
        time.sleep(0.05)
        events += run.poll()
    events += run.poll()
    result = run.finish()
    return {"scene": scene, "logic": logic, "target": target, "reference": reference, "labels": labels,
            "result": result, "events": events, "before": before, "command": command, "work": work,
            "seconds": time.perf_counter() - t0,
            "engine_metrics": json.loads((work / "output" / "metrics.json").read_text())}


def test_run_reports_progress_while_running(weighted_run):
    fractions = [e.fraction for e in weighted_run["events"]]
    messages = " ".join(e.message for e in weighted_run["events"])
    assert len(fractions) >= 5
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert "registration" in messages and "weighted" in messages
    assert weighted_run["seconds"] < 60


def test_command_is_the_engine_cli(weighted_run, phantom_atlases):
    command = weighted_run["command"]
    assert command[:4] == [sys.executable, "-m", "atlasseg", "segment"]
    for flag, value in (("--method", "weighted"), ("--n-atlases", "3"), ("--preset", "fast"), ("--device", "cpu"),
                        ("--atlases", str(phantom_atlases))):
        assert command[command.index(flag) + 1] == value
    assert "--maps" in command and "--reference" in command and "--jlf-alpha" not in command


def test_segmentation_node_dice_equals_engine_report(weighted_run):
    result, scene = weighted_run["result"], weighted_run["scene"]
    predicted = label_array_of_segmentation(scene, result.segmentation, weighted_run["target"], PHANTOM_LABELS)
    reference = sitk.GetArrayFromImage(weighted_run["labels"])
    engine = weighted_run["engine_metrics"]["labels"]
    for value in (1, 2, 3, 4):
        ours = dice(predicted == value, reference == value)
        assert ours == pytest.approx(engine[str(value)]["dice"], abs=1e-12), PHANTOM_LABELS[value]
    assert engine["1"]["dice"] > 0.85  # tissue: a real segmentation, not an empty one


def test_result_nodes_names_colours_and_segments(weighted_run):
    result = weighted_run["result"]
    title = "Local weighted voting - phantom target"
    assert result.segmentation.GetName() == f"{title} segmentation"
    assert sorted(segment_names(result.segmentation)) == sorted(n for v, n in PHANTOM_LABELS.items() if v)
    seg = result.segmentation.GetSegmentation()
    for k in range(seg.GetNumberOfSegments()):
        segment = seg.GetNthSegment(k)
        value = next(v for v, n in PHANTOM_LABELS.items() if n == segment.GetName())
        assert segment.GetColor() == pytest.approx(PALETTE[value - 1], abs=0.5 / 255)  # 8-bit lookup table
    table = result.colorTable
    assert [table.GetColorName(v) for v in range(5)] == [PHANTOM_LABELS[v] for v in range(5)]
    assert result.segmentation.GetDisplayNode().GetOpacity2DFill() == pytest.approx(0.35)

    assert sorted(result.voteMaps) == sorted(PHANTOM_LABELS.values())
    assert result.voteMaps["hippocampus"].GetName() == f"{title} votes hippocampus"
    assert sorted(result.weightMaps) == sorted(result.run["atlases"]) and len(result.weightMaps) == 3
    assert result.agreement.GetName() == f"{title} atlas agreement"
    assert result.oracle.GetName() == f"{title} oracle coverage"
    for node in result.maps():
        assert np.array_equal(node_ijk_to_ras(node), node_ijk_to_ras(weighted_run["target"]))  # snapped exactly
        assert node.GetNodeReference("AtlasSegTarget") is weighted_run["target"]
    votes = array_of(result.voteMaps["tissue"])
    assert votes.dtype == np.float32 and 0.0 <= votes.min() and votes.max() <= 1.0 + 1e-6 and votes.max() > 0.9


def test_map_display_properties(weighted_run):
    result = weighted_run["result"]
    vote = result.voteMaps["ventricles"].GetDisplayNode()
    assert vote.GetColorNodeID() == MAP_STYLES["votes"].colorNodeID == "vtkMRMLColorTableNodeRainbow"
    assert not vote.GetAutoWindowLevel() and (vote.GetWindow(), vote.GetLevel()) == pytest.approx((1.0, 0.5))
    assert vote.GetApplyThreshold() and vote.GetLowerThreshold() == pytest.approx(0.01)
    oracle = result.oracle.GetDisplayNode()
    assert oracle.GetColorNodeID() == "vtkMRMLColorTableNodeRed"
    assert oracle.GetApplyThreshold() and (oracle.GetLowerThreshold(), oracle.GetUpperThreshold()) == (0.0, 0.5)
    weights = next(iter(result.weightMaps.values()))
    weight_array = array_of(weights)
    display = weights.GetDisplayNode()
    assert display.GetColorNodeID() == "vtkMRMLColorTableNodeIron"
    assert display.GetWindow() == pytest.approx(float(weight_array.max() - weight_array.min()), rel=1e-6)
    agreement = array_of(result.agreement)
    assert agreement.min() >= 1.0 / 3 - 1e-6 and agreement.max() == pytest.approx(1.0)

    scene = weighted_run["scene"]
    composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    weighted_run["logic"].showMap(result.oracle)
    assert composite.GetBackgroundVolumeID() == weighted_run["target"].GetID()
    assert composite.GetForegroundVolumeID() == result.oracle.GetID()
    assert composite.GetForegroundOpacity() == pytest.approx(0.7)
    weighted_run["logic"].showMap(result.voteMaps["tissue"], opacity=0.3)
    assert composite.GetForegroundVolumeID() == result.voteMaps["tissue"].GetID()
    assert composite.GetForegroundOpacity() == pytest.approx(0.3)


def test_metrics_table_matches_engine_metrics(weighted_run):
    result = weighted_run["result"]
    table = result.metricsTable.GetTable()
    header = [table.GetColumn(c).GetName() for c in range(table.GetNumberOfColumns())]
    assert header == ["Label", "Dice", "Jaccard", "HD95 (mm)", "ASSD (mm)", "Sensitivity", "Precision"]
    assert table.GetNumberOfRows() == 5
    engine = weighted_run["engine_metrics"]
    for row, value in enumerate(("1", "2", "3", "4")):
        assert table.GetValue(row, 0).ToString() == PHANTOM_LABELS[int(value)]
        assert table.GetValue(row, 1).ToDouble() == pytest.approx(engine["labels"][value]["dice"], abs=1e-12)
        assert table.GetValue(row, 3).ToDouble() == pytest.approx(engine["labels"][value]["hd95"], abs=1e-12)
    assert table.GetValue(4, 0).ToString() == "mean"
    assert table.GetValue(4, 1).ToDouble() == pytest.approx(engine["mean"]["dice"], abs=1e-12)


def test_results_sit_in_one_subject_hierarchy_folder(weighted_run):
    result, scene = weighted_run["result"], weighted_run["scene"]
    sh = scene.GetSubjectHierarchyNode()
    folder = result.folderItemID
    assert sh.GetItemName(folder) == "Local weighted voting - phantom target"
    assert sh.GetItemParent(folder) == sh.GetSceneItemID()
    for node in [result.segmentation, result.metricsTable, result.agreement, result.oracle, *result.maps()]:
        item, ancestors = sh.GetItemByDataNode(node), []
        while item and item != sh.GetSceneItemID():
            item = sh.GetItemParent(item)
            ancestors.append(item)
        assert folder in ancestors, node.GetName()
    vote_item = sh.GetItemByDataNode(result.voteMaps["tissue"])
    assert sh.GetItemName(sh.GetItemParent(vote_item)) == "Vote maps"


def test_inputs_are_not_modified_and_nothing_is_left_behind(weighted_run):
    assert snapshot(weighted_run["target"]) == weighted_run["before"]["target"]
    assert snapshot(weighted_run["reference"]) == weighted_run["before"]["reference"]
    scene = weighted_run["scene"]
    names = [scene.GetNthNode(k).GetName() or "" for k in range(scene.GetNumberOfNodes())]
    assert not [n for n in names if n.startswith("__AtlasSeg")], names


# ---------------------------------------------------------------------------------------------- scene atlases

def scene_atlas_pairs(scene, atlas_dir: Path, shuffle_names: bool):
    pairs = []
    for k, entry in enumerate(json.loads((atlas_dir / "dataset.json").read_text())["training"]):
        image = sitk.ReadImage(str(atlas_dir / entry["image"]))
        labels = sitk.ReadImage(str(atlas_dir / entry["label"]))
        volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"atlas {k}")
        updateVolumeNodeFromImage(volume, image)
        names = dict(PHANTOM_LABELS)
        if shuffle_names and k == 1:  # same names, other values: the logic must map segments by name
            remap = {0: 0, 1: 3, 2: 4, 3: 1, 4: 2}
            labels = sitk.ChangeLabel(labels, changeMap={float(a): float(b) for a, b in remap.items()})
            names = {remap[v]: n for v, n in PHANTOM_LABELS.items()}
        pairs.append((volume, segmentation_from_labels(scene, labels, names, f"atlas {k} segmentation")))
    return pairs


def test_scene_atlas_pairs_become_a_decathlon_folder(phantom_atlases, phantom_target, tmp_path):
    scene = new_scene()
    target = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "target")
    updateVolumeNodeFromImage(target, phantom_target[0])
    pairs = scene_atlas_pairs(scene, phantom_atlases, shuffle_names=True)
    logic = FusionLogic(scene, python=sys.executable)
    prepared = logic.prepareRun(FusionInputs(target, atlasPairs=pairs), FusionSettings(method="jlf", jlfBeta=3.0),
                                tmp_path)
    dataset = json.loads((tmp_path / "atlases" / "dataset.json").read_text())
    assert sorted(dataset["labels"].values()) == sorted(PHANTOM_LABELS.values())
    assert [e["image"] for e in dataset["training"]] == [f"./imagesTr/atlas_{k}.nii.gz" for k in range(3)]
    by_name = {n: int(v) for v, n in dataset["labels"].items()}
    for k, entry in enumerate(json.loads((phantom_atlases / "dataset.json").read_text())["training"]):
        original = sitk.GetArrayFromImage(sitk.ReadImage(str(phantom_atlases / entry["label"])))
        written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "atlases" / dataset["training"][k]["label"])))
        for value, name in PHANTOM_LABELS.items():
            assert np.array_equal(written == by_name[name], original == value), (k, name)
        image_written = sitk.ReadImage(str(tmp_path / "atlases" / dataset["training"][k]["image"]))
        assert np.abs(np.subtract(image_written.GetDirection(), PHANTOM_GRID["direction"])).max() < 1e-6
    command = prepared.command
    assert command[command.index("--jlf-beta") + 1] == "3.0" and command[command.index("--method") + 1] == "jlf"
    assert not scene.GetFirstNodeByName("AtlasSeg scene atlas labels")  # temporary colour table removed


def test_scene_atlas_pairs_run_end_to_end(phantom_atlases, phantom_target):
    scene = new_scene()
    target = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "target")
    updateVolumeNodeFromImage(target, phantom_target[0])
    pairs = scene_atlas_pairs(scene, phantom_atlases, shuffle_names=True)
    before = [snapshot(n) for pair in pairs for n in pair]
    result = FusionLogic(scene, python=sys.executable).runBlocking(
        FusionInputs(target, atlasPairs=pairs), FusionSettings(method="majority", nAtlases=3, **FAST))
    assert [snapshot(n) for pair in pairs for n in pair] == before
    assert result.run["atlases"] == ["atlas_0", "atlas_1", "atlas_2"] and not result.weightMaps
    predicted = label_array_of_segmentation(scene, result.segmentation, target, PHANTOM_LABELS)
    reference = sitk.GetArrayFromImage(phantom_target[1])
    scores = {n: dice(predicted == v, reference == v) for v, n in PHANTOM_LABELS.items() if v}
    assert scores["tissue"] > 0.85 and scores["deep nucleus"] > 0.7, scores
    assert result.segmentation.GetSegmentation().GetSegment(
        result.segmentation.GetSegmentation().GetSegmentIdBySegmentName("ventricles")).GetColor() == pytest.approx(
        np.array(PALETTE[2 % len(PALETTE)]) * 0.9, abs=0.5 / 255)  # colour of the first atlas's segment
    assert result.metricsTable is None and result.oracle is None


# ---------------------------------------------------------------------------------------------- cancel, errors

def test_cancel_stops_the_process_quickly(phantom_atlases, phantom_target, tmp_path):
    scene = new_scene()
    target = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "target")
    updateVolumeNodeFromImage(target, phantom_target[0])
    nodes_before = scene.GetNumberOfNodes()
    run = FusionLogic(scene, python=sys.executable).startRun(
        FusionInputs(target, atlasFolder=str(phantom_atlases)),
        FusionSettings(method="jlf", nAtlases=3, preset="accurate", device="cpu"))
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
    assert not work.exists()
    assert scene.GetNumberOfNodes() == nodes_before


def test_engine_error_becomes_a_readable_message(phantom_atlases, phantom_target, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    dataset = json.loads((phantom_atlases / "dataset.json").read_text())
    dataset["training"][0]["label"] = "./labelsTr/missing.nii.gz"
    (broken / "dataset.json").write_text(json.dumps(dataset))
    scene = new_scene()
    target = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "target")
    updateVolumeNodeFromImage(target, phantom_target[0])
    logic = FusionLogic(scene, python=sys.executable)
    with pytest.raises(EngineError) as error:
        logic.runBlocking(FusionInputs(target, atlasFolder=str(broken)), FusionSettings(method="majority", **FAST))
    message = str(error.value)
    assert message.endswith("missing.nii.gz: label listed in dataset.json not found"), message
    assert "Traceback" not in message and "\n" not in message


def test_input_problems_are_explained(phantom_atlases, tmp_path):
    scene = new_scene()
    target = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "target")
    logic = FusionLogic(scene, python=sys.executable)
    assert logic.inputProblems(FusionInputs(None), FusionSettings()) == [
        "Select a target volume.", "Choose an atlas folder or add atlas image + segmentation pairs."]
    assert logic.inputProblems(FusionInputs(target, atlasFolder=str(tmp_path)), FusionSettings()) == [
        f"No dataset.json in the atlas folder {tmp_path}."]
    assert logic.inputProblems(FusionInputs(target, atlasFolder=str(phantom_atlases)),
                               FusionSettings(method="dlf")) == ["Deep Label Fusion needs a model folder."]
    assert logic.inputProblems(FusionInputs(target, atlasFolder=str(phantom_atlases)), FusionSettings()) == []


def test_deep_label_fusion_passes_the_model_folder(phantom_atlases, phantom_target, tmp_path):
    scene = new_scene()
    target = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "target")
    updateVolumeNodeFromImage(target, phantom_target[0])
    model = tmp_path / "model"
    model.mkdir()
    prepared = FusionLogic(scene, python=sys.executable).prepareRun(
        FusionInputs(target, atlasFolder=str(phantom_atlases)),
        FusionSettings(method="dlf", modelFolder=str(model), device="gpu"), tmp_path / "work")
    command = prepared.command
    assert command[command.index("--method") + 1] == "dlf"
    assert command[command.index("--model") + 1] == str(model)
    assert command[command.index("--device") + 1] == "cuda"
    assert "--jlf-alpha" not in command
    written = sitk.ReadImage(command[command.index("--target") + 1])
    assert np.abs(np.subtract(written.GetOrigin(), phantom_target[0].GetOrigin())).max() < 1e-4
    assert np.array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(phantom_target[0]))



@pytest.fixture(scope="module")
def tiny_dlf_model(phantom_atlases, tmp_path_factory) -> Path:
    """A Deep Label Fusion model trained for one epoch with tiny networks (about 10 s on 2 cores)."""
    import subprocess

    model = tmp_path_factory.mktemp("dlf_model") / "model"
    subprocess.run([sys.executable, "-m", "atlasseg", "dlf-train", "--atlases", str(phantom_atlases), "--output",
                    str(model), "--epochs", "1", "--n-atlases", "2", "--device", "cpu", "--preset", "fast",
                    "--patch-size", "16", "16", "16", "--vote-channels", "4", "8", "16", "--finetune-channels", "4",
                    "8", "16", "--val-fraction", "0.34", "--quiet"], check=True, capture_output=True, timeout=300)
    return model


def test_deep_label_fusion_run_end_to_end(phantom_atlases, phantom_target, tiny_dlf_model):
    """--method dlf --model FOLDER through the logic: final and initial segmentations, Dice as the engine reports."""
    image, labels = phantom_target
    scene, target, reference = phantom_scene(image, labels)
    events = []
    result = FusionLogic(scene, python=sys.executable).runBlocking(
        FusionInputs(target, atlasFolder=str(phantom_atlases), referenceSegmentation=reference),
        FusionSettings(method="dlf", modelFolder=str(tiny_dlf_model), nAtlases=2, **FAST),
        onProgress=lambda fraction, message: events.append((fraction, message)))
    assert result.segmentation.GetName() == "Deep Label Fusion - phantom target segmentation"
    assert result.initialSegmentation.GetName() == "Deep Label Fusion - phantom target initial segmentation"
    assert not result.initialSegmentation.GetDisplayNode().GetVisibility()
    assert set(segment_names(result.initialSegmentation)) <= set(PHANTOM_LABELS.values())
    assert events and events[-1][0] == 1.0
    predicted = label_array_of_segmentation(scene, result.segmentation, target, PHANTOM_LABELS)
    truth = sitk.GetArrayFromImage(labels)
    for value, entry in result.metrics["labels"].items():
        assert dice(predicted == int(value), truth == int(value)) == pytest.approx(entry["dice"], abs=1e-12)
    assert result.metrics["labels"]["1"]["dice"] > 0.5  # one epoch of a tiny network: only a sanity floor
