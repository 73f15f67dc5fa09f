"""The extension's screenshot (issue #14): the DeepLabelFusion panel next to a real result, from a real scene.

What it does, all headless (slicer-core for the MRML scene and Slicer's slice pipeline, PySide6 offscreen for
the panel, VTK offscreen OpenGL for the slice view):

1. loads one hippocampus MRI of the Decathlon Task04 set (../shared/data/hippocampus) into an MRML scene with
   Slicer's volume reader, and its manual label as a reference segmentation;
2. runs the module's own logic (``DeepLabelFusionLib.FusionLogic.runBlocking``: the engine in a background
   process, results loaded as nodes) with joint label fusion and a few other cases of the set as atlases (the
   target is never one of them: they come from a temporary atlas folder that lists only them);
3. renders a slice view of that scene the way Slicer draws one: ``vtkMRMLSliceLogic`` (slice node, composite
   node, layer logics: the target as background, a vote map as foreground at 50 % with its colour node), the
   segmentation drawn as outlines by ``vtkMRMLSegmentationsDisplayableManager2D``, the vote map's colour legend
   by ``vtkMRMLColorLegendDisplayableManager`` and a ruler by ``vtkMRMLRulerDisplayableManager``;
   the view is rendered once per label (that label's vote map; the last one is the map the panel shows);
4. renders the module panel offscreen (``Testing/test_slicer_static.py``'s ``render_panel``) showing the
   inputs and settings of this run and its results (status line, metrics table);
5. writes panel | slice views, with a caption, to ``Resources/Screenshots/AtlasSeg_screenshot.png``.

``python Testing/render_screenshot.py [--target hippocampus_017] [--n-atlases 8] [--output PNG]``
(about 15 s on two CPU cores, most of it the engine; prints "skipped: ..." and exits 0 where
../shared/data is absent, or slicer-core or PySide6 is not installed). ``Testing/test_screenshot.py`` runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "hippocampus"
OUTPUT = REPO / "Resources" / "Screenshots" / "AtlasSeg_screenshot.png"
MODULE = "DeepLabelFusion"
METHOD = "jlf"
PRESET = "fast"
DEVICE = "cpu"
SLICE_VIEW_SIZE = (800, 480)      # width, height in pixels of the rendered slice view
SLICE_ORIENTATION = "Sagittal"    # the hippocampus's long axis (head = anterior, body = posterior) lies in this plane
MAP_OPACITY = 0.5
LEGEND_MARGIN = 110                # pixels right of the image, for the vote map's colour legend
CAPTION_SCALE = 2

for path in (REPO, REPO / MODULE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


# ---------------------------------------------------------------------------------------------- inputs

def atlas_folder(data: Path, target: str, n_atlases: int, folder: Path) -> tuple[Path, list[str]]:
    """A Decathlon folder listing ``n_atlases`` cases of ``data`` other than ``target`` (the cases that follow it
    in dataset.json, wrapping around), their files linked, not copied."""
    dataset = json.loads((data / "dataset.json").read_text())
    cases = [Path(entry["image"]).name.split(".")[0] for entry in dataset["training"]]
    if target not in cases:
        raise SystemExit(f"{target} is not a case of {data}")
    start = cases.index(target)
    chosen = [cases[(start + k) % len(cases)] for k in range(1, n_atlases + 1)]
    assert target not in chosen
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        for case in chosen:
            (folder / sub / f"{case}.nii.gz").symlink_to(data / sub / f"{case}.nii.gz")
    listed = dict(dataset, numTraining=len(chosen),
                  training=[{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in chosen])
    (folder / "dataset.json").write_text(json.dumps(listed, indent=1))
    return folder, chosen


def load_target_scene(data: Path, target: str):
    """A scene (Slicer's default colours) with the target read by Slicer's volume reader and its manual label as
    reference segmentation (hidden: the fused result is what the view shows)."""
    import SimpleITK as sitk

    from Testing.slicer_scene import new_scene, segmentation_from_labels

    scene = new_scene()
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", target)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(data / "imagesTr" / f"{target}.nii.gz"))
    if not storage.ReadData(volume):
        raise SystemExit(f"Slicer's reader could not read {storage.GetFileName()}")
    volume.SetAndObserveStorageNodeID(storage.GetID())
    volume.CreateDefaultDisplayNodes()
    display = volume.GetDisplayNode()
    display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")
    display.AutoWindowLevelOn()   # Slicer's default: the histogram-based window of the volume's display node
    names = {int(v): n for v, n in json.loads((data / "dataset.json").read_text())["labels"].items()}
    labels = sitk.ReadImage(str(data / "labelsTr" / f"{target}.nii.gz"), sitk.sitkUInt8)
    reference = segmentation_from_labels(scene, labels, names, f"{target} manual segmentation")
    reference.CreateDefaultDisplayNodes()
    reference.GetDisplayNode().SetVisibility(False)
    return scene, volume, reference, names


def run_fusion(scene, volume, reference, atlases: Path, n_atlases: int):
    """The module's logic, as Apply runs it (the engine in a background process; results loaded as nodes)."""
    from DeepLabelFusionLib import FusionInputs, FusionLogic, FusionSettings

    settings = FusionSettings(method=METHOD, nAtlases=n_atlases, preset=PRESET, device=DEVICE)
    logic = FusionLogic(scene, python=sys.executable)
    last = [""]

    def progress(fraction: float, message: str) -> None:
        if message != last[0]:
            print(f"  [{fraction:4.0%}] {message}", flush=True)
            last[0] = message

    return logic.runBlocking(FusionInputs(volume, atlasFolder=str(atlases), referenceSegmentation=reference),
                             settings, onProgress=progress)


def check_dice(scene, volume, reference, result, names: dict[int, str]) -> None:
    """The Dice of the caption (the engine's metrics.json) equals the Dice of the scene's nodes: the result
    segmentation and the reference segmentation, both exported by Slicer onto the target grid."""
    from Testing.slicer_scene import dice, label_array_of_segmentation

    fused = label_array_of_segmentation(scene, result.segmentation, volume, names)
    manual = label_array_of_segmentation(scene, reference, volume, names)
    for value, entry in result.metrics["labels"].items():
        ours = dice(fused == int(value), manual == int(value))
        assert abs(ours - entry["dice"]) < 1e-9, (entry["name"], ours, entry["dice"])


# ---------------------------------------------------------------------------------------------- slice view

def label_counts_per_slice(scene, segmentation, volume, names: dict[int, str], axis: int) -> np.ndarray:
    """Voxels of each foreground label of ``segmentation`` per slice along numpy ``axis`` of the target grid."""
    from Testing.slicer_scene import label_array_of_segmentation

    labels = label_array_of_segmentation(scene, segmentation, volume, names)
    other = tuple(a for a in range(3) if a != axis)
    return np.stack([np.count_nonzero(labels == v, axis=other) for v in sorted(names) if v], axis=1)


class SliceView:
    """One offscreen slice view built from Slicer's classes, as qMRMLSliceView builds it: a vtkMRMLSliceLogic
    (its slice node, composite node and layer logics make the blended RGBA slice image), an image actor showing
    that image, and the slice view's displayable managers drawing into the same renderer."""

    MANAGERS = ("vtkMRMLSegmentationsDisplayableManager2D", "vtkMRMLColorLegendDisplayableManager",
                "vtkMRMLRulerDisplayableManager")

    def __init__(self, scene, name: str = "Red", size: tuple[int, int] = SLICE_VIEW_SIZE):
        import slicer
        import vtk

        self.appLogic = slicer.vtkMRMLApplicationLogic()
        self.appLogic.SetMRMLScene(scene)
        self.window = vtk.vtkRenderWindow()
        self.window.SetOffScreenRendering(True)
        self.window.SetMultiSamples(0)
        self.window.SetSize(*size)
        self.renderer = vtk.vtkRenderer()
        self.renderer.GetActiveCamera().ParallelProjectionOn()
        self.window.AddRenderer(self.renderer)
        self.interactor = vtk.vtkRenderWindowInteractor()   # the displayable managers observe the view's interactor
        self.interactor.SetRenderWindow(self.window)
        self.interactor.Initialize()

        self.logic = slicer.vtkMRMLSliceLogic()
        self.logic.SetMRMLApplicationLogic(self.appLogic)
        self.logic.SetMRMLScene(scene)
        if self.appLogic.GetSliceLogics() is None:
            self.appLogic.SetSliceLogics(vtk.vtkCollection())
        self.appLogic.GetSliceLogics().AddItem(self.logic)
        self.sliceNode = self.logic.AddSliceNode(name)
        self.composite = self.logic.GetSliceCompositeNode()

        factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
        factory.SetMRMLApplicationLogic(self.appLogic)
        for manager in self.MANAGERS:
            if not factory.IsDisplayableManagerRegistered(manager):
                factory.RegisterDisplayableManager(manager)
        self.managers = slicer.vtkMRMLDisplayableManagerGroup()
        self.managers.Initialize(factory, self.renderer)
        self.managers.SetMRMLDisplayableNode(self.sliceNode)

        self.mapper = vtk.vtkImageMapper()   # the slice logic's output is RGBA 0..255: an identity window
        self.mapper.SetColorWindow(255)
        self.mapper.SetColorLevel(127.5)
        self.actor = vtk.vtkActor2D()
        self.actor.SetMapper(self.mapper)
        self.actor.GetProperty().SetDisplayLocationToBackground()
        self.renderer.AddViewProp(self.actor)
        self.logic.ResizeSliceNode(*size)

    def show(self, orientation: str, ras, volume, marginRight: int = 0) -> None:
        """Slicer's ``orientation`` preset, the slice through ``ras``, ``volume`` fitted to the view (Slicer's fit)
        then panned to the left edge, leaving ``marginRight`` pixels on the right (for the colour legend)."""
        self.sliceNode.SetOrientation(orientation)
        self.logic.FitSliceToBackground()
        self.sliceNode.JumpSliceByOffsetting(*map(float, ras))
        self.logic.SnapSliceOffsetToIJK()
        width = self.sliceNode.GetDimensions()[0]
        bounds = [0.0] * 6
        volume.GetRASBounds(bounds)
        sliceToRas = self.sliceNode.GetSliceToRAS()
        axis = np.array([sliceToRas.GetElement(r, 0) for r in range(3)])
        extent = float(np.abs(axis) @ (np.array(bounds[1::2]) - np.array(bounds[0::2])))
        fov = self.sliceNode.GetFieldOfView()
        if marginRight:   # zoom so that the volume spans all but the margin, then pan it to the left edge
            scale = (width - marginRight) / width * fov[0] / extent
            self.sliceNode.SetFieldOfView(fov[0] / scale, fov[1] / scale, fov[2])
            fov = self.sliceNode.GetFieldOfView()
        shift = (fov[0] - extent) / 2
        for r in range(3):
            sliceToRas.SetElement(r, 3, sliceToRas.GetElement(r, 3) + shift * axis[r])
        self.sliceNode.UpdateMatrices()

    def render(self) -> np.ndarray:
        """The view as an (H, W, 3) uint8 array, top row first."""
        import vtk
        from vtk.util import numpy_support

        self.mapper.SetInputConnection(self.logic.GetImageDataConnection())
        self.managers.RequestRender()
        self.window.Render()
        grab = vtk.vtkWindowToImageFilter()
        grab.SetInput(self.window)
        grab.SetInputBufferTypeToRGB()
        grab.ReadFrontBufferOff()
        grab.Update()
        image = grab.GetOutput()
        width, height, _ = image.GetDimensions()
        rgb = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, 3)
        return np.ascontiguousarray(rgb[::-1])


