"""Progress reporting for long work: a terminal bar with ETA, or machine-readable lines for the Slicer modules.

Work is split into weighted stages (e.g. registration 70%, fusion 30%); each stage reports a fraction.
With ``ATLASSEG_PROGRESS=lines`` (set by the Slicer modules' background process) every update is printed as
``PROGRESS <0..1> <stage message>`` on stdout so a parent process can parse it.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence

ProgressFn = Callable[[float, str], None]


class Progress:
    """Overall progress over weighted stages, shown as a bar with ETA (stderr) or as parseable lines."""

    def __init__(self, stages: Sequence[tuple[str, float]], enabled: bool = True, mode: str | None = None):
        total = sum(w for _, w in stages) or 1.0
        self.stages = {name: w / total for name, w in stages}
        self.offsets, acc = {}, 0.0
        for name, _ in stages:
            self.offsets[name] = acc
            acc += self.stages[name]
        self.mode = mode or os.environ.get("ATLASSEG_PROGRESS", "bar")
        self.enabled = enabled
        self.start = time.perf_counter()
        self._last_print = 0.0
        self._last_line = ""

    def stage(self, name: str) -> ProgressFn:
        """A callback (fraction within the stage, message) for one stage."""

        def update(fraction: float, message: str = "") -> None:
            self.update(self.offsets[name] + self.stages[name] * min(max(fraction, 0.0), 1.0),
                        message or name)

        return update

    def update(self, overall: float, message: str) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.mode == "lines":
            line = f"PROGRESS {overall:.4f} {message}"
            if line != self._last_line:
                print(line, flush=True)
                self._last_line = line
            return
        if now - self._last_print < 0.2 and overall < 1.0:
            return
        self._last_print = now
        elapsed = now - self.start
        eta = elapsed * (1.0 - overall) / overall if overall > 1e-3 else float("nan")
        width = 28
        filled = int(round(width * overall))
        bar = "#" * filled + "-" * (width - filled)
        eta_text = f"ETA {eta:5.0f}s" if eta == eta else "ETA    ?s"
        sys.stderr.write(f"\r[{bar}] {overall * 100:5.1f}% {elapsed:5.0f}s {eta_text}  {message[:40]:<40}")
        sys.stderr.flush()

    def done(self, message: str = "done") -> None:
        if not self.enabled:
            return
        self._last_print = 0.0
        self.update(1.0, message)
        if self.mode != "lines":
            sys.stderr.write("\n")
            sys.stderr.flush()
