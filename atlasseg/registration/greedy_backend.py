"""Reference CPU backend: PICSL Greedy through the ``picsl-greedy`` Python package.

Runs moments -> affine (12 dof) -> deformable NCC, as the Deep Label Fusion authors' ASHS pipeline does. Greedy
reports affine matrices in RAS and displacement fields in LPS; its deformable result composes as
``F(x) = A(x + u(x))``, the same form as the torch backend, so both return identical field objects.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import SimpleITK as sitk
import torch

from ..io import Geometry
from .transforms import DisplacementField, fields_from_affine_and_displacement, scales_within

RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class GreedySettings:
    iterations: str = "100x50x10"
    affine_iterations: str = "100x50x10"
    metric: str = "NCC 2x2x2"
    sigmas: str = "2vox 1vox"
    moments: int = 1
    affine: bool = True
    deformable: bool = True
    threads: int = 0  # 0: greedy's default (all cores)
    max_scale: float | None = None  # an affine whose scales (singular values) leave [1/max_scale, max_scale] is
                                    # replaced by a rigid one (-dof 6) from the same start (None: kept as found)


PRESETS = {
    "fast": GreedySettings(iterations="60x30", affine_iterations="60x30"),
    "default": GreedySettings(),
    "accurate": GreedySettings(iterations="200x100x50", affine_iterations="200x100x50"),
    "affine": GreedySettings(deformable=False),
}


def settings_from(preset: str = "default", **overrides) -> GreedySettings:
    if preset not in PRESETS:
        raise ValueError(f"unknown registration preset '{preset}': choose from {sorted(PRESETS)}")
    return replace(PRESETS[preset], **overrides)


def _greedy():
    try:
        from picsl_greedy import Greedy3D
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise RuntimeError("the greedy backend needs the 'picsl-greedy' package: pip install picsl-greedy") from err
    return Greedy3D()


@contextlib.contextmanager
def _quiet_stdout():
    """Greedy's C++ code prints its log straight to file descriptor 1; keep it (and show it only on failure)."""
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode="w+b") as log:
        os.dup2(log.fileno(), 1)
        try:
            yield
        except Exception:
            os.dup2(saved, 1)
            log.seek(0)
            sys.stderr.write(log.read()[-4000:].decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 1)
            os.close(saved)


def register_pair(fixed: Sequence[sitk.Image], moving: Sequence[sitk.Image], settings: GreedySettings,
                  mask: sitk.Image | None = None, device: torch.device | None = None
                  ) -> tuple[DisplacementField, DisplacementField]:
    """Register one atlas (moving) to the target (fixed); multi-channel inputs become greedy's -i pairs."""
    g = _greedy()
    log = io.StringIO()
    names: dict[str, sitk.Image | None] = {}
    pairs = []
    for c, (f, m) in enumerate(zip(fixed, moving)):
        names[f"fix{c}"] = sitk.Cast(f, sitk.sitkFloat32)
        names[f"mov{c}"] = sitk.Cast(m, sitk.sitkFloat32)
        pairs.append(f"-i fix{c} mov{c}")
    inputs = " ".join(pairs)
    threads = f" -threads {settings.threads}" if settings.threads else ""
    mask_arg = ""
    if mask is not None:
        names["fmask"] = sitk.Cast(mask, sitk.sitkFloat32)
        mask_arg = " -gm fmask"
    metric = f"-m {settings.metric}"
    init = ""
    if settings.moments:
        g.execute(f"{inputs} -moments {settings.moments} -o mom{threads}", out=log, mom=None, **names)
        init = "-ia mom"
    affine_ras = np.eye(4)
    if settings.affine:
        g.execute(f"-a -dof 12 {inputs} {init} {metric} -n {settings.affine_iterations} -o aff{threads}"
                  f"{mask_arg}", out=log, aff=None, **names)
        affine_ras = np.asarray(g["aff"], dtype=np.float64)
        if settings.max_scale is not None and not scales_within(affine_ras[:3, :3], settings.max_scale):
            g.execute(f"-a -dof 6 {inputs} {init} {metric} -n {settings.affine_iterations} -o aff{threads}"
                      f"{mask_arg}", out=log, aff=None, **names)
            affine_ras = np.asarray(g["aff"], dtype=np.float64)
        init_deform = "-it aff"
    elif settings.moments:
        affine_ras = np.asarray(g["mom"], dtype=np.float64)
        init_deform = "-it mom"
    else:
        init_deform = ""
    affine = RAS_FROM_LPS @ affine_ras @ RAS_FROM_LPS
    target_geometry = Geometry.of(fixed[0])
    if settings.deformable:
        g.execute(f"{inputs} {init_deform} {metric} -s {settings.sigmas} -n {settings.iterations} "
                  f"-o warp -oinv invwarp{threads}{mask_arg}", out=log, warp=None, invwarp=None, **names)
        u = DisplacementField.from_sitk(g["warp"]).field
        u_inv = DisplacementField.from_sitk(g["invwarp"]).field
    else:
        u = torch.zeros(3, *target_geometry.shape)
        u_inv = u.clone()
    device = device or torch.device("cpu")
    return fields_from_affine_and_displacement(affine, u.to(device), u_inv.to(device), target_geometry,
                                               Geometry.of(moving[0]))


def register_all(fixed: Sequence[sitk.Image], atlases: Sequence[Sequence[sitk.Image]], settings: GreedySettings,
                 mask: sitk.Image | None = None, progress: Callable[[float, str], None] | None = None,
                 device: torch.device | None = None) -> list[tuple[DisplacementField, DisplacementField]]:
    out = []
    for k, moving in enumerate(atlases):
        if progress is not None:
            progress(k / len(atlases), f"greedy registration {k + 1}/{len(atlases)}")
        with _quiet_stdout():
            out.append(register_pair(fixed, moving, settings, mask, device))
    return out
