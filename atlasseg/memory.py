"""Peak memory of long work (training runs, benchmarks): resident memory of this process, and CUDA's own peak."""

from __future__ import annotations

import os
import threading

import torch


def rss_bytes() -> int:
    """Resident memory of this process now (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


class PeakMemory:
    """Peak resident memory of this process during a block (sampled every 5 ms); ``cuda_gib`` is torch's peak
    of allocated CUDA memory in the block (0 without CUDA)."""

    def __enter__(self):
        self.peak = rss_bytes()
        self.cuda_peak = 0
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        if torch.cuda.is_available():
            self.cuda_peak = torch.cuda.max_memory_allocated()

    @property
    def gib(self) -> float:
        return self.peak / 2 ** 30

    @property
    def cuda_gib(self) -> float:
        return self.cuda_peak / 2 ** 30
