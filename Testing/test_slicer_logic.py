"""The DeepLabelFusion module's Qt-free logic on a real MRML scene (slicer-core), with the real engine process.

No mocks: volumes go through Slicer's own NRRD reader, segmentations through Slicer's segmentation logic, and
the engine runs as a subprocess (this interpreter, ``-m atlasseg``) on small phantoms with ``--preset fast``.
"""

from __future__ import annotations

import json
import os
import signal
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
from vtk.util import numpy_support  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "DeepLabelFusion"))

from DeepLabelFusionLib import (  # noqa: E402
    EngineCancelled,
    EngineError,
    EngineProcess,
    FusionInputs,
    FusionLogic,
    FusionSettings,
    GeometryError,
    ProgressEvent,
    ijkToRasFromImage,
    methodDescription,
    parseProgressLine,
    readableEngineError,
    readAtlasFolderModalities,
    readAtlasSetName,
    updateVolumeNodeFromImage,
    volumeNodeToImage,
)

from atlasseg.phantom import PHANTOM_LABELS, make_phantom, make_phantom_atlas_set  # noqa: E402
from AtlasSegLib.geometry import vtkMatrixToNumpy  # noqa: E402
from AtlasSegLib.results import (  # noqa: E402
    DICOM_MASTER,
    GENERAL_ANATOMY,
    MAP_KIND_ATTRIBUTE,
    MAP_STYLES,
    PALETTE,
    TERMINOLOGY_TAG,
    structureCode,
)
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


TORCH_HINTS = ["CUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace below "
               "might be incorrect.", "For debugging consider passing CUDA_LAUNCH_BLOCKING=1",
               "Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.", ""]


def test_cuda_errors_get_advice_when_torch_adds_hint_lines():
    """torch prints hint lines after a CUDA error and warns about an unsupported GPU long before: the advice
    comes from the exception, not from whatever line happens to be last."""
    traceback = ["Traceback (most recent call last):",
                 '  File "/x/atlasseg/registration/torch_reg.py", line 88, in run', "    moved = warp(image, field)"]
    kernel = readableEngineError(1, [*traceback, "RuntimeError: CUDA error: no kernel image is available for "
                                     "execution on the device", *TORCH_HINTS])
    assert "does not support this GPU" in kernel and "Device: CPU" in kernel and "PyTorch Utils" in kernel
    warned = readableEngineError(1, [
        "/x/torch/cuda/__init__.py:235: UserWarning: NVIDIA B200 with CUDA capability sm_100 is not compatible "
        "with the current PyTorch installation.", *traceback,
        "torch.AcceleratorError: CUDA error: the provided PTX was compiled with an unsupported toolchain.",
        *TORCH_HINTS])
    assert "does not support this GPU" in warned
    oom = readableEngineError(1, [*traceback, "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.41 GiB. "
                                  "GPU 0 has a total capacity of 7.6 GiB of which 312.0 MiB is free.", *TORCH_HINTS])
    assert oom.startswith("the GPU ran out of memory (torch.OutOfMemoryError: CUDA out of memory.")
    assert "Device: CPU" in oom and "TORCH_USE_CUDA_DSA" not in oom
    launch = readableEngineError(1, [*traceback, "RuntimeError: CUDA error: an illegal memory access was "
                                     "encountered", *TORCH_HINTS])
    assert launch.startswith("the GPU failed (RuntimeError: CUDA error: an illegal memory access") and \
        "Device: CPU" in launch
    other = readableEngineError(1, [*traceback, "ValueError: something else", "  (context line)"])
    assert other == "the engine stopped unexpectedly: ValueError: something else (full log in the Python console)"
    missing = readableEngineError(1, [*traceback, "ModuleNotFoundError: No module named 'monai'"])
    assert "dependency of the engine is missing" in missing


# ---------------------------------------------------------------------------------------------- process: cancel, log

