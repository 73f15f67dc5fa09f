"""Static checks of the Slicer extension: module code compiles, .ui and code agree, CMake lists real files,
the shared library AtlasSegLib is found installed and in a checkout, each .ui loads with PySide6's QUiLoader
offscreen and renders to a PNG.

``python Testing/test_slicer_static.py [MODULE ...]`` rewrites the committed panel screenshots.
"""

from __future__ import annotations

import ast
import json
import os
import py_compile
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULES_WITH_GUI = ["DeepLabelFusion", "AtlasNetSeg"]
LIBRARY = "AtlasSegLib"
# per module: the fewest widgets its code should use, and parameters its .ui must bind
MIN_WIDGETS_USED = {"DeepLabelFusion": 25, "AtlasNetSeg": 12}
TRAINING_BOUND = {"trainingAtlasFolder", "trainingEpochs", "trainingModelFolder"}   # the Train a model section
BOUND_PARAMETERS = {"DeepLabelFusion": {"targetVolume", "atlasFolder", "nAtlases", "jlfAlpha", "outputSegmentation",
                                        "show3D", "weightMaps", *TRAINING_BOUND},
                    "AtlasNetSeg": {"targetVolume", "extraModality1", "modelFolder", "networkSegmentations",
                                    *TRAINING_BOUND}}
TRAINING_PANEL = REPO / LIBRARY / "trainingpanel.py"   # the Train a model section's code, shared by the modules
# the rest of the panels' shared code: the module classes' base (parameter node, device choice), the Apply part, and
# what both sections that run the engine share (start, poll, cancel, log)
SHARED_PANEL = [REPO / LIBRARY / name for name in ("modulebase.py", "runpanel.py", "enginepanel.py")]
OPTIONAL_WIDGETS = {"logTextEdit", "logCollapsibleButton"}   # the engine log pane: DeepLabelFusion's panel only
TRAINING_FIELDS = {"trainingAtlasFolder", "trainingMethod", "trainingSize", "trainingEpochs", "trainingDevice",
                   "trainingModelFolder"}


def screenshot(module: str) -> Path:
    return REPO / module / "Resources" / "Screenshots" / f"{module}_panel.png"


def module_python_files(module: str) -> list[Path]:
    return sorted((REPO / module).rglob("*.py"))


def ui_file(module: str) -> Path:
    return REPO / module / "Resources" / "UI" / f"{module}.ui"


def ui_object_names(path: Path) -> dict[str, str]:
    """objectName -> class of every widget in a .ui file."""
    return {w.get("name"): w.get("class") for w in ET.parse(path).getroot().iter("widget")}


def ui_parameter_names(path: Path) -> set[str]:
    names = set()
    for widget in ET.parse(path).getroot().iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                names.add(prop.findtext("string"))
    return names


def annotated_fields(node: ast.ClassDef) -> set[str]:
    return {s.target.id for s in node.body if isinstance(s, ast.AnnAssign)}


def library_class(name: str) -> ast.ClassDef:
    for path in (REPO / LIBRARY).glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and node.name == name:
                return node
    raise AssertionError(f"{name} is not a class of {LIBRARY}")


