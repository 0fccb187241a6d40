"""MPC-friendly nonlinearities, selected by name from registries.

Every function here is plain jax.numpy, so it runs unchanged under `jax.jit` and under SPU.
The "mpc" variants avoid the operations whose fixed-point approximations misbehave:
  * softmax "exact" (the default): x - max, exp, masked entries zeroed by a product with the
    mask; under SPU its exp (1 + z/2^8)^(2^8) is right for z >= -490 (below 2^-18 there),
    so a row's valid scores must lie within 490 of its max (no comparison spent on a clip);
  * softmax "clipped" (PUMA): subtract the row max and zero exp() below -14, where SPU's
    exp approximation is inaccurate and the true value (< 1e-6) is negligible;
  * every softmax with normalise=False: the unnormalised weights and the row reciprocal
    (Weights), which model.attention_values applies after p . V;
  * silu "poly": piecewise polynomials (Horner form on a rescaled variable so coefficients
    stay O(1) in fixed point) instead of a sigmoid, max error ~5e-4;
  * softmax "poly": as "clipped", with exp on the clipped range [-14, 0] a fitted quartic of
    x/8 raised to the 8th power (6 multiplications instead of SPU's truncation and 8
    squarings; relative error about 1e-3 down to e^-12, where SPU's is up to 25%);
  * softmax "taylor": as "clipped", with e^z = (1 + t + t^2/2)^32, t = z/32 (one product with
    public constants and 6 squarings instead of SPU's truncation and 8; max abs error 2.4e-4
    on [-14, 0], SPU's 1.1e-3);
  * silu "split": relu(x) - g(min(|x|, 9)), g(t) = t / (1 + e^t) a degree-9 polynomial: two
    comparisons and no reciprocal (SPU's sigmoid is exp + Goldschmidt division), max error
    6.4e-4;
  * rsqrt "safe": clamps the argument below at 2**-12 so the fixed-point inverse square root
    never sees a value of a few ulps.
"""

from __future__ import annotations

from typing import Callable, Dict, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

EXP_CLIP = -14.0
EXP_TAYLOR_ITERS = 8              # SPU's fxp_exp_iters (its default; protocols keep it)
EXP_ZERO = -float(2 ** EXP_TAYLOR_ITERS)   # SPU's Taylor exp is exactly 0 here
RSQRT_FLOOR = 2.0 ** -12


class Weights(NamedTuple):
    """A softmax whose normalisation is left for after p . V (every softmax here with
    normalise=False): p [..., s] unnormalised (the row max's entry is e^0 = 1, so a row sums
    to at least 1) and recip [..., 1] = 1 / row sum. (p . V) * recip is softmax . V with one
    product per output element instead of one per attended entry: under CHEETAH those
    products were 16% of a softmax's bytes (model.attention_values applies it)."""
    p: jax.Array
    recip: jax.Array


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


def softmax_exact(x: jax.Array, mask=None, axis: int = -1, row_max=None,
                  normalise: bool = True):
    """Reference softmax along `axis`; `mask` (broadcastable, bool) marks valid entries;
    `row_max`: the max over the valid entries when the caller has it (see _row_max);
    normalise=False: the unnormalised Weights instead (every softmax here takes it)."""
    x = _masked_scores(x, mask)
    p = jnp.exp(x - _row_max(x, axis, row_max))
    if mask is not None:
        p = p * mask
    return _normalise(p, axis, normalise)


def _softmax_clipped_with(exp, x, mask, axis, row_max, normalise=True):
    """softmax_clipped's body with `exp` for e^z on the clipped range [EXP_CLIP, 0]."""
    x = _masked_scores(x, mask)   # masked entries fall below the clip: no AND with mask
    z = x - _row_max(x, axis, row_max)
    keep = z > EXP_CLIP
    return _normalise(jnp.where(keep, exp(jnp.where(keep, z, EXP_CLIP)), 0.0), axis, normalise)


def softmax_clipped(x: jax.Array, mask=None, axis: int = -1, row_max=None,
                    normalise: bool = True):
    """PUMA-style softmax: exp of (x - max) clipped to zero below EXP_CLIP; `row_max` as in
    softmax_exact. One comparison and one select per entry: the entries below the clip go
    into SPU's exp as -2^EXP_TAYLOR_ITERS, where its Taylor form (1 + z/2^n)^(2^n) is exactly
    0 (as e^-256 is in float32), instead of being clipped and zeroed by a second select."""
    x = _masked_scores(x, mask)   # masked entries fall below the clip: no AND with mask
    z = x - _row_max(x, axis, row_max)
    return _normalise(jnp.exp(jnp.where(z > EXP_CLIP, z, EXP_ZERO)), axis, normalise)


def _normalise(p, axis, normalise: bool = True):
    """p / row sum, or (normalise=False) the Weights that defer it."""
    recip = _row_reciprocal(p, axis)
    return p * recip if normalise else Weights(p, recip)


