"""Deep Label Fusion as a method of the registry (:mod:`atlasseg.methods`): train, build, segment."""

from __future__ import annotations

from .inference import segment_dlf as segment_method
from .networks import build_model
from .train import train as _train

__all__ = ["build_model", "segment_method", "train_method"]


def train_method(atlas_set, output, architecture, training, *, device="auto", resume=False, cache_dir=None,
                 train_ids=None, log=print, show_progress=True):
    """Train DLF (see :func:`atlasseg.dlf.train.train`)."""
    return _train(atlas_set, output, architecture, training, cache_dir, device, resume, train_ids, log, show_progress)
