"""First-use installation of what the engine needs, shared by every AtlasSeg module.

Only :func:`ensureEngineDependencies` needs Slicer (``slicer.util`` dialogs, ``pip_install`` and the PyTorch
extension's ``PyTorchUtils``); it imports them when called, so this file also imports where only slicer-core is
installed (tests), which has neither.
"""

from __future__ import annotations

from .engine import TORCH_REQUIREMENT, findEngineRoot, missingPipDependencies, torchIsInstalled


def ensureEngineDependencies(moduleTitle: str, askConfirmation: bool = True) -> bool:
    """Install torch (PyTorch extension) and the engine's pip packages on first use, with confirmation.

    SimpleITK, numpy and vtk are Slicer's own and never installed; pip packages go in without their
    dependencies so that nothing of Slicer's is replaced. ``moduleTitle`` names the module in the dialogs, so
    the user knows which panel asks. Returns whether everything is there now.
    """
    import slicer

    findEngineRoot()    # a broken installation is reported before anything is downloaded
    if not torchIsInstalled() and not _installTorch(moduleTitle, askConfirmation):
        return False
    missing = missingPipDependencies()
    if not missing:
        return True
    if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            f"{moduleTitle} needs these Python packages, which will be downloaded and installed now:\n"
            + "\n".join(missing), "Install dependencies"):
        return False
    with slicer.util.WaitCursor():
        slicer.util.pip_install(["--no-deps", *missing])
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
