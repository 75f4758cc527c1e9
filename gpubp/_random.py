"""A counter-based random generator for dropout masks: the same bits on every backend.

The mask of element i (row-major) of a layer's input is drawn from the splitmix64
finaliser of ``key + i * golden`` (mod 2^64): its top 24 bits u keep the element when
u >= ceil(p * 2^24), so P(keep) = 1 - ceil(p 2^24) / 2^24 (1 - p to within 6e-8). The
key mixes (model seed, epoch, step, layer index). Integer arithmetic mod 2^64 only, so
NumPy, CuPy and any kernel give the same mask whatever the launch shape or thread count,
and a step can be replayed from its key alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


def _mix64(z: int) -> int:
    """The splitmix64 finaliser on a Python int (mod 2^64)."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def dropout_key(seed: int, epoch: int, step: int, layer: int) -> int:
    """One 64-bit key per (seed, epoch, step, layer)."""
    k = _mix64(int(seed) + _GOLDEN)
    for v in (epoch, step, layer):
        k = _mix64(k ^ (int(v) + _GOLDEN))
    return k


def offset_key(key: int, elements: int) -> int:
    """The key whose mask starts at element ``elements`` of ``key``'s: element i of it is element
    i + elements of the other (the counter is i golden + key), so rows r0.. of a batch, taken
    alone (a rank's share, a micro-batch), get the whole batch's mask."""
    return (int(key) + int(elements) * _GOLDEN) & _MASK64


def dropout_keep(xp: Any, key: Any, shape: tuple[int, ...], p: float) -> Any:
    """Boolean keep-mask of ``shape`` (True with probability 1 - p), an array of ``xp`` (numpy, cupy).

    ``key``: an int, or a 1-element uint64 array of ``xp`` holding it (a key kept on the device, read
    when the work runs: a recorded step's); the same mask bit for bit."""
    n = int(np.prod(shape, dtype=np.int64))
    u64 = xp.uint64
    if getattr(key, "ndim", 0) == 1:
        if key.dtype != np.uint64 or key.shape != (1,):
            raise ValueError(f"key: expected an int or a 1-element uint64 array, got {key.dtype} {key.shape}")
        k = key  # broadcast: the same wrapping uint64 add as with a scalar
    else:
        k = u64(key)
    z = xp.arange(n, dtype=u64) * u64(_GOLDEN) + k  # wraps mod 2^64
    z = (z ^ (z >> u64(30))) * u64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> u64(27))) * u64(0x94D049BB133111EB)
    z = z ^ (z >> u64(31))
    threshold = int(np.ceil(p * (1 << 24)))
    return ((z >> u64(40)) >= u64(threshold)).reshape(shape)
