"""Deep Label Fusion (Xie et al., Medical Image Analysis 2023) on the engine's registration and fusion.

Modules: :mod:`.networks` (config, subnets, the DLF model and the plain U-Net baseline), :mod:`.losses`,
:mod:`.data` (registration cache, atlas draws, patches, augmentation), :mod:`.train` (training loop, checkpoints,
resume, log and curves), :mod:`.model_io` (self-describing model folders), :mod:`.inference` (sliding-window
segmentation of a target) and :mod:`.benchmark` (the DLF benchmark commands).

>>> from atlasseg.dlf.train import train, TrainConfig
>>> train(atlas_set, "model_folder", config=TrainConfig(epochs=20, n_atlases=5))
>>> from atlasseg.dlf.inference import segment_dlf
>>> segment_dlf(target_images, atlas_set, "model_folder").save("out", maps=True)
"""
