"""atlasseg: the headless engine of the SlicerAtlasSeg extension (atlas sets, registration, label fusion,
metrics, deep atlas-based segmentation). It never imports Slicer or Qt."""

__version__ = "0.1.0"
