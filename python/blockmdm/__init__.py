"""blockmdm: the model layer (Transformer, families, tasks, training, decoding) over
blockmdm_kernels."""

__version__ = "0.1.0"