@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_gui_cancel_returns_at_once_and_kills_after_the_grace_period():
    """requestCancel: terminate now, return at once; a process that is still shutting down (here: one that
    ignores SIGTERM) is killed by the watchdog after the grace period, then onStopped runs once."""
    script = ("import signal, sys, time\n"
              "signal.signal(signal.SIGTERM, lambda *a: print('shutting down', flush=True))\n"
              "print('ready', flush=True)\n"
              "time.sleep(120)\n")
    process = EngineProcess([sys.executable, "-c", script])
    deadline = time.time() + 30
    while "ready" not in process.stdoutLines and time.time() < deadline:
        time.sleep(0.02)
    stopped = []
    grace = 1.5
    t0 = time.perf_counter()
    process.requestCancel(grace, onStopped=lambda: stopped.append(time.perf_counter() - t0))
    assert time.perf_counter() - t0 < 0.2
    assert process.returnCode() is None and process.isCancelling() and process.cancelled
    time.sleep(0.5)
    assert process.returnCode() is None, "still shutting down: SIGTERM is ignored"
    assert "shutting down" in process.stdoutLines
    while process.returnCode() is None and time.perf_counter() - t0 < grace + 10:
        time.sleep(0.05)
    assert process.returnCode() == -signal.SIGKILL
    assert grace - 0.1 <= time.perf_counter() - t0 < grace + 10
    deadline = time.time() + 5
    while not stopped and time.time() < deadline:
        time.sleep(0.02)
    assert len(stopped) == 1 and stopped[0] >= grace - 0.1
    process.requestCancel(grace, onStopped=lambda: stopped.append(-1.0))   # again: callback at once, no new kill
    deadline = time.time() + 5
    while len(stopped) < 2 and time.time() < deadline:
        time.sleep(0.02)
    assert stopped[1] == -1.0 and not process.isCancelling()


def test_new_log_lines_arrive_incrementally_in_order():
    """newLogLines: stdout and stderr lines (progress as '[ 50%] message') since the last call, as they arrive."""
    script = ("import sys, time\n"
              "for k in range(3):\n"
              "    print(f'out {k}', flush=True)\n"
              "    print(f'err {k}', file=sys.stderr, flush=True)\n"
              "    time.sleep(0.4)\n"
              "print('PROGRESS 0.5000 fusion', flush=True)\n")
    process = EngineProcess([sys.executable, "-c", script])
    batches = []
    deadline = time.time() + 30
    while process.returnCode() is None and time.time() < deadline:
        batches.append(process.newLogLines())
        time.sleep(0.1)
    batches.append(process.newLogLines())
    assert process.newLogLines() == []   # nothing twice
    lines = [line for batch in batches for line in batch]
    assert sorted(lines) == sorted(["out 0", "err 0", "out 1", "err 1", "out 2", "err 2", "[ 50%] fusion"])
    assert [line for line in lines if line.startswith("out")] == ["out 0", "out 1", "out 2"]
    assert [line for line in lines if line.startswith("err")] == ["err 0", "err 1", "err 2"]
    first = next(k for k, batch in enumerate(batches) if batch)
    assert "out 2" not in batches[first], "lines came all at once, not as they arrived"
    assert list(process.stderrLines) == ["err 0", "err 1", "err 2"]   # the error message still sees stderr
    assert process.progressEvents() == [ProgressEvent(0.5, "fusion")]


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
    events, logBatches = [], []
    work = tmp_path_factory.mktemp("weighted_work")
    t0 = time.perf_counter()
    run = logic.startRun(FusionInputs(target, atlasFolder=str(phantom_atlases), referenceSegmentation=reference),
                         FusionSettings(method="weighted", nAtlases=3, **FAST), workDir=work)
    command = list(run.prepared.command)
    while run.isRunning():
        time.sleep(0.05)
        events += run.poll()
        logBatches.append(run.newLogLines())
    events += run.poll()
    logBatches.append(run.newLogLines())
    result = run.finish()
    return {"scene": scene, "logic": logic, "target": target, "reference": reference, "labels": labels,
            "result": result, "events": events, "log": logBatches, "before": before, "command": command, "work": work,
            "seconds": time.perf_counter() - t0,
            "engine_metrics": json.loads((work / "output" / "metrics.json").read_text())}


def test_run_reports_progress_while_running(weighted_run):
    fractions = [e.fraction for e in weighted_run["events"]]
    messages = " ".join(e.message for e in weighted_run["events"])
    assert len(fractions) >= 5
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert "registration" in messages and "weighted" in messages
    assert weighted_run["seconds"] < 60


