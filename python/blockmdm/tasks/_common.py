"""Helpers shared by the tasks: argument checks, reading line files, and the on-disk cache.

Generated datasets are cached keyed by task, parameters, size and seed, under ``cache_dir``
when given, else ``$BLOCKMDM_CACHE_DIR``, else ``~/.cache/blockmdm``. Files are written to a
temporary name and renamed, so a crashed or concurrent writer never leaves half a file behind.

The generators draw from :class:`Stream`, a splitmix64 stream with one :func:`key` per example
(seed, parameters, index): examples are independent of each other (so they can be made in
parallel) and the native task engines (csrc/tasks.cpp) reproduce them exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable

# 2: every example drawn from its own splitmix64 stream (the native engines' algorithm)
FORMAT_VERSION = 2

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _fmix(z: int) -> int:
    z = ((z ^ (z >> 30)) * _MIX1) & _M64
    z = ((z ^ (z >> 27)) * _MIX2) & _M64
    return z ^ (z >> 31)


def key(*words: int) -> int:
    """A 64-bit stream key hashed from non-negative ints (taken mod 2^64)."""
    h = 0
    for w in words:
        h = _fmix(((h ^ (w & _M64)) + _GOLDEN) & _M64)
    return h


class Stream:
    """splitmix64: the state advances by the golden ratio and each output is its mix."""

    __slots__ = ("state",)

    def __init__(self, state: int):
        self.state = state & _M64

    def next(self) -> int:
        self.state = (self.state + _GOLDEN) & _M64
        return _fmix(self.state)

    def below(self, n: int) -> int:
        """An int in [0, n) (next() mod n: the bias is below 2^-50 for the n used here)."""
        return self.next() % n

    def shuffle(self, items: list) -> None:
        """Fisher-Yates from the back, in place."""
        for i in range(len(items) - 1, 0, -1):
            j = self.below(i + 1)
            items[i], items[j] = items[j], items[i]


def check_int(name: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def read_lines(path, check: Callable[[str], str]) -> list:
    """Non-blank stripped lines of the text file ``path``; ValueError naming the file, the line
    number and the reason when ``check(line)`` returns one."""
    lines = []
    with open(Path(path)) as f:
        for number, raw in enumerate(f, 1):
            line = raw.strip()
            if not line:
                continue
            reason = check(line)
            if reason:
                raise ValueError(f"{path}:{number}: {reason}")
            lines.append(line)
    return lines


def cache_root(cache_dir=None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("BLOCKMDM_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "blockmdm"


def cache_path(task: str, params: dict, n: int, seed: int, suffix: str, cache_dir=None) -> Path:
    key = json.dumps({"v": FORMAT_VERSION, **params}, sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return cache_root(cache_dir) / f"{task}_n{n}_seed{seed}_{digest}{suffix}"


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Writes through ``write(tmp_path)``; an unwritable cache only warns (the data is there)."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        os.close(fd)
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        warnings.warn(f"blockmdm: could not cache {path}: {err}", stacklevel=3)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def cached_lines(task, params, n, seed, make: Callable[[], list], cache_dir=None, cache=True):
    """Returns ``make()`` (a list of str), read from / written to the cache when ``cache``."""
    if not cache:
        return make()
    path = cache_path(task, params, n, seed, ".txt", cache_dir)
    if path.exists():
        lines = path.read_text().splitlines()
        if len(lines) == n:
            return lines
    lines = make()

    def write(tmp):
        with open(tmp, "w") as f:
            f.write("".join(line + "\n" for line in lines))

    _atomic_write(path, write)
    return lines


def cached_tensors(task, params, n, seed, make: Callable[[], dict], cache_dir=None, cache=True):
    """Returns ``make()`` (a dict of tensors and ints), cached as a torch file when ``cache``."""
    import torch

    if not cache:
        return make()
    path = cache_path(task, params, n, seed, ".pt", cache_dir)
    if path.exists():
        return torch.load(path, weights_only=True)
    data = make()
    _atomic_write(path, lambda tmp: torch.save(data, tmp))
    return data
