"""Benchmarks (separate commands, not tests; results into BENCHMARKS.md): protocols written once
(:mod:`.protocols`), one report writer (:mod:`.report`), a runner per method family: :mod:`.classic`
(registration + label fusion), :mod:`.dlf` (Deep Label Fusion), :mod:`.backbones` (segmentation backbones),
:mod:`.instances` (Res-UNet instance segmentation on phantoms), :mod:`.atlasnet` (AtlasNet against a single network)."""