def render_slice_views(scene, volume, result, vote_labels: list[str], names: dict[int, str]):
    """One slice view, rendered once per label of ``vote_labels``: the target as background, that label's vote map
    as foreground at MAP_OPACITY (shown by the module's ``showMap``, as its map selector does) with its colour
    legend, the fused segmentation as outlines. The slice: the sagittal plane with the most voxels of the rarer
    fused label. Returns the renderings (H, W, 3) and what they show."""
    import slicer

    from AtlasSegLib.results import showMap

    view = SliceView(scene)
    display = result.segmentation.GetDisplayNode()
    display.SetVisibility2DFill(False)          # outlines only: the vote map stays visible inside the structures
    display.SetVisibility2DOutline(True)
    display.SetSliceIntersectionThickness(3)
    view.sliceNode.SetRulerType(slicer.vtkMRMLAbstractViewNode.RulerTypeThin)
    view.sliceNode.SetRulerColor(slicer.vtkMRMLAbstractViewNode.RulerColorWhite)

    counts = label_counts_per_slice(scene, result.segmentation, volume, names, axis=2)   # per i (left-right)
    index = int(np.argmax(counts.min(axis=1)))
    dims = volume.GetImageData().GetDimensions()
    ras = (volume_ijk_to_ras(volume) @ np.array([index, (dims[1] - 1) / 2, (dims[2] - 1) / 2, 1.0]))[:3]
    view.composite.SetBackgroundVolumeID(volume.GetID())   # fitted to the target
    view.show(SLICE_ORIENTATION, ras, volume, LEGEND_MARGIN)

    if not scene.IsNodeClassRegistered("vtkMRMLColorLegendDisplayNode"):   # the Colors module registers it
        scene.RegisterNodeClass(slicer.vtkMRMLColorLegendDisplayNode())
    renderings, legends = [], []
    for label in vote_labels:
        vote = result.voteMaps[label]
        showMap(scene, vote, volume, MAP_OPACITY)
        for legend in legends:
            legend.SetVisibility(False)
        legend = slicer.vtkSlicerColorLogic.AddDefaultColorLegendDisplayNode(vote)
        legend.SetTitleText("votes")            # the label is in the view's title
        legend.SetNumberOfLabels(3)
        legend.SetLabelFormat("%.1f")
        legend.SetSize(LEGEND_MARGIN / SLICE_VIEW_SIZE[0] * 0.8, 0.6)
        legend.SetPosition(0.99, 0.5)
        legends.append(legend)
        assert view.composite.GetForegroundVolumeID() == vote.GetID()
        assert view.composite.GetForegroundOpacity() == MAP_OPACITY
        renderings.append(view.render())
    info = {"orientation": SLICE_ORIENTATION, "slice_index_i": index, "r_mm": round(float(ras[0]), 2),
            "fused_voxels_per_label_on_slice": counts[index].tolist(),
            "classes": [type(o).__name__ for o in (view.logic, view.sliceNode, view.composite,
                                                   view.logic.GetBackgroundLayer())] + list(SliceView.MANAGERS)}
    return renderings, info