def test_run_log_lines_arrive_while_running(weighted_run):
    batches = [batch for batch in weighted_run["log"] if batch]
    lines = [line for batch in batches for line in batch]
    assert len(batches) >= 3, "the log should arrive in pieces while the engine runs"
    progress = [line for line in lines if line.startswith("[")]
    assert len(progress) == len(weighted_run["events"])
    assert any("registration" in line for line in progress) and progress[-1].startswith("[100%]")


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
    assert not result.weightMaps   # on request only
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
    weights = next(iter(weights_run(weighted_run).weightMaps.values()))
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


def weighted_run_reloaded(weighted_run, outputSegmentation=None, scene=None, target=None, **settings):
    """The weighted run's engine outputs loaded again through the logic, into a fresh scene (or the one given)
    with its own target node: the logic's output options without another engine run."""
    if scene is None:
        scene, target, _ = phantom_scene(*make_phantom(4242, **PHANTOM_GRID))
    logic = FusionLogic(scene, python=sys.executable)
    result = logic.loadResults(weighted_run["work"] / "output",
                               FusionInputs(target, atlasFolder=weighted_run["command"][
                                   weighted_run["command"].index("--atlases") + 1],
                                   outputSegmentation=outputSegmentation),
                               FusionSettings(method="weighted", nAtlases=3, **FAST, **settings))
    return result, scene, target


