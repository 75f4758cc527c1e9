"""Test oracles for the fused CUDA C kernels: float64 references of what they compute, with the
error each result may carry, from the accuracy contract (``gpubp.accuracy``).

Shared by the host-emulation and GPU tests and by ``gpubp kernels bench``'s correctness gate:

    expected_forward(x, w, b, act)             z, a in float64 and the bound of each
    expected_backward(x, w, da, act, kept)     dW, db, dx in float64 and the bound of each,
                                               from what the forward kernel saved (reference_dz)
    unpack_mask(mask, out)                     the relu / leaky_relu bit mask as booleans

Bounds: z is a (K + 1)-long float32 dot product (:func:`gpubp.accuracy.dot_error_bound`); a adds
the activation's own float32 error (:func:`gpubp.accuracy.activation_bound`) to z's error times
a bound of |f'|; dz's error from the activation is summed through the backward GEMMs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpubp.accuracy import activation_bound, dot_error_bound
from gpubp.activations import Activation

__all__ = ["unpack_mask", "reference_dz", "lipschitz", "expected_forward", "expected_backward"]

TINY = 1e-30  # keeps a bound positive where the reference is exactly 0


def unpack_mask(mask: np.ndarray, n_out: int) -> np.ndarray:
    """(N, ceil(out / 32)) uint32 words -> (N, out) booleans: bit j % 32 of word j / 32 is z[:, j] > 0."""
    bits = (np.asarray(mask)[:, :, None] >> np.arange(32, dtype=np.uint32)) & 1
    return bits.reshape(mask.shape[0], -1)[:, :n_out].astype(bool)


def reference_dz(act: Activation, da: np.ndarray, kept: np.ndarray | None) -> np.ndarray:
    """float64 dz = da * f'(.) on the host from what the forward kernel saved (z, a or the mask).

    For checking the backward kernels without inheriting the forward pass's rounding of z near
    a kink (relu at 0).
    """
    da = np.asarray(da, dtype=np.float64)
    if kept is None:
        return act.backward(da, None, None)
    kept = np.asarray(kept)
    if kept.dtype == np.uint32:
        return np.where(unpack_mask(kept, da.shape[1]), da, da * act.params.get("slope", 0.0))
    k64 = kept.astype(np.float64)
    return act.backward(da, k64 if act.saves == "z" else None, k64 if act.saves == "a" else None)


def lipschitz(act: Activation) -> float:
    """An upper bound of |f'| (how much an error in z can grow in a)."""
    p = act.params
    return max(1.2, abs(p.get("slope", 0.0)), p.get("alpha", 0.0))


def expected_forward(x: Any, w: Any, b: Any, act: Activation) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"z": (z, bound), "a": (a, bound)} in float64 for x (N, in), w (in, out), b (out,)."""
    x64, w64, b64 = (np.asarray(t, dtype=np.float64) for t in (x, w, b))
    z = x64 @ w64 + b64
    bound_z = dot_error_bound(np.abs(x64) @ np.abs(w64) + np.abs(b64), x64.shape[1] + 1) + TINY
    a = act.forward(z)
    bound_a = lipschitz(act) * bound_z + activation_bound(a, z)
    return {"z": (z, bound_z), "a": (a, bound_a)}


def expected_backward(
    x: Any, w: Any, da: Any, act: Activation, kept: Any
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"dz", "dW", "db", "dx": (value, bound)} in float64, dz from what the forward kernel saved."""
    x64, w64, da64 = (np.asarray(t, dtype=np.float64) for t in (x, w, da))
    n, n_out = da64.shape
    dz = reference_dz(act, da64, kept)
    # error of dz itself (formed in float32), then K-long sums of it
    zmag: Any = 1.0
    if act.saves == "z" and kept is not None and np.asarray(kept).dtype == np.float32:  # z, not the mask
        zmag = np.abs(np.asarray(kept, dtype=np.float64))
    dz_err = activation_bound(dz, zmag, da64)
    adz, ax, aw = np.abs(dz), np.abs(x64), np.abs(w64).T
    return {
        "dz": (dz, dz_err),
        "dW": (x64.T @ dz, dot_error_bound(ax.T @ adz, n) + ax.T @ dz_err + TINY),
        "db": (dz.sum(axis=0), dot_error_bound(adz.sum(axis=0), n) + dz_err.sum(axis=0) + TINY),
        "dx": (dz @ w64.T, dot_error_bound(adz @ aw, n_out) + dz_err @ aw + TINY),
    }