COLOUR_NAMES = {"orange": (0.90, 0.62, 0.0), "blue": (0.34, 0.71, 0.91), "green": (0.0, 0.62, 0.45),
                "yellow": (0.94, 0.89, 0.26), "dark blue": (0.0, 0.45, 0.70), "red": (0.84, 0.37, 0.0),
                "pink": (0.80, 0.47, 0.65), "brown": (0.55, 0.34, 0.29), "grey": (0.5, 0.5, 0.5)}


def segment_colour_names(segmentation) -> dict[str, str]:
    """Segment name -> the nearest of COLOUR_NAMES to its colour (for the caption)."""
    seg = segmentation.GetSegmentation()
    named = {}
    for k in range(seg.GetNumberOfSegments()):
        colour = np.array(seg.GetNthSegment(k).GetColor())
        named[seg.GetNthSegment(k).GetName()] = min(
            COLOUR_NAMES, key=lambda name: float(np.sum((np.array(COLOUR_NAMES[name]) - colour) ** 2)))
    return named


def volume_ijk_to_ras(volume) -> np.ndarray:
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


# ---------------------------------------------------------------------------------------------- panel

def render_module_panel(png: Path, volume, reference, result, atlases: Path, n_atlases: int, vote_label: str):
    """The module panel (``test_slicer_static.render_panel``) with this run's inputs, settings and results."""
    from Testing import test_slicer_static as static

    example = static.PANEL_EXAMPLES[MODULE]

    def fill(panel) -> None:
        from PySide6.QtGui import QStandardItem, QStandardItemModel
        from PySide6.QtWidgets import QComboBox, QLabel, QLineEdit, QSpinBox, QTableView

        example(panel)   # the screenshot's layout: which rows are hidden, the method list and its note
        labels = {name: static.module_dict_literal(MODULE, name)
                  for name in ("BACKEND_LABELS", "PRESET_LABELS", "DEVICE_LABELS")}
        texts = {"targetVolumeSelector": volume.GetName(), "referenceSegmentationSelector": reference.GetName(),
                 "presetComboBox": labels["PRESET_LABELS"][PRESET], "deviceComboBox": labels["DEVICE_LABELS"][DEVICE],
                 "outputSegmentationSelector": "Create new segmentation",
                 "mapSelector": result.voteMaps[vote_label].GetName()}
        for name, text in texts.items():
            combo = panel.findChild(QComboBox, name)
            combo.clear()
            combo.addItem(text)
        panel.findChild(QLineEdit, "atlasFolderPathLineEdit").setText(str(atlases))
        panel.findChild(QSpinBox, "nAtlasesSpinBox").setValue(n_atlases)
        timings = result.run.get("timings_s", {})   # the module's status line (_showResult), the engine's total time
        seconds = timings.get("total", sum(timings.values()))
        status = f"Done in {seconds:.0f} s with {len(result.run.get('atlases', []))} atlases."
        if result.metrics:
            status += f" Mean Dice {result.metrics['mean']['dice']:.3f}."
        panel.findChild(QLabel, "statusLabel").setText(status)
        table = result.metricsTable.GetTable()   # the metrics table node, as qMRMLTableView shows it
        model = QStandardItemModel(table.GetNumberOfRows(), table.GetNumberOfColumns(), panel)
        for c in range(table.GetNumberOfColumns()):
            model.setHorizontalHeaderItem(c, QStandardItem(table.GetColumnName(c)))
            for r in range(table.GetNumberOfRows()):
                value = table.GetValue(r, c)
                text = value.ToString() if value.IsString() else f"{value.ToDouble():.3f}"
                model.setItem(r, c, QStandardItem(text))
        view = panel.findChild(QTableView, "metricsTableView")
        view.setModel(model)
        view.verticalHeader().hide()
        view.resizeColumnsToContents()

    static.PANEL_EXAMPLES[MODULE] = fill
    try:
        static.render_panel(MODULE, png)
    finally:
        static.PANEL_EXAMPLES[MODULE] = example
    return read_png(png)


