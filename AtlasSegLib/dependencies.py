"""First-use installation of what the engine needs, shared by every AtlasSeg module.

Only :func:`ensureEngineDependencies` needs Slicer (``slicer.util`` dialogs, ``pip_install`` and the PyTorch
extension's ``PyTorchUtils``); it imports them when called, so this file also imports where only slicer-core is
installed (tests), which has neither.
"""

from __future__ import annotations

from .engine import (
    TORCH_REQUIREMENT,
    engineRequirements,
    findEngineRoot,
    missingPipDependencies,
    requirementsPath,
    torchIsInstalled,
    unmetRequirements,
)


def ensureEngineDependencies(moduleTitle: str, askConfirmation: bool = True) -> bool:
    """Install torch (PyTorch extension) and the engine's pip requirements on first use, with confirmation.

    Versions are checked, not only presence. Where Slicer has ``slicer.packaging`` (preview builds since 2026) its
    ``pip_ensure`` checks, asks, installs with progress and offers a restart; older Slicer gets
    ``slicer.util.pip_install`` with ``--no-deps``, which is safe because every requirement's range is checked
    here and their own dependencies (torch, numpy) are already Slicer's. SimpleITK, numpy and vtk are never
    installed. ``moduleTitle`` names the module in the dialogs, so the user knows which panel asks.
    """
    import slicer

    findEngineRoot()    # a broken installation is reported before anything is downloaded
    if not torchIsInstalled() and not _installTorch(moduleTitle, askConfirmation):
        return False
    wrongTorch = unmetRequirements([TORCH_REQUIREMENT])
    if wrongTorch:
        slicer.util.errorDisplay(f"{moduleTitle} needs {wrongTorch[0]}: update torch in the PyTorch Utils module "
                                 "and restart Slicer.")
        return False
    missing = missingPipDependencies()
    if not missing:
        return True
    packaging = getattr(slicer, "packaging", None)
    if packaging is not None and hasattr(packaging, "pip_ensure"):
        packaging.pip_ensure(packaging.load_requirements(str(requirementsPath())), requester=moduleTitle)
    else:
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                f"{moduleTitle} needs these Python packages, which will be downloaded and installed now:\n"
                + "\n".join(missing), "Install dependencies"):
            return False
        with slicer.util.WaitCursor():
            slicer.util.pip_install(["--no-deps", *engineRequirements()])
    still = missingPipDependencies()
    if still:
        slicer.util.errorDisplay(f"Could not install {', '.join(still)}; see the Python console.")
    return not still


def _installTorch(moduleTitle: str, askConfirmation: bool) -> bool:
    """torch through the PyTorch extension, which picks the build that fits the computer's GPU."""
    import slicer

    try:
        import PyTorchUtils
    except ImportError:
        slicer.util.errorDisplay(f"{moduleTitle} needs the PyTorch extension: install 'PyTorch' from the "
                                 "Extensions Manager and restart Slicer.")
        return False
    installed = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=askConfirmation,
                                                            torchVersionRequirement=TORCH_REQUIREMENT)
    return installed is not None
