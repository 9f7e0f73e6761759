"""dist_train: distributed training of a profile->frontal face-embedding Transformer."""

__version__ = "0.1.0"
