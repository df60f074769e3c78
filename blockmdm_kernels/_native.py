"""Loads the optional native CPU extension ``blockmdm_kernels._C``.

``available()`` says whether it loaded and ``why_not()`` why it did not; ops use the extension
when it is there and their pure-torch CPU path otherwise.
"""

_C = None
_error = None

try:
    from blockmdm_kernels import _C  # type: ignore[attr-defined, no-redef]
except ImportError as err:  # built without csrc/ or without a compiler
    _error = f"native extension not built: {err}"


def available() -> bool:
    return _C is not None


def why_not() -> str:
    return "" if _C is not None else _error


def ops():
    """The extension module; raises RuntimeError (with the reason) when it is not built."""
    if _C is None:
        raise RuntimeError(_error)
    return _C