def _fit_exp_base(degree: int = 4, squarings: int = 3, floor: float = 1e-5, iters: int = 100):
    """Coefficients of p(t) ~ e^t, t = z / 2^squarings, such that p(t)^(2^squarings) ~ e^z
    on [EXP_CLIP, 0] with the smallest error relative to e^z + floor (relative down to a few
    FM64 ulps; least squares reweighted by that error, Lawson-style)."""
    z = np.linspace(EXP_CLIP, 0.0, 28001)
    t = z / 2.0 ** squarings
    w = np.ones_like(t)
    for _ in range(iters):
        c = np.polynomial.polynomial.polyfit(t, np.exp(t), degree, w=w)
        got = np.polynomial.polynomial.polyval(t, c) ** (2 ** squarings)
        err = np.abs(got - np.exp(z)) / (np.exp(z) + floor)
        w = w * (1.0 + err / err.max())
    return tuple(float(v) for v in c)


EXP_SQUARINGS = 3
EXP_BASE = _fit_exp_base(squarings=EXP_SQUARINGS)


def exp_clipped_poly(z: jax.Array) -> jax.Array:
    """e^z for z in [EXP_CLIP, 0] (the caller clips): p(z/8)^8 with the fitted quartic p;
    [...] -> same shape."""
    r = _horner(z * (1.0 / 2 ** EXP_SQUARINGS), EXP_BASE)
    for _ in range(EXP_SQUARINGS):
        r = r * r
    return r


def softmax_poly(x: jax.Array, mask=None, axis: int = -1, row_max=None,
                 normalise: bool = True):
    """softmax_clipped with exp_clipped_poly for SPU's exp; `row_max`, `normalise` as in
    softmax_exact."""
    return _softmax_clipped_with(exp_clipped_poly, x, mask, axis, row_max, normalise)


# "taylor": e^z = (e^(z/2^n))^(2^n) with the base's Taylor polynomial of degree 2, t = z/2^n:
# 1 + t + t^2/2 = w^2 + 1/2, w = (t + 1)/sqrt 2, so one product with public constants and
# n + 1 squarings (SPU's own exp: a truncation and 8 squarings of 1 + z/2^8)
EXP_TAYLOR_SQUARINGS = 5
EXP_TAYLOR_FILL = -float(2 ** EXP_TAYLOR_SQUARINGS)   # t = -1: w = 0, e^z as 2^-32 (0 in FM64)


def exp_clipped_taylor(z: jax.Array) -> jax.Array:
    """e^z for z in [EXP_CLIP, 0] (max abs error 2.4e-4; SPU's 8-squaring exp 1.1e-3), or
    2^-32 at EXP_TAYLOR_FILL, where the caller sends what it drops; [...] -> same shape."""
    c = 1.0 / np.sqrt(2.0)
    w = z * (c / 2 ** EXP_TAYLOR_SQUARINGS) + c
    r = w * w + 0.5
    for _ in range(EXP_TAYLOR_SQUARINGS):
        r = r * r
    return r


def softmax_taylor(x: jax.Array, mask=None, axis: int = -1, row_max=None,
                   normalise: bool = True):
    """softmax_clipped with exp_clipped_taylor for SPU's exp (one select per entry: entries
    below the clip enter it at EXP_TAYLOR_FILL); `row_max`, `normalise` as in softmax_exact."""
    x = _masked_scores(x, mask)
    z = x - _row_max(x, axis, row_max)
    return _normalise(exp_clipped_taylor(jnp.where(z > EXP_CLIP, z, EXP_TAYLOR_FILL)), axis,
                      normalise)


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


SILU_SPLIT_AT = 9.0


def _fit_silu_tail(degree: int = 9):
    """g(t) = t / (1 + e^t) = relu(t) - silu(t) on [0, SILU_SPLIT_AT], least squares in
    u = 2 t / SILU_SPLIT_AT - 1 (coefficients O(1) in fixed point)."""
    t = np.linspace(0.0, SILU_SPLIT_AT, 20001)
    c = np.polynomial.polynomial.polyfit(2.0 * t / SILU_SPLIT_AT - 1.0, t / (1.0 + np.exp(t)),
                                         degree)
    return tuple(float(v) for v in c)


SILU_TAIL = _fit_silu_tail()


def silu_split(x: jax.Array) -> jax.Array:
    """silu(x) = relu(x) - g(|x|) (g as in _fit_silu_tail; g(|x|) < 1.1e-3 beyond the
    split, where the clamped polynomial stands in for it): one comparison for the sign, one
    for the clamp, a degree-9 Horner chain; [...] -> same shape."""
    r = jnp.where(x > 0, x, jnp.zeros_like(x))
    t = jnp.minimum(2.0 * r - x, SILU_SPLIT_AT)            # |x| clamped
    return r - _horner(t * (2.0 / SILU_SPLIT_AT) - 1.0, SILU_TAIL)


def rsqrt_exact(x: jax.Array) -> jax.Array:
    return jax.lax.rsqrt(x)


def rsqrt_safe(x: jax.Array) -> jax.Array:
    return jax.lax.rsqrt(jnp.maximum(x, RSQRT_FLOOR))


SOFTMAX: Dict[str, Callable] = {"exact": softmax_exact, "clipped": softmax_clipped,
                                 "poly": softmax_poly, "taylor": softmax_taylor}
SILU: Dict[str, Callable] = {"exact": silu_exact, "poly": silu_poly, "split": silu_split}
RSQRT: Dict[str, Callable] = {"exact": rsqrt_exact, "safe": rsqrt_safe}
