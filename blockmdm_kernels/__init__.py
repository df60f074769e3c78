"""blockmdm_kernels: fused kernels for masked diffusion language models with blockwise masks.

    import blockmdm_kernels as bk
    from blockmdm_kernels import masks

    o = bk.block_attention(q, k, v, masks.block_causal(16, prefix=82))
    loss = bk.linear_masked_cross_entropy(hidden, weight, targets, weights)
    tokens, committed, conf = bk.denoise_step(logits, tokens, active, mask_id=m, k=2)
    h = bk.rms_norm(x, weight, eps)
    q = bk.rope(q, cos, sin)
    y = bk.swiglu(w1(x), w3(x))
"""

from blockmdm_kernels import _native, masks
from blockmdm_kernels.attention import block_attention
from blockmdm_kernels.cross_entropy import linear_masked_cross_entropy, masked_cross_entropy
from blockmdm_kernels.denoise import denoise_step
from blockmdm_kernels.rms_norm import rms_norm
from blockmdm_kernels.rope import rope
from blockmdm_kernels.swiglu import swiglu

__version__ = "0.1.0"


def native_available() -> bool:
    """True when the native CPU extension is loaded (CPU tensors then take its kernels).

    False when it was not built, failed to load, or ``BLOCKMDM_NO_NATIVE=1`` is set;
    the error :func:`native_ops` raises then says which.
    """
    return _native.available()


def native_ops():
    """The native extension module: its kernels and the task engines ``star_graphs``,
    ``sudoku_generate``, ``sudoku_count`` and ``sudoku_valid`` that ``blockmdm.tasks`` calls.

    Raises:
        RuntimeError: when it is not loaded, saying why (see :func:`native_available`).
    """
    return _native.ops()


__all__ = [
    "masks",
    "block_attention",
    "linear_masked_cross_entropy",
    "masked_cross_entropy",
    "denoise_step",
    "rms_norm",
    "rope",
    "swiglu",
    "native_available",
    "native_ops",
    "__version__",
]