def map_nodes_of_kind(scene, kind: str) -> list:
    nodes = [scene.GetNthNodeByClass(k, "vtkMRMLScalarVolumeNode")
             for k in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"))]
    return [node for node in nodes if node.GetAttribute(MAP_KIND_ATTRIBUTE) == kind]


_WEIGHTS_RUNS: dict = {}


def weights_run(weighted_run):
    """The weighted run again with "Weight maps per atlas" on (one more engine run, made once)."""
    if "result" not in _WEIGHTS_RUNS:
        scene, target, _ = phantom_scene(*make_phantom(4242, **PHANTOM_GRID))
        atlases = weighted_run["command"][weighted_run["command"].index("--atlases") + 1]
        logic = FusionLogic(scene, python=sys.executable)
        _WEIGHTS_RUNS.update(result=logic.runBlocking(
            FusionInputs(target, atlasFolder=atlases), FusionSettings(method="weighted", nAtlases=3,
                                                                       weightMaps=True, **FAST)), scene=scene)
    return _WEIGHTS_RUNS["result"]


def test_weight_maps_are_written_and_loaded_only_on_request(weighted_run):
    """Per-atlas weight maps are many and large: a default run neither writes nor loads them (vote, agreement and
    oracle maps only); with "Weight maps per atlas" the engine writes them and the logic loads them."""
    scene, result = weighted_run["scene"], weighted_run["result"]
    command = weighted_run["command"]
    assert command[command.index("--maps") + 1:command.index("--maps") + 5] == ["votes", "agreement", "oracle",
                                                                              "probabilities"]
    assert not any(key.startswith("weights_") for key in result.run["files"])   # not even written
    assert not result.weightMaps and not map_nodes_of_kind(scene, "weights")
    assert len(map_nodes_of_kind(scene, "votes")) == 5 and len(result.maps()) == 7   # votes, agreement, oracle
    sh = scene.GetSubjectHierarchyNode()
    children = vtk.vtkIdList()
    sh.GetItemChildren(result.folderItemID, children)
    assert "Weight maps" not in [sh.GetItemName(children.GetId(k)) for k in range(children.GetNumberOfIds())]

    asked = weights_run(weighted_run)
    scene = _WEIGHTS_RUNS["scene"]
    assert sum(key.startswith("weights_") for key in asked.run["files"]) == 3
    assert sorted(asked.weightMaps) == sorted(asked.run["atlases"])
    assert len(map_nodes_of_kind(scene, "weights")) == 3
    weights_item = sh_parent_name(scene, asked.weightMaps["phantom_000"])
    assert weights_item == "Weight maps"
    assert asked.weightMaps["phantom_000"].GetName() == "Local weighted voting - phantom target weights phantom_000"


def sh_parent_name(scene, node) -> str:
    sh = scene.GetSubjectHierarchyNode()
    return sh.GetItemName(sh.GetItemParent(sh.GetItemByDataNode(node)))


def test_segments_of_known_structures_get_their_terminology(weighted_run):
    """Phantom labels: ventricles and hippocampus are standard structures, tissue and deep nucleus are not."""
    seg = weighted_run["result"].segmentation.GetSegmentation()
    assert slicer.vtkSegment.GetTerminologyEntryTagName() == TERMINOLOGY_TAG   # the tag the library sets
    default = slicer.vtkSegment().GetTerminology()   # what Slicer gives a new segment
    tags = {}
    for k in range(seg.GetNumberOfSegments()):
        segment = seg.GetNthSegment(k)
        tags[segment.GetName()] = segment.GetTerminology()   # the TerminologyEntry tag
        assert not segment.GetNameAutoGenerated() and not segment.GetColorAutoGenerated()
    assert tags["hippocampus"] == (f"{DICOM_MASTER}~SCT^123037004^Anatomical Structure~SCT^5366008^Hippocampus~^^~"
                                   "Anatomic codes - DICOM master list~^^~^^")
    assert tags["ventricles"] == (f"{GENERAL_ANATOMY}~SCT^123037004^Anatomical Structure~SCT^35764002^Brain ventricle"
                                  "~^^~Anatomic codes - DICOM master list~^^~^^")
    assert tags["tissue"] == default and tags["deep nucleus"] == default
    assert "123037004" not in default


# the label names of the real atlas sets (../shared/data/*/dataset.json), with the SNOMED CT code each gets
REAL_SET_LABELS = {
    "Hippocampus": {"Anterior": "5366008", "Posterior": "5366008"},
    "FetalBrainSpinaBifida": {"white matter": "389080008", "ventricles (intra-axial CSF)": "35764002",
                              "cerebellum": "113305005", "extra-axial CSF": "65216001",
                              "cortical gray matter": "40146001", "deep gray matter": "389081007",
                              "brainstem": "119238007", "corpus callosum": "88442005"},
}


def test_structure_codes_of_the_real_atlas_sets_and_other_names():
    for set_name, labels in REAL_SET_LABELS.items():
        for label, code in labels.items():
            assert structureCode(label, set_name).code == code, (set_name, label)
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    for folder, set_name in (("hippocampus", "Hippocampus"), ("fetal-sb", "FetalBrainSpinaBifida")):
        if (shared / folder / "dataset.json").is_file():   # the table above is what the sets say
            dataset = json.loads((shared / folder / "dataset.json").read_text())
            assert dataset["name"] == set_name and readAtlasSetName(shared / folder) == set_name
            assert {n for v, n in dataset["labels"].items() if v != "0"} == set(REAL_SET_LABELS[set_name])
    for name in ("Hippocampus", "hippocampal head", "hippocampus_posterior", "Anterior hippocampus"):
        assert structureCode(name).meaning == "Hippocampus" and not structureCode(name).modifier, name
    left = structureCode("Left hippocampal head")
    assert left.code == "5366008" and "~SCT^5366008^Hippocampus~SCT^7771000^Left~" in left.entry()
    assert structureCode("Right thalamus").modifier == "SCT^24028007^Right"
    assert structureCode("Anterior", "Left Hippocampus").modifier == "SCT^7771000^Left"
    assert structureCode("Thalamus").code == "42695009" and structureCode("Brain stem").code == "119238007"
    assert structureCode("Grey matter").code == "389081007" and structureCode("CSF").code == "65216001"
    assert structureCode("Lateral ventricles").code == "66720007"
    for name in ("Anterior", "tissue", "deep nucleus", "left ventricle", "right ventricle", "left ventricles",
                 "left cerebellum", "left right hippocampus", "myocardium", "tumour", "label 3"):
        assert structureCode(name) is None, name
    assert structureCode("Anterior", "FetalBrainSpinaBifida") is None   # a part of nothing known


def segment_geometry(segmentation_node) -> list:
    """Per segment: name, terminology, colour and the binary labelmap's grid and voxels."""
    seg = segmentation_node.GetSegmentation()
    out = []
    for k in range(seg.GetNumberOfSegments()):
        segment = seg.GetNthSegment(k)
        labelmap = segment.GetRepresentation("Binary labelmap")
        matrix = vtk.vtkMatrix4x4()
        labelmap.GetImageToWorldMatrix(matrix)
        out.append((segment.GetName(), segment.GetTerminology(), tuple(np.round(segment.GetColor(), 6)),
                    vtkMatrixToNumpy(matrix).tobytes(), tuple(labelmap.GetExtent()),
                    numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars()).tobytes()))
    return out