def read_png(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    rgb = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    return rgb[..., :3].astype(np.uint8) if rgb.ndim == 3 else np.repeat(rgb[..., None], 3, axis=2).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- composition

def wrap(text: str, width: int, scale: int) -> list[str]:
    """``text`` broken at spaces into lines at most ``width`` pixels wide in the bitmap font."""
    from atlasseg.render import text_width

    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and text_width(candidate, scale) > width:
            lines.append(line)
            candidate = word
        line = candidate
    return lines + [line] if line else lines


def compose(panel: np.ndarray, views: list[tuple[str, np.ndarray]], caption: list[str]) -> np.ndarray:
    """panel | slice views stacked (each under its title), on the panel's grey, the caption below everything."""
    from atlasseg.render import draw_text, fit_text, text_height

    grey = panel[2, 2]
    gap, line = 12, text_height(CAPTION_SCALE) + 8
    column = []
    for title, rgb in views:
        band = np.empty((line + 4, rgb.shape[1], 3), np.uint8)
        band[:] = grey
        draw_text(band, fit_text(title, rgb.shape[1], CAPTION_SCALE)[0], 0, 6, (0, 0, 0), CAPTION_SCALE)
        column += [band, rgb, np.tile(grey, (gap, rgb.shape[1], 1))]
    right = np.concatenate(column, axis=0)
    height = max(panel.shape[0], right.shape[0])
    width = panel.shape[1] + gap + right.shape[1] + gap
    body = np.empty((height, width, 3), np.uint8)
    body[:] = grey
    body[:panel.shape[0], :panel.shape[1]] = panel
    body[:right.shape[0], panel.shape[1] + gap:panel.shape[1] + gap + right.shape[1]] = right
    lines = [wrapped for paragraph in caption for wrapped in wrap(paragraph, width - 20, CAPTION_SCALE)]
    strip = np.full((len(lines) * line + 16, width, 3), 255, np.uint8)
    strip[:2] = 160
    for k, text in enumerate(lines):
        draw_text(strip, text, 10, 10 + k * line, (0, 0, 0), CAPTION_SCALE)
    return np.concatenate([body, strip], axis=0)


def write_png(rgb: np.ndarray, path: Path) -> None:
    import SimpleITK as sitk

    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(np.ascontiguousarray(rgb), isVector=True), str(path))


