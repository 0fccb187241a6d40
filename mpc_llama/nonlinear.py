"""MPC-friendly nonlinearities, selected by name from registries.

Every function here is plain jax.numpy, so it runs unchanged under `jax.jit` and under SPU.
The "mpc" variants avoid the operations whose fixed-point approximations misbehave:
  * softmax "clipped" (PUMA): subtract the row max and zero exp() below -14, where SPU's
    exp approximation is inaccurate and the true value (< 1e-6) is negligible;
  * silu "poly": piecewise polynomials (Horner form on a rescaled variable so coefficients
    stay O(1) in fixed point) instead of a sigmoid, max error ~5e-4;
  * rsqrt "safe": clamps the argument below at 2**-12 so the fixed-point inverse square root
    never sees a value of a few ulps.
"""

from __future__ import annotations

from typing import Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np

EXP_CLIP = -14.0
RSQRT_FLOOR = 2.0 ** -12


def _masked_scores(x, mask):
    """Replaces masked-out scores by a large finite negative (fixed point has no -inf)."""
    if mask is None:
        return x
    return jnp.where(mask, x, jnp.asarray(-1e4, x.dtype))


def _row_reciprocal(p, axis):
    """1 / row sum, computed once per row: `p / sum` would make SPU divide every element
    (a reciprocal per element of the broadcast denominator: 60% of an attention block's
    bytes under ABY3)."""
    return 1.0 / jnp.sum(p, axis=axis, keepdims=True)


def _row_max(x, axis, row_max):
    """The row max along `axis`, or the caller's `row_max` (keepdims shape): a value the
    caller already holds, e.g. from a selection that compared the same scores (under MPC the
    max tree is the softmax's costliest part in message rounds). It must equal the max over
    the valid entries for the result to be the same softmax."""
    return jnp.max(x, axis=axis, keepdims=True) if row_max is None else row_max


def softmax_exact(x: jax.Array, mask=None, axis: int = -1, row_max=None) -> jax.Array:
    """Reference softmax along `axis`; `mask` (broadcastable, bool) marks valid entries;
    `row_max`: the max over the valid entries when the caller has it (see _row_max)."""
    x = _masked_scores(x, mask)
    p = jnp.exp(x - _row_max(x, axis, row_max))
    if mask is not None:
        p = p * mask
    return p * _row_reciprocal(p, axis)


def softmax_clipped(x: jax.Array, mask=None, axis: int = -1, row_max=None) -> jax.Array:
    """PUMA-style softmax: exp of (x - max) clipped to zero below EXP_CLIP; `row_max` as in
    softmax_exact."""
    x = _masked_scores(x, mask)
    z = x - _row_max(x, axis, row_max)
    keep = z > EXP_CLIP
    if mask is not None:
        keep = jnp.logical_and(keep, mask)
    p = jnp.where(keep, jnp.exp(jnp.maximum(z, EXP_CLIP)), 0.0)
    return p * _row_reciprocal(p, axis)


def silu_exact(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(x)


def _fit_silu_segments():
    """Least-squares polynomial fits of SiLU on fixed segments, in t = (x - c) / h."""
    segments = []
    for lo, hi, degree in ((-10.0, -5.0, 4), (-5.0, -1.5, 6), (-1.5, 1.5, 6), (1.5, 5.0, 6),
                           (5.0, 10.0, 4)):
        x = np.linspace(lo, hi, 4001)
        c, h = (lo + hi) / 2, (hi - lo) / 2
        y = x / (1.0 + np.exp(-x))
        coeffs = np.polynomial.polynomial.polyfit((x - c) / h, y, degree)
        segments.append((lo, hi, c, h, tuple(float(v) for v in coeffs)))
    return tuple(segments)


SILU_SEGMENTS = _fit_silu_segments()


def _horner(t, coeffs):
    acc = jnp.full_like(t, coeffs[-1])
    for a in reversed(coeffs[:-1]):
        acc = acc * t + a
    return acc


def silu_poly(x: jax.Array) -> jax.Array:
    """Piecewise-polynomial SiLU: 0 below -10, x above 10, fitted polynomials between."""
    lo_all, hi_all = SILU_SEGMENTS[0][0], SILU_SEGMENTS[-1][1]
    # Polynomials see a clamped input: on large activations (LLMs have outliers in the
    # thousands) an unclamped Horner chain overflows the fixed-point ring.
    xc = jnp.clip(x, lo_all, hi_all)
    out = jnp.where(x >= hi_all, x, jnp.zeros_like(x))
    for lo, hi, c, h, coeffs in SILU_SEGMENTS:
        inside = jnp.logical_and(x >= lo, x < hi)
        out = jnp.where(inside, _horner((xc - c) / h, coeffs), out)
    return out


def rsqrt_exact(x: jax.Array) -> jax.Array:
    return jax.lax.rsqrt(x)


def rsqrt_safe(x: jax.Array) -> jax.Array:
    return jax.lax.rsqrt(jnp.maximum(x, RSQRT_FLOOR))


SOFTMAX: Dict[str, Callable] = {"exact": softmax_exact, "clipped": softmax_clipped}
SILU: Dict[str, Callable] = {"exact": silu_exact, "poly": silu_poly}
RSQRT: Dict[str, Callable] = {"exact": rsqrt_exact, "safe": rsqrt_safe}