def test_output_segmentation_is_overwritten_exactly_like_a_new_one(weighted_run):
    """An existing segmentation chosen as output: segments replaced by the result's, transform and reference
    geometry as a new node's, same display; its name and place are kept."""
    scene, target, _ = phantom_scene(*make_phantom(4242, **PHANTOM_GRID))
    fresh, _, _ = weighted_run_reloaded(weighted_run, scene=scene, target=target)

    other = oblique_image(np.uint8) > 500   # other labels on another grid
    existing = segmentation_from_labels(scene, sitk.Cast(other, sitk.sitkUInt8), {0: "background", 1: "old"},
                                        "my segmentation")
    elsewhere = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "other grid")
    updateVolumeNodeFromImage(elsewhere, oblique_image())
    existing.SetReferenceImageGeometryParameterFromVolumeNode(elsewhere)
    moved = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 12.5)
    moved.SetMatrixTransformToParent(shift)
    existing.SetAndObserveTransformNodeID(moved.GetID())
    existing.GetDisplayNode().SetOpacity2DFill(0.9)
    sh = scene.GetSubjectHierarchyNode()
    folder = sh.CreateFolderItem(sh.GetSceneItemID(), "my folder")
    sh.CreateItem(folder, existing)   # (slicer-core has no plugin that makes the item when a node is added)

    result, _, _ = weighted_run_reloaded(weighted_run, outputSegmentation=existing, scene=scene, target=target)
    assert result.segmentation is existing and existing.GetName() == "my segmentation"
    assert sh.GetItemParent(sh.GetItemByDataNode(existing)) == folder
    assert existing.GetParentTransformNode() is None and fresh.segmentation.GetParentTransformNode() is None
    assert segment_names(existing) == segment_names(fresh.segmentation)
    assert segment_geometry(existing) == segment_geometry(fresh.segmentation)
    reference_geometry = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    assert existing.GetSegmentation().GetConversionParameter(reference_geometry) == \
        fresh.segmentation.GetSegmentation().GetConversionParameter(reference_geometry) != ""
    role = existing.GetReferenceImageGeometryReferenceRole()
    assert existing.GetNodeReference(role) is target and fresh.segmentation.GetNodeReference(role) is target
    assert existing.GetSegmentation().GetSourceRepresentationName() == "Binary labelmap"
    assert existing.GetDisplayNode().GetOpacity2DFill() == pytest.approx(0.35)
    names = dict(PHANTOM_LABELS)
    assert np.array_equal(label_array_of_segmentation(scene, existing, target, names),
                          label_array_of_segmentation(scene, fresh.segmentation, target, names))


def test_show_in_3d_makes_the_closed_surface(weighted_run):
    result, _, _ = weighted_run_reloaded(weighted_run, show3D=True)
    seg = result.segmentation.GetSegmentation()
    assert seg.ContainsRepresentation("Closed surface")
    for k in range(seg.GetNumberOfSegments()):
        assert seg.GetNthSegment(k).GetRepresentation("Closed surface").GetNumberOfPoints() > 0
    display = result.segmentation.GetDisplayNode()
    assert display.GetVisibility3D() and display.GetPreferredDisplayRepresentationName3D() == "Closed surface"
    assert FusionLogic.showIn3D(result.segmentation, False) and not seg.ContainsRepresentation("Closed surface")
    assert not weighted_run["result"].segmentation.GetSegmentation().ContainsRepresentation("Closed surface")


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
    assert_under_folder(scene, folder, [result.segmentation, result.metricsTable, result.agreement, result.oracle,
                                        *result.maps()])
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
    prepared = logic.prepareRun(FusionInputs(target, atlasPairs=pairs),
                                FusionSettings(method="jlf", nAtlases=3, jlfBeta=3.0), tmp_path)
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


def started_jlf_run(phantom_atlases, phantom_target):
    """A slow real run (JLF, accurate registration) that has reported its first progress."""
    scene = new_scene()
    target = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "target")
    updateVolumeNodeFromImage(target, phantom_target[0])
    logic = FusionLogic(scene, python=sys.executable)
    run = logic.startRun(FusionInputs(target, atlasFolder=str(phantom_atlases)),
                         FusionSettings(method="jlf", nAtlases=3, preset="accurate", device="cpu"))
    deadline = time.time() + 60
    while not run.poll() and run.isRunning() and time.time() < deadline:
        time.sleep(0.05)
    assert run.isRunning(), "the engine ended before it could be cancelled"
    return scene, logic, run


