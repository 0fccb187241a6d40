"""Forced entries as public slices: the sink (the first `sink` cache entries) and the window
(the last `window` entries, the current one included), attended next to the chosen clusters.

Where they lie depends on the cache length only, which is public, so taking them out of a
row of scores (or keys, values) and putting probabilities back are public slices and
zero-padding: local under MPC, no one-hot row, no comparison. The window has a fixed public
width, so it holds the same number of valid entries at every step (a forced CURRENT CLUSTER
holds 1 entry right after a prompt that fills whole clusters, and its slot is mostly empty).
Chosen clusters never overlap a slice (`candidates`), so no entry is attended twice.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from eviction.topk import BIG


@dataclasses.dataclass(frozen=True)
class Spans:
    """Widths of the forced slices (public): sink = entries [0, sink), window = the last
    `window` entries [length - window, length)."""
    sink: int
    window: int

    @property
    def width(self) -> int:
        return self.sink + self.window


def window_start(length, capacity: int, spans: Spans):
    """First position of the window's slice (public scalar): length - window, clamped into
    the cache (short caches: the window's slice then starts at 0 and `valid` masks it)."""
    return jnp.clip(length - spans.window, 0, capacity - spans.window)


def valid(length, capacity: int, spans: Spans) -> jax.Array:
    """bool [sink + window]: which slice entries are attended (public): sink entries below
    `length`; window entries at or after length - window, below length, and not in the sink
    (a short cache's window would repeat sink entries)."""
    pos = window_start(length, capacity, spans) + jnp.arange(spans.window)
    win = (pos >= spans.sink) & (pos < length) & (pos >= length - spans.window)
    return jnp.concatenate([jnp.arange(spans.sink) < length, win])


def take(x: jax.Array, length, spans: Spans, axis: int = -1) -> jax.Array:
    """The sink and window slices of x along `axis` (x's length there: the cache capacity),
    concatenated: [..., sink + window, ...]."""
    axis = axis % x.ndim
    cap = x.shape[axis]
    sink = jax.lax.slice_in_dim(x, 0, spans.sink, axis=axis)
    win = jax.lax.dynamic_slice_in_dim(x, window_start(length, cap, spans), spans.window,
                                       axis=axis)
    return jnp.concatenate([sink, win], axis=axis)


def put(y: jax.Array, length, spans: Spans, capacity: int) -> jax.Array:
    """Inverse of `take` along the last axis: y [..., sink + window] -> [..., capacity], zero
    outside the slices and where the slice entry is not `valid`."""
    y = jnp.where(valid(length, capacity, spans), y, jnp.zeros((), y.dtype))
    pad = [(0, 0)] * (y.ndim - 1)
    sink = jnp.pad(y[..., :spans.sink], pad + [(0, capacity - spans.sink)])
    win = jax.lax.dynamic_update_slice_in_dim(
        jnp.zeros(y.shape[:-1] + (capacity,), y.dtype), y[..., spans.sink:],
        window_start(length, capacity, spans), axis=-1)
    return sink + win


def entry_mask(length, capacity: int, spans: Spans) -> jax.Array:
    """bool [capacity]: the entries the slices attend (public)."""
    return put(jnp.ones((spans.width,), jnp.int32), length, spans, capacity) > 0


def window_rows(scores: jax.Array, length, spans: Spans, size: int) -> jax.Array:
    """The window's scores as rows of `size` for a batched max: scores [..., capacity] ->
    [..., ceil(window / size), size], entries not `valid` (and the padding) at -BIG."""
    win = take(scores, length, spans)[..., spans.sink:]
    ok = valid(length, scores.shape[-1], spans)[spans.sink:]
    win = jnp.where(ok, win, -BIG)
    rows = -(-spans.window // size)
    pad = [(0, 0)] * (win.ndim - 1) + [(0, rows * size - spans.window)]
    win = jnp.pad(win, pad, constant_values=-BIG)
    return win.reshape(win.shape[:-1] + (rows, size))


def candidates(length, n_clusters: int, size: int, spans: Spans) -> jax.Array:
    """bool [n_clusters]: clusters that may be chosen: completely filled, after the sink and
    wholly before the window (public)."""
    idx = jnp.arange(n_clusters)
    return (idx * size >= spans.sink) & ((idx + 1) * size <= length - spans.window)
