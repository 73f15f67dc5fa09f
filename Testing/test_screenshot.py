"""The extension's screenshot script (Testing/render_screenshot.py, issue #14): it skips without the real data,
never uses the target as an atlas, and renders panel | slice views from a real run (three atlases here).

The committed screenshot is made with ``python Testing/render_screenshot.py`` (eight atlases).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from Testing import render_screenshot as shot
from Testing.conftest import shared_dataset

REPO = Path(__file__).resolve().parents[1]


def test_skips_with_a_message_where_the_data_is_absent(tmp_path, capsys):
    png = tmp_path / "shot.png"
    assert shot.main(["--data", str(tmp_path / "no_data"), "--output", str(png)]) == 0
    assert "skipped: the real data is not at" in capsys.readouterr().err
    assert not png.exists()


def test_atlas_folder_lists_other_cases_only(tmp_path):
    data = shared_dataset("hippocampus")
    cases = [Path(e["image"]).name.split(".")[0] for e in json.loads((data / "dataset.json").read_text())["training"]]
    folder, chosen = shot.atlas_folder(data, cases[-1], 3, tmp_path / "atlases")   # wraps around the list
    assert chosen == cases[:3] and cases[-1] not in chosen
    listed = json.loads((folder / "dataset.json").read_text())
    assert listed["numTraining"] == 3 and listed["labels"] == json.loads((data / "dataset.json").read_text())["labels"]
    for entry in listed["training"]:
        for key in ("image", "label"):
            assert (folder / entry[key]).resolve().is_file()


def test_extension_screenshot_is_the_rendered_one():
    text = (REPO / "CMakeLists.txt").read_text()
    urls = re.search(r'set\(EXTENSION_SCREENSHOTURLS\s+"([^"]+)"\)', text).group(1).split()
    assert any(url.endswith("/main/Resources/Screenshots/AtlasSeg_screenshot.png") for url in urls), urls
    assert shot.OUTPUT.is_file()


def test_screenshot_of_a_real_run(tmp_path):
    """The script end to end with three atlases: Dice of a real segmentation, Slicer's classes drew the slice, and
    the picture holds the panel, the segment outlines in their colours and the vote map's colours."""
    shared_dataset("hippocampus")
    pytest.importorskip("PySide6.QtUiTools", reason="PySide6 is not installed")
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("the 'slicer' package found is not slicer-core")
    png = tmp_path / "shot.png"
    done = subprocess.run([sys.executable, str(REPO / "Testing" / "render_screenshot.py"), "--n-atlases", "3",
                           "--output", str(png)], capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout[done.stdout.index("\n{") + 1:])
    assert min(report["dice"].values()) > 0.6, report["dice"]
    assert {"vtkMRMLSliceLogic", "vtkMRMLSliceCompositeNode", "vtkMRMLSegmentationsDisplayableManager2D"} <= set(
        report["slice"]["classes"])
    assert min(report["slice"]["fused_voxels_per_label_on_slice"]) > 20   # both labels cut by the slice

    rgb = sitk.GetArrayFromImage(sitk.ReadImage(str(png)))
    width, height = shot.SLICE_VIEW_SIZE
    assert rgb.shape[1] > 400 + width and rgb.shape[0] > 2 * height
    views = rgb[:, -width - 12:-12]
    from AtlasSegLib.results import PALETTE

    for value in (1, 2):   # each segment's outline, in its colour, in the slice views
        colour = np.round(np.array(PALETTE[value - 1]) * 255)
        assert np.count_nonzero(np.all(views == colour, axis=-1)) > 500, (value, colour)
    saturated = (views.max(axis=-1).astype(int) - views.min(axis=-1)) > 120   # the Rainbow vote map, not greys
    assert np.count_nonzero(saturated) > 5000
    panel = rgb[:600, :400]
    assert len(np.unique(panel.reshape(-1, 3), axis=0)) > 20, "the panel is blank"
