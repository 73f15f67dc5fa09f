"""One report writer for every benchmark: machine and commit, the command line, per-target differences, and the
marked section of BENCHMARKS.md that a run replaces."""

from __future__ import annotations

import os
import platform
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..memory import PeakMemory  # noqa: F401  (re-exported: benchmarks measure peak memory with it)


def machine_description() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {gpu}; torch {torch.__version__}"


def git_commit(folder: Path | None = None) -> str:
    """Short commit of the checkout holding this code (``+ uncommitted`` when the tracked files differ)."""
    cwd = folder or Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=cwd).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=cwd).stdout.strip()
        return sha + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def command_line(default: str) -> str:
    """The command as typed (``atlasseg ...``), or ``default`` when called from Python."""
    if sys.argv and sys.argv[0].endswith(("atlasseg", "__main__.py")):
        return "atlasseg " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    return default


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, int, int]:
    """Per-target ``a - b``: (mean, standard error, targets where a > b, targets)."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    d = d[np.isfinite(d)]
    if not len(d):
        return float("nan"), float("nan"), 0, 0
    se = float(np.std(d, ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    return float(d.mean()), se, int((d > 0).sum()), len(d)


def format_difference(a: Sequence[float], b: Sequence[float], what: str) -> str:
    mean, se, wins, n = paired_difference(a, b)
    return f"{what}: {mean:+.4f} +- {se:.4f} (SE); better on {wins} of {n} targets"


def update_markdown(path: Path, key: str, title: str, body: str) -> None:
    """Replace (or append) the section between ``<!-- key:start -->`` and ``<!-- key:end -->``."""
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    block = f"<!-- {key}:start -->\n## {title}\n\n{body}<!-- {key}:end -->"
    pattern = re.compile(rf"<!-- {key}:start -->.*?<!-- {key}:end -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the finite values (NaN when there are none; SE NaN for one value)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if not len(v):
        return float("nan"), float("nan")
    return float(v.mean()), float(np.std(v, ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")


def target_status(ok: bool | None) -> str:
    """A target's column from the numbers: ``met``, ``NOT met``, or ``not measured`` (None: a peer was skipped or
    a number is NaN)."""
    return "not measured" if ok is None else ("met" if ok else "NOT met")
