"""Deep Label Fusion (Xie et al., Medical Image Analysis 2023) on the engine's registration and fusion.

Modules: :mod:`.networks` (config, subnets from :mod:`atlasseg.networks`, the DLF model), :mod:`.train` (DLF's
hooks on :class:`atlasseg.training.Trainer`, with :class:`atlasseg.cache.RegistrationCache`), :mod:`.inference`
(sliding-window segmentation of a target) and :mod:`.method` (its entry in :mod:`atlasseg.methods`). Model
folders: :mod:`atlasseg.model_io`; benchmarks: :mod:`atlasseg.benchmarks.dlf`; the plain U-Net baseline is the
``segmenter`` method (:mod:`atlasseg.segmenter`).

>>> from atlasseg.dlf.train import train, TrainConfig
>>> train(atlas_set, "model_folder", config=TrainConfig(epochs=20, n_atlases=5))
>>> from atlasseg.dlf.inference import segment_dlf
>>> segment_dlf(target_images, atlas_set, "model_folder").save("out", maps=True)
"""
