"""The parts of ``equiseg_wsi.pretrain``: options, views and augmentation, losses, the network, checkpoints and
outputs, one module each; :mod:`equiseg_wsi.pretrain` runs the loop and is the import point."""
