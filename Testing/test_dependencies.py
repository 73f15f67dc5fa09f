"""The engine's dependencies as Slicer installs them: Resources/requirements.txt, pyproject.toml and the torch the
modules ask the PyTorch extension for must agree, versions are checked (not only presence), and every listed
package is one the engine imports."""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # AtlasSegLib, as a source checkout provides it


def load_engine_helpers(path: Path = REPO / "AtlasSegLib" / "engine.py"):
    """AtlasSegLib/engine.py alone (standard library only), as the modules use it."""
    spec = importlib.util.spec_from_file_location(f"atlasseg_lib_engine_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module     # its dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


def pyproject_requirements() -> dict[str, Requirement]:
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    return {Requirement(r).name: Requirement(r) for r in data["project"]["dependencies"]}


def test_slicer_requirements_match_pyproject_ranges():
    engine = load_engine_helpers()
    pyproject = pyproject_requirements()
    for line in engine.engineRequirements():
        requirement = Requirement(line)
        assert requirement.name in pyproject, f"{line} is not a dependency in pyproject.toml"
        assert requirement.specifier == pyproject[requirement.name].specifier, line
        assert requirement.specifier, f"{line}: give a version range (an unbounded one drifts)"
    torch = Requirement(engine.TORCH_REQUIREMENT)
    assert {s.version for s in torch.specifier} <= {s.version for s in pyproject["torch"].specifier}


def test_monai_range_works_with_the_torch_the_modules_ask_for():
    """The installed monai (inside the required range) accepts the lowest torch the modules accept."""
    engine = load_engine_helpers()
    monai_range = next(Requirement(r) for r in engine.engineRequirements() if r.startswith("monai"))
    assert monai_range.specifier.contains(metadata.version("monai"))
    torch_needed = [Requirement(r) for r in metadata.requires("monai") if re.match(r"torch\b", r)]
    lowest_torch = min(Version(s.version) for s in Requirement(engine.TORCH_REQUIREMENT).specifier
                       if s.operator == ">=")
    assert torch_needed and all(r.specifier.contains(lowest_torch) for r in torch_needed), torch_needed


def test_every_requirement_is_imported_by_the_engine():
    engine = load_engine_helpers()
    sources = "\n".join(p.read_text() for p in (REPO / "atlasseg").rglob("*.py"))
    for line in engine.engineRequirements():
        module = Requirement(line).name.replace("-", "_")
        assert re.search(rf"^\s*(import|from) {module}\b", sources, re.M), f"{line}: the engine never imports it"
    for slicer_own in ("simpleitk", "numpy", "vtk", "torch"):
        assert all(Requirement(r).name.lower() != slicer_own for r in engine.engineRequirements())


def test_unmet_requirements_check_versions_not_just_presence():
    engine = load_engine_helpers()
    numpy_version = metadata.version("numpy")
    assert engine.unmetRequirements([f"numpy>={numpy_version}"]) == []
    assert engine.unmetRequirements(["numpy<1"]) == [f"numpy<1 (installed {numpy_version})"]
    assert engine.unmetRequirements(["no-such-package-atlasseg>=1"]) == ["no-such-package-atlasseg>=1 (not installed)"]
    assert engine.missingPipDependencies() == []      # this environment was installed from pyproject.toml


def test_requirements_are_found_installed_beside_the_library(tmp_path):
    installed = tmp_path / "qt-scripted-modules" / "AtlasSegLib"
    installed.mkdir(parents=True)
    shutil.copy(REPO / "AtlasSegLib" / "engine.py", installed / "engine.py")
    shutil.copy(REPO / "Resources" / "requirements.txt", installed / "requirements.txt")  # as CMake installs it
    engine = load_engine_helpers(installed / "engine.py")
    assert engine.requirementsPath() == installed / "requirements.txt"
    (installed / "requirements.txt").unlink()
    with pytest.raises(engine.EngineError, match="requirements.txt was not found"):
        engine.requirementsPath()


def test_reload_and_test_reports_a_skip_as_a_skip_and_runs_the_rest():
    """Slicer's Reload and Test calls runTest() directly: a skipTest must not end it as a failure."""
    import unittest

    from AtlasSegLib.selftest import runSelfTests

    ran, shown = [], []

    class ModuleTest(unittest.TestCase):
        def delayDisplay(self, message):
            shown.append(message)

        def test_needs_engine(self):
            self.skipTest("engine dependencies missing")

        def test_geometry(self):
            ran.append("geometry")

        def test_broken(self):
            raise AssertionError("real failure")

    case = ModuleTest()
    skipped = runSelfTests(case, [case.test_needs_engine, case.test_geometry], setUp=lambda: ran.append("setUp"))
    assert skipped == shown == ["test_needs_engine skipped: engine dependencies missing"]
    assert ran == ["setUp", "setUp", "geometry"]
    with pytest.raises(AssertionError, match="real failure"):   # failures still fail
        runSelfTests(case, [case.test_broken])


def test_run_seconds_is_the_engines_total_not_the_sum_of_stages():
    from AtlasSegLib.run import runSeconds

    assert runSeconds({"timings_s": {"inputs": 1.0, "registration": 6.0, "fusion": 2.0, "total": 10.9}}) == 10.9
    assert runSeconds({"timings_s": {"registration": 6.0, "fusion": 2.0}}) == 8.0     # records before "total"
    assert runSeconds({}) == 0.0