# ---------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help="the hippocampus Decathlon folder")
    parser.add_argument("--target", default="hippocampus_017")
    parser.add_argument("--n-atlases", type=int, default=8)
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    if not (args.data / "dataset.json").is_file():
        print(f"skipped: the real data is not at {args.data} (../shared is absent on this machine); "
              f"nothing written", file=sys.stderr)
        return 0
    try:
        import slicer
        if not hasattr(slicer, "vtkMRMLScene"):
            raise ImportError("the 'slicer' package found is not slicer-core")
        import PySide6  # noqa: F401
    except ImportError as error:
        print(f"skipped: {error} (pip install slicer-core PySide6); nothing written", file=sys.stderr)
        return 0

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="atlasseg_screenshot_") as tmp:
        tmp = Path(tmp)
        folder = tmp / f"hippocampus_atlases_without_{args.target.rsplit('_', 1)[-1]}"
        atlases, chosen = atlas_folder(args.data, args.target, args.n_atlases, folder)
        print(f"target {args.target}; atlases {', '.join(chosen)}", flush=True)
        scene, volume, reference, names = load_target_scene(args.data, args.target)
        t1 = time.perf_counter()
        result = run_fusion(scene, volume, reference, atlases, args.n_atlases)
        t2 = time.perf_counter()
        used = result.run.get("atlases", [])
        assert args.target not in used and sorted(used) == sorted(chosen), used
        check_dice(scene, volume, reference, result, names)
        vote_labels = [names[v] for v in sorted(names) if v]
        views, info = render_slice_views(scene, volume, result, vote_labels, names)
        t3 = time.perf_counter()
        panel = render_module_panel(tmp / "panel.png", volume, reference, result, atlases, args.n_atlases,
                                    vote_labels[-1])
        t4 = time.perf_counter()
    metrics = result.metrics
    dice = {entry["name"]: entry["dice"] for entry in metrics["labels"].values()}
    slice_text = f"{SLICE_ORIENTATION.lower()} slice i={info['slice_index_i']}"
    outlines = ", ".join(f"{name} {colour}" for name, colour in segment_colour_names(result.segmentation).items())
    titles = [f"votes {label}, {slice_text}" if k == 0 else f"votes {label} (selected in the panel), same slice"
              for k, label in enumerate(vote_labels)]
    caption = [
        f"Real data, real scene: Decathlon Task04 hippocampus MRI, target {args.target}, segmented by the "
        f"DeepLabelFusion module's logic (FusionLogic.runBlocking on a slicer-core MRML scene) with joint label "
        f"fusion of {len(used)} other cases of the set (target excluded), built-in registration, 'fast' preset, "
        f"CPU.",
        "Dice vs the manual label: " + ", ".join(f"{n} {d:.3f}" for n, d in dice.items())
        + f" (mean {metrics['mean']['dice']:.3f}).",
        f"Right: Slicer's slice pipeline (vtkMRMLSliceLogic and displayable managers, rendered offscreen), "
        f"{slice_text}, anterior to the left: the fused segmentation as outlines ({outlines}) over each label's "
        f"vote map (JLF's weighted atlas votes, 0-1, Rainbow) at {MAP_OPACITY:.0%} on the "
        f"target. Left: the module's .ui rendered offscreen (PySide6; Slicer's widgets drawn as plain Qt ones) "
        f"with this run's inputs, settings and results.",
    ]
    write_png(compose(panel, list(zip(titles, views)), caption), args.output)
    print(json.dumps({"output": str(args.output), "dice": dice, "slice": info,
                      "engine_timings_s": result.run.get("timings_s"),
                      "seconds": {"scene": round(t1 - t0, 1), "fusion": round(t2 - t1, 1),
                                  "slice_views": round(t3 - t2, 1), "panel": round(t4 - t3, 1),
                                  "total": round(time.perf_counter() - t0, 1)}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