def wait_until(condition, seconds: float) -> bool:
    deadline = time.time() + seconds
    while not condition() and time.time() < deadline:
        time.sleep(0.05)
    return condition()


def test_gui_cancel_of_a_real_run_does_not_wait(phantom_atlases, phantom_target):
    scene, logic, run = started_jlf_run(phantom_atlases, phantom_target)
    work = run.prepared.workDir
    t0 = time.perf_counter()
    run.requestCancel()
    assert time.perf_counter() - t0 < 0.5
    assert wait_until(lambda: not run.isRunning(), 10.0)
    assert run.process.returnCode() != 0 and not run.isCancelling()
    assert wait_until(lambda: not work.exists(), 5.0)
    with pytest.raises(EngineCancelled):
        run.finish()
    assert logic.activeProcesses() == []


def test_closing_the_scene_cancels_the_run(phantom_atlases, phantom_target):
    """The widget calls logic.onSceneStartClose from its StartCloseEvent observer: wired the same way here."""
    scene, logic, run = started_jlf_run(phantom_atlases, phantom_target)
    work = run.prepared.workDir
    assert logic.activeProcesses() == [run.process]
    scene.AddObserver(slicer.vtkMRMLScene.StartCloseEvent, logic.onSceneStartClose)
    t0 = time.perf_counter()
    scene.Clear(0)
    assert time.perf_counter() - t0 < 1.0
    assert run.process.cancelled
    assert wait_until(lambda: not run.isRunning(), 10.0), "the engine is still running after the grace period"
    assert wait_until(lambda: not work.exists(), 5.0)
    with pytest.raises(EngineCancelled):
        run.finish()
    assert logic.activeProcesses() == [] and logic.cancelActiveRuns() == 0


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
        logic.runBlocking(FusionInputs(target, atlasFolder=str(broken)),
                          FusionSettings(method="majority", nAtlases=3, **FAST))
    message = str(error.value)
    assert message.endswith("missing.nii.gz: label listed in dataset.json not found"), message
    assert "Traceback" not in message and "\n" not in message


def test_input_problems_are_explained(phantom_atlases, tmp_path):
    scene = new_scene()
    target = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "target")
    logic = FusionLogic(scene, python=sys.executable)
    reference = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "reference")
    assert logic.inputProblems(FusionInputs(target, atlasFolder=str(phantom_atlases), referenceSegmentation=reference,
                                            outputSegmentation=reference), FusionSettings(nAtlases=3)) == [
        "The output segmentation cannot be the reference; choose another or create a new one."]
    assert logic.inputProblems(FusionInputs(None), FusionSettings()) == [
        "Select a target volume.", "Choose an atlas folder or add atlas image + segmentation pairs."]
    assert logic.inputProblems(FusionInputs(target, atlasFolder=str(tmp_path)), FusionSettings()) == [
        f"No dataset.json in the atlas folder {tmp_path}."]
    assert logic.inputProblems(FusionInputs(target, atlasFolder=str(phantom_atlases)),
                               FusionSettings(method="dlf", nAtlases=3)) == ["Deep Label Fusion needs a model folder."]
    assert logic.inputProblems(FusionInputs(target, atlasFolder=str(phantom_atlases)), FusionSettings()) == [
        "The atlas set has 3 atlas(es): set the number of atlases to at most 3."]   # the default 10 is refused
    assert logic.inputProblems(FusionInputs(target, atlasFolder=str(phantom_atlases)),
                               FusionSettings(nAtlases=3)) == []


def broken_volume(kind: str, grid: sitk.Image) -> tuple[sitk.Image, str]:
    """A volume the engine refuses, and the words of its refusal (shared with the other modules' tests)."""
    arr = sitk.GetArrayFromImage(sitk.Cast(grid, sitk.sitkFloat32))
    if kind == "nan":
        arr[3, 4, 5], arr[6, 6, 6] = np.nan, np.inf
        expected = "contains 2 NaN/Inf voxel values"
    elif kind == "blank":
        arr[:] = 7.0
        expected = "blank image (every voxel is 7)"
    else:
        arr = arr[:3, :4, :5]
        expected = "image of 5x4x3 voxels is too small (at least 8 voxels along every axis)"
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing(grid.GetSpacing())
    image.SetOrigin(grid.GetOrigin())
    image.SetDirection(grid.GetDirection())
    return image, expected