def parameter_node_fields(module_py: Path) -> set[str]:
    """Annotated fields of the @parameterNodeWrapper class in a module file, with those it inherits from the shared
    library's classes (Slicer's wrapper reads inherited annotations)."""
    tree = ast.parse(module_py.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(
                getattr(d, "id", None) == "parameterNodeWrapper" for d in node.decorator_list):
            return annotated_fields(node).union(*(annotated_fields(library_class(base.id)) for base in node.bases))
    raise AssertionError(f"{module_py}: no @parameterNodeWrapper class")


def shared_panel_code() -> str:
    return "\n".join(path.read_text() for path in SHARED_PANEL)


def widgets_used(code: str) -> set[str]:
    """The panel widgets code uses: ``self.ui.name`` and ``ui.name``."""
    return set(re.findall(r"\bui\.(\w+)", code))


def ui_widgets(path: Path) -> dict[str, ET.Element]:
    """objectName -> <widget> element of every widget in a .ui file."""
    return {w.get("name"): w for w in ET.parse(path).getroot().iter("widget")}


def ui_property(widget: ET.Element, name: str):
    """A widget's own property value (string, bool, number or set/enum text), None when not set."""
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            value = next(iter(prop))
            return {"true": True, "false": False}.get(value.text, value.text) if value.tag == "bool" else value.text
    return None


def ui_ancestors(path: Path, name: str) -> list[str]:
    """Names of the widgets that contain widget ``name``, innermost first."""
    root = ET.parse(path).getroot()
    parents = {child: parent for parent in root.iter() for child in parent}
    chain, node = [], next(w for w in root.iter("widget") if w.get("name") == name)
    while node in parents:
        node = parents[node]
        if node.tag == "widget":
            chain.append(node.get("name"))
    return chain


def module_dict_literal(module: str, variable: str) -> dict:
    """A top-level dict literal of a module file (read without importing Slicer's qt)."""
    tree = ast.parse((REPO / module / f"{module}.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == variable for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{module}.py has no {variable}")


def cmake_list(text: str, variable: str) -> list[str]:
    match = re.search(r"set\(\s*" + variable + r"\s+(.*?)\)", text, re.S)
    assert match, f"set({variable} ...) not found"
    return [item.strip('"') for item in match.group(1).split() if not item.startswith("#")]


@pytest.mark.parametrize("module", MODULES_WITH_GUI)
def test_every_module_python_file_compiles(module, tmp_path):
    files = module_python_files(module)
    assert len(files) >= 3, files  # module, Lib package (2+ files)
    for path in files:
        py_compile.compile(str(path), cfile=str(tmp_path / (path.name + "c")), doraise=True)


@pytest.mark.parametrize("module", MODULES_WITH_GUI)
def test_widget_names_used_in_code_exist_in_ui(module):
    """The module's own code and the panels' shared code (AtlasSegLib: the module widget base, the Apply part) use
    only widgets of the module's .ui; the optional engine log pane is there whole or not at all."""
    names = ui_object_names(ui_file(module))
    own = set(re.findall(r"self\.ui\.(\w+)", (REPO / module / f"{module}.py").read_text()))
    shared = widgets_used(shared_panel_code())
    assert {"applyButton", "progressBar", "statusLabel", "mapSelector", "deviceComboBox"} <= shared, shared
    used = own | shared
    assert len(used) >= MIN_WIDGETS_USED[module], used
    missing = sorted(used - set(names))
    assert not missing, f"{module}.py and {LIBRARY} use widgets missing from {module}.ui: {missing}"
    optional = set(re.findall(r'getattr\((?:self\.)?ui, "(\w+)"', shared_panel_code()))
    assert optional == OPTIONAL_WIDGETS
    assert OPTIONAL_WIDGETS & set(names) in (set(), OPTIONAL_WIDGETS), f"{module}.ui has half a log pane"
    assert (OPTIONAL_WIDGETS <= set(names)) == (module == "DeepLabelFusion")


@pytest.mark.parametrize("module", MODULES_WITH_GUI)
def test_ui_parameter_names_are_parameter_node_fields(module):
    bound = ui_parameter_names(ui_file(module))
    fields = parameter_node_fields(REPO / module / f"{module}.py")
    assert BOUND_PARAMETERS[module] <= bound
    assert bound <= fields, f"SlicerParameterName without a parameter: {sorted(bound - fields)}"


def test_deep_label_fusion_panel_sections_and_widgets():
    """Outputs (new or overwritten segmentation, 3D), weight maps in the collapsed Advanced section, a read-only
    log pane collapsed by default, and the method's note as a visible label under the method."""
    path = ui_file("DeepLabelFusion")
    widgets = ui_widgets(path)

    def collapsed_section(name: str) -> str:
        section = next(a for a in ui_ancestors(path, name) if widgets[a].get("class") == "ctkCollapsibleButton")
        return section if ui_property(widgets[section], "collapsed") else ""

    output = widgets["outputSegmentationSelector"]
    assert output.get("class") == "qMRMLNodeComboBox" and ui_property(output, "noneEnabled") is True
    assert [s.text for s in output.iter("string")][0] == "vtkMRMLSegmentationNode"
    assert ui_property(output, "noneDisplay") == "Create new segmentation"
    assert ui_ancestors(path, "outputSegmentationSelector")[0] == "outputsCollapsibleButton"
    assert widgets["show3DCheckBox"].get("class") == "QCheckBox"
    assert ui_ancestors(path, "show3DCheckBox")[0] == "outputsCollapsibleButton"

    assert widgets["weightMapsCheckBox"].get("class") == "QCheckBox"
    assert ui_property(widgets["weightMapsCheckBox"], "text") == "Weight maps per atlas"
    assert collapsed_section("weightMapsCheckBox") == "advancedCollapsibleButton"
    assert collapsed_section("jlfAlphaSpinBox") == "advancedCollapsibleButton"

    log = widgets["logTextEdit"]
    assert log.get("class") == "QPlainTextEdit" and ui_property(log, "readOnly") is True
    assert collapsed_section("logTextEdit") == "logCollapsibleButton"

    note = widgets["methodNoteLabel"]
    assert note.get("class") == "QLabel" and ui_property(note, "wordWrap") is True
    assert ui_ancestors(path, "methodNoteLabel")[0] == "settingsCollapsibleButton"
    assert not collapsed_section("methodNoteLabel")
    code = (REPO / "DeepLabelFusion" / "DeepLabelFusion.py").read_text()
    # the visible note under the method: its description, and the shipped model Apply uses when none is chosen
    assert "methodDescription(p.method), self._modelOffer(p).message" in code
    assert "self.ui.methodNoteLabel.text = " in code
    assert "class DeepLabelFusionWidget(AtlasSegWidget)" in code   # the shared panel code runs its Apply part
    code += shared_panel_code()
    for call in ("self.logic.onSceneStartClose()", "self.logic.cancelActiveRuns()", "self._run.requestCancel()",
                 "run.newLogLines()"):
        assert call in code, call
    assert "self._run.cancel()" not in code   # the blocking cancel never runs in the GUI thread


@pytest.mark.parametrize("module", MODULES_WITH_GUI)
def test_train_section_widgets_parameters_and_wiring(module):
    """The shared *Train a model* section: every widget its code uses is in the module's .ui, inside the section,
    which is collapsed by default; every input explains itself; the parameters it reads are fields of the module's
    parameter node; the module builds it, refreshes it and takes the trained model for Apply; cancel never
    blocks the panel."""
    path = ui_file(module)
    widgets = ui_widgets(path)
    code = TRAINING_PANEL.read_text()
    used = widgets_used(code)
    assert len(used) >= 10, used
    assert not sorted(used - set(widgets)), f"{module}.ui lacks {sorted(used - set(widgets))}"
    bound = {name for name, w in widgets.items() if any(
        prop.get("name") == "SlicerParameterName" and (prop.findtext("string") or "").startswith("training")
        for prop in w.findall("property"))}
    assert {ui_property(widgets[name], "SlicerParameterName") for name in bound} == TRAINING_BOUND
    used |= bound
    section = widgets["trainCollapsibleButton"]
    assert section.get("class") == "ctkCollapsibleButton" and ui_property(section, "collapsed") is True
    assert ui_property(section, "text") == "Train a model"
    for name in used:
        assert "trainCollapsibleButton" in ui_ancestors(path, name), f"{name} is outside the Train section"
    inputs = {"QComboBox", "QSpinBox", "ctkPathLineEdit", "QPushButton"}
    for name in used:
        if widgets[name].get("class") in inputs:
            assert ui_property(widgets[name], "toolTip"), f"{name} has no tooltip"
    fields = parameter_node_fields(REPO / module / f"{module}.py")
    assert TRAINING_FIELDS <= fields
    assert set(re.findall(r"\bp\.(training\w+)", code)) <= fields
    module_code = (REPO / module / f"{module}.py").read_text()
    assert f"class {module}Widget(AtlasSegWidget)" in module_code and "def onModelTrained(self, result)" in module_code
    module_code += shared_panel_code()   # the module widget base builds the section and keeps it up to date
    for call in ("TrainingSection(self.ui, self.logic", "self.training.update()", "self.training.setParameterNode(",
                 "training.forget(", "self.runSection.closing("):
        assert call in module_code, call
    code += shared_panel_code()          # the section's start, poll and cancel: AtlasSegLib.enginepanel
    assert "self._run.requestCancel()" in code and not re.search(r"\.cancel\(\)", code)


def test_training_sizes_and_methods_come_from_the_library_and_the_registry():
    """The size choices say what they are for; each module trains the registry's trainable methods of its panel."""
    from atlasseg import methods

    sys.path.insert(0, str(REPO / "DeepLabelFusion"))
    sys.path.insert(0, str(REPO / "AtlasNetSeg"))
    from AtlasNetSegLib import AtlasNetLogic
    from DeepLabelFusionLib import FusionLogic

    from AtlasSegLib import DEFAULT_SIZE, TRAINING_SIZES

    assert list(TRAINING_SIZES) == ["small", "standard", "large"] and DEFAULT_SIZE in TRAINING_SIZES
    assert "CPU" in TRAINING_SIZES["small"].label and "GPU" in TRAINING_SIZES["large"].label
    for size in TRAINING_SIZES.values():
        assert not re.search(r"\btorch\b", size.label + size.noteFor("dlf") + size.noteFor("atlasnet"), re.I)
    for logic, module in ((FusionLogic(None), "DeepLabelFusion"), (AtlasNetLogic(None), "AtlasNetSeg")):
        expected = {n: m.label for n, m in methods.METHODS.items() if m.trains and m.slicer_module == module}
        assert logic.trainingMethods() == expected and expected
    assert list(FusionLogic(None).trainingMethods()) == ["dlf"]
    assert list(AtlasNetLogic(None).trainingMethods()) == ["atlasnet"]


def test_deep_label_fusion_panel_speaks_plainly():
    """No bare jargon on screen: every label, check box and choice says what it is; inputs explain themselves."""
    path = ui_file("DeepLabelFusion")
    widgets = ui_widgets(path)
    shown = [ui_property(w, "text") or ui_property(w, "title") or "" for w in widgets.values()]
    shown += [*module_dict_literal("DeepLabelFusion", "BACKEND_LABELS").values(),
              *module_dict_literal("DeepLabelFusion", "PRESET_LABELS").values(),
              *module_dict_literal("DeepLabelFusion", "DEVICE_LABELS").values()]
    for text in shown:   # a bare "Alpha:" or "Greedy", or the engine's internal name "torch", says nothing
        assert not re.fullmatch(r"\s*(alpha|beta|greedy)\s*:?\s*", text, re.I), f"unexplained: {text!r}"
        assert not re.search(r"\btorch\b", text, re.I), f"'torch' is the engine's name for it: {text!r}"
    backends = module_dict_literal("DeepLabelFusion", "BACKEND_LABELS")
    assert "PyTorch" in backends["torch"] and "GPU" in backends["torch"] and "CPU" in backends["greedy"]
    assert ui_property(widgets["jlfAlphaLabel"], "text").endswith("(alpha):")
    assert ui_property(widgets["jlfBetaLabel"], "text").endswith("(beta):")
    assert ui_property(widgets["targetVolumeLabel"], "text") == "Target volume (modality 1):"
    inputs = {"QComboBox", "QSpinBox", "QDoubleSpinBox", "QCheckBox", "ctkPathLineEdit", "qMRMLNodeComboBox"}
    for name, widget in widgets.items():
        if widget.get("class") in inputs and name not in ("atlasImageSelector",):
            assert ui_property(widget, "toolTip"), f"{name} has no tooltip"


@pytest.mark.parametrize("module", MODULES_WITH_GUI)
def test_module_cmake_lists_existing_files(module):
    text = (REPO / module / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule" in text and "WITH_GENERIC_TESTS" in text
    assert "slicer_add_python_unittest" in text
    scripts = cmake_list(text, "MODULE_PYTHON_SCRIPTS")
    resources = cmake_list(text, "MODULE_PYTHON_RESOURCES")
    listed = [s.replace("${MODULE_NAME}", module) for s in scripts + resources]
    assert f"{module}.py" in listed and f"Resources/UI/{module}.ui" in listed
    assert f"Resources/Icons/{module}.png" in listed
    missing = [item for item in listed if not (REPO / module / item).is_file()]
    assert not missing, missing
    lib_files = {p.relative_to(REPO / module).as_posix() for p in (REPO / module / f"{module}Lib").glob("*.py")}
    assert lib_files <= set(listed), f"Lib files not installed by CMake: {sorted(lib_files - set(listed))}"
    for sub in re.findall(r"add_subdirectory\((\w+)\)", text):
        assert (REPO / module / sub / "CMakeLists.txt").is_file()


def test_extension_cmake_metadata_and_files():
    text = (REPO / "CMakeLists.txt").read_text()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        assert re.search(rf'set\({key}\s+"[^"]+"\)', text), f"{key} missing or empty"
    assert re.search(r'set\(EXTENSION_DEPENDS\s+"?PyTorch"?\)', text)
    assert "Slicer_EXTENSION_GENERATE_CONFIG" in text and "Slicer_EXTENSION_CPACK" in text
    for url_key in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        url = re.search(rf'set\({url_key}\s+"([^"]+)"\)', text).group(1)
        repo_path = url.split("/main/", 1)[1]
        assert (REPO / repo_path).is_file(), f"{url_key} points to a missing file {repo_path}"
    for module in MODULES_WITH_GUI:
        assert module in text and (REPO / module / "CMakeLists.txt").is_file()
    engine_files = cmake_engine_files(text)
    assert "atlasseg/__init__.py" in engine_files and "atlasseg/cli.py" in engine_files
    assert f"add_subdirectory({LIBRARY})" in text
    assert "Apache License" in (REPO / "LICENSE").read_text()[:200]   # the license the project declares
    description = re.search(r'set\(EXTENSION_DESCRIPTION\s+"([^"]+)"\)', text).group(1)
    promised = {"AtlasNet": "AtlasNetSeg", "DeepAtlas": "DeepAtlasReg"}   # no promise of modules not built yet
    for method, module in promised.items():
        assert (method in description) == (REPO / module / "CMakeLists.txt").is_file(), method


def test_library_cmake_installs_every_file_beside_the_modules():
    """AtlasSegLib/*.py go to qt-scripted-modules/AtlasSegLib, where the modules import them."""
    text = (REPO / LIBRARY / "CMakeLists.txt").read_text()
    listed = cmake_list(text, "ATLASSEGLIB_PYTHON_SCRIPTS")
    present = sorted(p.relative_to(REPO).as_posix() for p in (REPO / LIBRARY).glob("*.py"))
    assert sorted(listed) == present
    assert "ctkMacroCompilePythonScript" in text and "NO_INSTALL_SUBDIR" in text
    assert "${Slicer_QTSCRIPTEDMODULES_LIB_DIR}" in text and "${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}" in text


def top_level_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


@pytest.mark.parametrize("module", MODULES_WITH_GUI)
def test_module_libraries_do_not_copy_the_shared_library(module):
    """One source of truth: nothing AtlasSegLib defines is defined again in a module's Lib package."""
    shared = set().union(*(top_level_names(p) for p in (REPO / LIBRARY).glob("*.py")))
    for path in (REPO / module / f"{module}Lib").glob("*.py"):
        assert not top_level_names(path) & shared, f"{path.name} redefines {sorted(top_level_names(path) & shared)}"
    assert not (REPO / module / f"{module}Lib" / "engine.py").exists()


def library_bootstrap(module: str) -> str:
    """The module file's statement that puts the repository root on sys.path when AtlasSegLib is missing."""
    source = (REPO / module / f"{module}.py").read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.If) and LIBRARY in ast.get_source_segment(source, node.test):
            return ast.get_source_segment(source, node)
    raise AssertionError(f"{module}.py has no 'if AtlasSegLib is not importable' statement")


def import_as_slicer_would(module_file: Path, cwd: Path) -> dict:
    """In a fresh interpreter: the module's folder on sys.path (as Slicer puts it), the module file's bootstrap
    run, then the module's Lib and AtlasSegLib imported. Returns where they came from and the engine root."""
    module = module_file.stem
    code = "\n".join([
        "import importlib.util, json, pathlib, sys",
        f"__file__ = {str(module_file)!r}",
        f"sys.path.insert(0, {str(module_file.parent)!r})",
        "before = list(sys.path)",
        library_bootstrap(module),
        f"import AtlasSegLib, {module}Lib",
        "print(json.dumps({'library': AtlasSegLib.__file__, 'lib': " + module + "Lib.__file__,",
        "                  'engine': str(AtlasSegLib.findEngineRoot()), 'added': sys.path != before,",
        "                  'methods': sorted(" + module + "Lib.METHODS)}))"])
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", MODULES_WITH_GUI)
def test_shared_library_and_engine_are_found_in_a_source_checkout(module, tmp_path):
    found = import_as_slicer_would(REPO / module / f"{module}.py", tmp_path)
    assert found["added"], "the repository root should have been added to sys.path"
    assert Path(found["library"]).parent == REPO / LIBRARY and Path(found["engine"]) == REPO
    assert found["methods"]


@pytest.mark.parametrize("module", MODULES_WITH_GUI)
def test_shared_library_and_engine_are_found_installed_beside_the_modules(module, tmp_path):
    """The build's layout: qt-scripted-modules/{Module.py, ModuleLib, AtlasSegLib, atlasseg}; sys.path untouched."""
    installed = tmp_path / "lib" / "Slicer-5.9" / "qt-scripted-modules"
    ignore = shutil.ignore_patterns("__pycache__")
    for folder in (REPO / LIBRARY, REPO / "atlasseg", REPO / module / f"{module}Lib"):
        shutil.copytree(folder, installed / folder.name, ignore=ignore)
    shutil.copy2(REPO / module / f"{module}.py", installed)
    found = import_as_slicer_would(installed / f"{module}.py", tmp_path)
    assert not found["added"], "an installed AtlasSegLib must be used as it is"
    assert Path(found["library"]).parent == installed / LIBRARY and Path(found["lib"]).parent.parent == installed
    assert Path(found["engine"]) == installed and found["methods"]


def cmake_engine_files(text: str) -> list[str]:
    """The engine files the top-level CMake installs (its glob evaluated here)."""
    match = re.search(r'file\(GLOB_RECURSE\s+ATLASSEG_ENGINE_SCRIPTS\s+RELATIVE\s+\S+\s+"?([^")\s]+)"?', text)
    assert match, "engine install glob not found"
    pattern = match.group(1).replace("${CMAKE_CURRENT_SOURCE_DIR}/", "")
    return sorted(p.relative_to(REPO).as_posix() for p in REPO.glob(pattern.replace("*.py", "**/*.py")))


@pytest.mark.parametrize("module", MODULES_WITH_GUI)
def test_icon_is_a_128_pixel_png(module):
    data = (REPO / module / "Resources" / "Icons" / f"{module}.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (128, 128)


# ---------------------------------------------------------------------------------------------- Qt (.ui)

def qt_app():
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    widgets = pytest.importorskip("PySide6.QtWidgets", reason="PySide6 is not installed (pip install PySide6)")
    pytest.importorskip("PySide6.QtUiTools", reason="PySide6 QtUiTools is not installed")
    return widgets.QApplication.instance() or widgets.QApplication([])


def load_ui(path: Path, loader=None):
    from PySide6.QtCore import QFile
    from PySide6.QtUiTools import QUiLoader

    loader = loader or QUiLoader()
    handle = QFile(str(path))
    assert handle.open(QFile.ReadOnly)
    widget = loader.load(handle)
    handle.close()
    assert widget is not None, loader.errorString()
    return widget


@pytest.mark.parametrize("module", MODULES_WITH_GUI)
def test_ui_loads_offscreen_with_base_class_fallback(module):
    qt_app()
    from PySide6.QtWidgets import QPushButton, QTableView, QWidget

    widget = load_ui(ui_file(module))
    names = ui_object_names(ui_file(module))
    for name, cls in names.items():
        child = widget if name == module else widget.findChild(QWidget, name)
        assert child is not None, f"{name} ({cls}) not created"
    assert widget.findChild(QWidget, "inputsCollapsibleButton").property("text") == "Inputs"
    assert isinstance(widget.findChild(QWidget, "metricsTableView"), QTableView)  # qMRMLTableView -> QTableView
    assert isinstance(widget.findChild(QWidget, "applyButton"), QPushButton)


def look_alike_loader():
    """A QUiLoader that makes look-alike Qt widgets of Slicer's (defined here: PySide6 is imported lazily)."""
    from PySide6.QtCore import Qt
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import QComboBox, QGroupBox, QLineEdit, QSlider, QTableView, QWidget

    class LookAlikeLoader(QUiLoader):
        STAND_INS = {"ctkCollapsibleButton": QGroupBox, "qMRMLNodeComboBox": QComboBox, "ctkPathLineEdit": QLineEdit,
                     "qMRMLTableView": QTableView, "qMRMLWidget": QWidget}

        def createWidget(self, class_name, parent=None, name=""):
            if class_name == "ctkSliderWidget":
                widget = QSlider(Qt.Horizontal, parent)
            elif class_name in self.STAND_INS:
                widget = self.STAND_INS[class_name](parent)
            else:
                return super().createWidget(class_name, parent, name)
            widget.setObjectName(name)
            return widget

    return LookAlikeLoader()


def deep_label_fusion_example(panel) -> None:
    """The state shown in DeepLabelFusion's screenshot: joint label fusion with an atlas folder."""
    from PySide6.QtWidgets import QComboBox, QLabel, QLineEdit, QWidget

    sys.path.insert(0, str(REPO / "DeepLabelFusion"))

    from DeepLabelFusionLib import METHODS, methodDescription

    labels = {name: module_dict_literal("DeepLabelFusion", name)
              for name in ("BACKEND_LABELS", "PRESET_LABELS", "DEVICE_LABELS")}
    examples = {"targetVolumeSelector": "case_017 T1", "referenceSegmentationSelector": "case_017 manual segmentation",
                "atlasImageSelector": "None", "atlasSegmentationSelector": "None", "mapSelector": "None",
                "outputSegmentationSelector": "Create new segmentation",
                "backendComboBox": labels["BACKEND_LABELS"]["torch"],
                "presetComboBox": labels["PRESET_LABELS"]["default"],
                "deviceComboBox": labels["DEVICE_LABELS"]["auto"]}
    for name, text in examples.items():
        panel.findChild(QComboBox, name).addItem(text)
    panel.findChild(QComboBox, "methodComboBox").addItems(list(METHODS.values()))
    panel.findChild(QComboBox, "methodComboBox").setCurrentIndex(list(METHODS).index("jlf"))
    panel.findChild(QLabel, "methodNoteLabel").setText(methodDescription("jlf"))
    panel.findChild(QLabel, "targetVolumeLabel").setText("Target volume (modality 1: MRI):")
    panel.findChild(QLineEdit, "atlasFolderPathLineEdit").setText("/data/atlases/hippocampus")
    for hidden in ("atlasPairsWidget", "modelFolderLabel", "modelFolderPathLineEdit", "progressBar",
                   "extraModality1Label", "extraModality1Selector", "extraModality2Label", "extraModality2Selector"):
        panel.findChild(QWidget, hidden).hide()


def atlasnet_example(panel) -> None:
    """The state shown in AtlasNetSeg's screenshot: a one-modality model of five networks, after a run."""
    from PySide6.QtWidgets import QComboBox, QLabel, QLineEdit, QWidget

    sys.path.insert(0, str(REPO / "AtlasNetSeg"))
    from AtlasNetSegLib import ModelInfo

    from AtlasSegLib import DEVICES

    examples = {"targetVolumeSelector": "case_017 T1", "referenceSegmentationSelector": "None",
                "mapSelector": "AtlasNet - case_017 T1 network agreement"}
    for name, text in examples.items():
        panel.findChild(QComboBox, name).addItem(text)
    panel.findChild(QComboBox, "deviceComboBox").addItems([d.upper() if d != "auto" else "Auto" for d in DEVICES])
    panel.findChild(QLineEdit, "modelFolderPathLineEdit").setText("/data/models/atlasnet-hippocampus")
    model = ModelInfo(Path("atlasnet-hippocampus"), {0: "background", 1: "anterior", 2: "posterior"}, ["MRI"],
                      ["hippocampus_001", "hippocampus_017", "hippocampus_042", "hippocampus_101", "hippocampus_160"])
    panel.findChild(QLabel, "modelInfoLabel").setText(model.summary())
    panel.findChild(QLabel, "targetVolumeLabel").setText("Target volume (MRI):")
    panel.findChild(QLabel, "statusLabel").setText("Done in 41 s with 5 networks.")
    for hidden in ("extraModality1Label", "extraModality1Selector", "extraModality2Label", "extraModality2Selector",
                   "progressBar"):
        panel.findChild(QWidget, hidden).hide()


PANEL_EXAMPLES = {"DeepLabelFusion": deep_label_fusion_example, "AtlasNetSeg": atlasnet_example}


def training_example(panel) -> None:
    """The Train section in the training screenshot: a Deep Label Fusion training at epoch 13 of 20, its plot (drawn
    here with the engine's chart code, standing in for Slicer's plot view) and the engine log."""
    import numpy as np
    from PySide6.QtGui import QImage, QPixmap
    from PySide6.QtWidgets import QComboBox, QLabel, QLineEdit, QProgressBar, QPushButton, QSpinBox, QWidget

    from atlasseg.render import line_chart
    from AtlasSegLib import TRAINING_SIZES

    epochs = list(range(1, 13))
    loss = [1.21, 0.93, 0.78, 0.66, 0.58, 0.52, 0.47, 0.43, 0.40, 0.37, 0.35, 0.33]
    dice = [0.52, 0.64, 0.71, 0.75, 0.79, 0.81, 0.82, 0.84, 0.85, 0.85, 0.86, 0.86]
    for name, text in (("trainingMethodComboBox", "Deep Label Fusion"),
                       ("trainingSizeComboBox", TRAINING_SIZES["standard"].label),
                       ("trainingDeviceComboBox", "Auto (GPU when available)")):
        panel.findChild(QComboBox, name).addItem(text)
    panel.findChild(QComboBox, "trainingMethodComboBox").setEnabled(False)   # one trainable method here
    panel.findChild(QLabel, "trainingSizeNoteLabel").setText(TRAINING_SIZES["standard"].noteFor("dlf"))
    panel.findChild(QLineEdit, "trainingAtlasFolderPathLineEdit").setText("/data/atlases/hippocampus")
    panel.findChild(QLineEdit, "trainingModelFolderPathLineEdit").setText("/data/models/dlf-hippocampus")
    panel.findChild(QSpinBox, "trainingEpochsSpinBox").setValue(20)
    panel.findChild(QLabel, "trainingFolderNoteLabel").setText(
        "Training into this folder: the model there is updated after every epoch.")
    panel.findChild(QPushButton, "trainButton").setText("Cancel training")
    panel.findChild(QPushButton, "trainButton").setEnabled(True)
    panel.findChild(QProgressBar, "trainingProgressBar").setValue(628)
    panel.findChild(QLabel, "trainingStatusLabel").setText(
        f"epoch 13/20 loss 0.3262 (last epoch 12: loss {loss[-1]:.3f}, validation Dice {dice[-1]:.3f})")
    rgb = np.ascontiguousarray(line_chart([(epochs, loss, (220, 30, 30), "training loss"),
                                           (epochs, dice, (30, 80, 220), "validation Dice")], 400, 220,
                                          title="Deep Label Fusion training - dlf-hippocampus", xlabel="epoch",
                                          ylabel="loss / Dice", xmax=13, title_scale=1))
    plot = QLabel()
    plot.setPixmap(QPixmap.fromImage(QImage(rgb.data, rgb.shape[1], rgb.shape[0], 3 * rgb.shape[1],
                                            QImage.Format_RGB888).copy()))
    panel.findChild(QWidget, "trainingPlotContainer").layout().addWidget(plot)
    for hidden in ("progressBar", "modelFolderLabel", "modelFolderPathLineEdit", "atlasPairsWidget",
                   "extraModality1Label", "extraModality1Selector", "extraModality2Label", "extraModality2Selector"):
        panel.findChild(QWidget, hidden).hide()


TRAINING_SCREENSHOT_SECTIONS = {"trainCollapsibleButton"}   # shown open in the training screenshot; others closed


def training_screenshot(module: str = "DeepLabelFusion") -> Path:
    return REPO / module / "Resources" / "Screenshots" / f"{module}_training.png"


def render_panel(module: str, png: Path, example=None, openSections: set[str] | None = None) -> tuple[int, int]:
    """Render the module panel, Slicer widgets replaced by look-alike Qt widgets and an example state filled in
    (``example``: the module's panel example by default); ``openSections``: the collapsible sections shown open
    (default: as the .ui has them)."""
    qt_app()
    from PySide6.QtCore import Qt
    from PySide6.QtWidgets import QGroupBox, QSlider, QWidget

    panel = load_ui(ui_file(module), look_alike_loader())
    for box in panel.findChildren(QGroupBox):
        if box.property("text") is None:   # a real group box, not a collapsible section's stand-in
            continue
        collapsed = bool(box.property("collapsed")) if openSections is None else \
            box.objectName() not in openSections
        box.setTitle(("\u25b8 " if collapsed else "\u25be ") + str(box.property("text") or ""))
        if collapsed:   # as Slicer shows it: the title only
            for child in box.findChildren(QWidget, options=Qt.FindDirectChildrenOnly):
                child.hide()
            box.setFlat(True)
            box.setFixedHeight(box.fontMetrics().height() + 4)
    (example or PANEL_EXAMPLES[module])(panel)
    panel.findChild(QWidget, "applyButton").setEnabled(True)
    slider = panel.findChild(QSlider, "mapOpacitySlider")   # the .ui's 0..1 range, in hundredths
    slider.setRange(0, 100)
    slider.setValue(50)
    panel.resize(440, panel.sizeHint().height() + 40)
    image = panel.grab().toImage()
    png.parent.mkdir(parents=True, exist_ok=True)
    assert image.save(str(png)), png
    return image.width(), image.height()


MIN_PANEL_HEIGHT = {"DeepLabelFusion": 500, "AtlasNetSeg": 350}


@pytest.mark.parametrize("module", MODULES_WITH_GUI)
def test_panel_renders_to_png(module, tmp_path):
    png = tmp_path / f"{module}_panel.png"
    width, height = render_panel(module, png)
    from PySide6.QtGui import QImage

    image = QImage(str(png))
    assert (image.width(), image.height()) == (width, height)
    assert width >= 400 and height >= MIN_PANEL_HEIGHT[module]
    colours = {image.pixel(x, y) for x in range(0, width, 7) for y in range(0, height, 7)}
    assert len(colours) > 20, "the rendering is blank"
    assert screenshot(module).is_file(), "commit a rendering: python Testing/test_slicer_static.py"


def test_training_panel_renders_to_png(tmp_path):
    """The Train section open during a training: every other section closed, the plot and progress shown."""
    png = tmp_path / "training.png"
    width, height = render_panel("DeepLabelFusion", png, training_example, TRAINING_SCREENSHOT_SECTIONS)
    from PySide6.QtGui import QImage

    image = QImage(str(png))
    assert (image.width(), image.height()) == (width, height) and width >= 400 and height >= 450
    colours = {image.pixel(x, y) for x in range(0, width, 5) for y in range(0, height, 5)}
    assert len(colours) > 20, "the rendering is blank"
    assert training_screenshot().is_file(), "commit a rendering: python Testing/test_slicer_static.py"


if __name__ == "__main__":   # python Testing/test_slicer_static.py [MODULE ...]: rewrite the screenshots
    sys.path.insert(0, str(REPO))
    for name in sys.argv[1:] or MODULES_WITH_GUI:
        print(render_panel(name, screenshot(name)), screenshot(name))
        if name == "DeepLabelFusion":
            print(render_panel(name, training_screenshot(), training_example, TRAINING_SCREENSHOT_SECTIONS),
                  training_screenshot())


def test_module_method_backend_and_preset_lists_come_from_the_engine_registry():
    """The panel offers exactly the registry's atlas-based methods (with their labels), backends and presets."""
    from atlasseg import methods

    sys.path.insert(0, str(REPO / "DeepLabelFusion"))
    from DeepLabelFusionLib import BACKENDS, METHODS, PRESETS

    expected = {name: m.label for name, m in methods.METHODS.items() if m.slicer_module == "DeepLabelFusion"}
    assert METHODS == expected and list(METHODS) == ["majority", "weighted", "jlf", "staple", "dlf"]
    assert BACKENDS == methods.BACKENDS and PRESETS == methods.REGISTRATION_PRESETS


def test_atlasnet_module_lists_come_from_the_engine_registry():
    """AtlasNetSeg offers the registry's methods for it (AtlasNet) and the shared device choices."""
    from atlasseg import methods

    sys.path.insert(0, str(REPO / "AtlasNetSeg"))
    from AtlasNetSegLib import METHODS

    from AtlasSegLib import DEVICES

    assert METHODS == {n: m.label for n, m in methods.METHODS.items() if m.slicer_module == "AtlasNetSeg"}
    assert list(METHODS) == ["atlasnet"] and list(DEVICES) == ["auto", "cpu", "gpu"]
