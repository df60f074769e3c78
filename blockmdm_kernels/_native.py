"""Loads the optional native CPU extension ``blockmdm_kernels._C``.

``available()`` says whether it loaded and ``why_not()`` why it did not; ops use the extension
for CPU tensors when it is there and their pure-torch CPU path otherwise. ``BLOCKMDM_NO_NATIVE=1``
(read once, at import) leaves it unloaded, so the fallback paths can be run and tested on a
machine that has it. A build that is missing or fails to load warns once, saying why, and never
makes the import fail.
"""

import importlib.util
import os
import warnings

import torch  # noqa: F401 - loads the libtorch libraries the extension links against

_C = None
_error = None

if os.environ.get("BLOCKMDM_NO_NATIVE", "").strip().lower() in ("1", "true", "yes", "on"):
    _error = "native extension disabled by BLOCKMDM_NO_NATIVE=1"
elif importlib.util.find_spec("blockmdm_kernels._C") is None:
    # A source tree on the path, or an install without a compiler: nothing to load.
    _error = ("native extension not built (`pip install --no-build-isolation -e .` or "
              "`python setup.py build_ext --inplace` builds it); using the pure-torch CPU paths")
    warnings.warn(f"blockmdm_kernels: {_error}", RuntimeWarning, stacklevel=2)
else:
    try:
        from blockmdm_kernels import _C  # type: ignore[attr-defined, no-redef]
    except (ImportError, OSError) as err:  # built against another torch or python
        _error = f"native extension not loaded ({err}); using the pure-torch CPU paths"
        warnings.warn(f"blockmdm_kernels: {_error}", RuntimeWarning, stacklevel=2)


def available() -> bool:
    return _C is not None


def why_not() -> str:
    return "" if _C is not None else _error


def ops():
    """The extension module; raises RuntimeError (with the reason) when it is not loaded."""
    if _C is None:
        raise RuntimeError(_error)
    return _C