@pytest.mark.parametrize("kind", ["nan", "blank", "tiny"])
def test_broken_target_volume_is_refused_naming_the_node(kind, phantom_atlases, phantom_target, tmp_path):
    """The engine's own image rules, applied to the node before anything runs: the message names the node (not a
    temporary file), no engine starts, the work folder is removed and the node is unchanged."""
    scene = new_scene()
    target = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my target")
    image, expected = broken_volume(kind, phantom_target[0])
    updateVolumeNodeFromImage(target, image)
    before = snapshot(target)
    started = []
    logic = FusionLogic(scene, python=sys.executable, processFactory=lambda *a: started.append(a))
    with pytest.raises(EngineError) as error:
        logic.startRun(FusionInputs(target, atlasFolder=str(phantom_atlases)),
                       FusionSettings(method="majority", nAtlases=3, **FAST), workDir=tmp_path / "work")
    assert str(error.value) == f"Volume 'my target': {expected}."
    assert started == [] and snapshot(target) == before
    assert not list((tmp_path / "work").glob("target_*"))


def test_panel_texts_method_notes_and_modalities(phantom_atlases, tmp_path):
    """What the panel shows under the method and beside the target comes from the registry and the atlas set."""
    dlf = methodDescription("dlf")
    assert "trained model folder" in dlf and "atlasseg train --method dlf" in dlf and "README" in dlf
    from atlasseg.methods import METHODS as REGISTRY

    jlf = REGISTRY["jlf"].description
    assert methodDescription("jlf") == f"{jlf[0].upper()}{jlf[1:]}. No training needed."
    assert "No training needed" in methodDescription("majority") and methodDescription("nonsense") == ""
    phantom = json.loads((phantom_atlases / "dataset.json").read_text())
    assert readAtlasFolderModalities(phantom_atlases) == [phantom["modality"]["0"]]
    assert readAtlasSetName(phantom_atlases) == phantom["name"]
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"1": "FLAIR", "0": "T1"}, "labels": {}}))
    assert readAtlasFolderModalities(tmp_path) == ["T1", "FLAIR"] and readAtlasSetName(tmp_path) == ""
    assert readAtlasFolderModalities(tmp_path / "missing") == []


def test_deep_label_fusion_passes_the_model_folder(phantom_atlases, phantom_target, tmp_path):
    scene = new_scene()
    target = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "target")
    updateVolumeNodeFromImage(target, phantom_target[0])
    model = tmp_path / "model"
    model.mkdir()
    prepared = FusionLogic(scene, python=sys.executable).prepareRun(
        FusionInputs(target, atlasFolder=str(phantom_atlases)),
        FusionSettings(method="dlf", nAtlases=3, modelFolder=str(model), device="gpu"), tmp_path / "work")
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
    assert not result.weightMaps and not map_nodes_of_kind(scene, "weights")   # on request only
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


def test_deep_label_fusion_weight_maps_3d_and_overwrite_through_a_run(phantom_atlases, phantom_target,
                                                                      tiny_dlf_model):
    """The panel's output options on a real DLF run: weight maps per atlas and label, closed surface, and the
    result written into an existing segmentation."""
    image, labels = phantom_target
    scene, target, _ = phantom_scene(image, labels)
    existing = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "overwrite me")
    existing.GetSegmentation().AddEmptySegment("old", "old")
    result = FusionLogic(scene, python=sys.executable).runBlocking(
        FusionInputs(target, atlasFolder=str(phantom_atlases), outputSegmentation=existing),
        FusionSettings(method="dlf", modelFolder=str(tiny_dlf_model), nAtlases=2, weightMaps=True, show3D=True,
                       **FAST))
    written = [key for key in result.run["files"] if key.startswith("weights_")]
    assert len(written) == len(result.run["atlases"]) * len(result.run["labels"]) == 2 * 5
    assert len(result.weightMaps) == len(written) == len(map_nodes_of_kind(scene, "weights"))
    assert result.segmentation is existing and existing.GetName() == "overwrite me"
    assert "old" not in segment_names(existing) and set(segment_names(existing)) <= set(PHANTOM_LABELS.values())
    assert existing.GetSegmentation().ContainsRepresentation("Closed surface")
    assert not result.initialSegmentation.GetSegmentation().ContainsRepresentation("Closed surface")
