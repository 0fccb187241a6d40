"""Fixed-size clusters of consecutive cache entries and their per-dimension key bounds.

Bounds shapes (C capacity, a multiple of s1; s2 divides s1; MPCache's default s1=32, s2=16):
    rmax2, rmin2, khat2: [b, k, C/s2, d]   level-2 clusters
    rmax1, rmin1, khat1: [b, k, C/s1, d]   level-1 clusters
khat = alpha*r_max + (1-alpha)*r_min is stored too, so a decode step scores clusters with one
matmul and recomputes khat only for the cluster the new key lands in.
Empty clusters hold -BIG / +BIG. Bounds are computed once over the (compacted) cache at the
end of prefill, then updated incrementally as each new key is written (one max and one min per
dimension and level), never recomputed over the whole cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from eviction.topk import BIG

S1, S2 = 32, 16  # defaults


def bounds_of(keys: jax.Array, length: int, size: int):
    """Per-cluster max/min over valid entries. keys [b, k, C, d] -> 2 x [b, k, C/size, d]."""
    b, h, c, d = keys.shape
    valid = (jnp.arange(c) < length)[None, None, :, None]
    kmax = jnp.where(valid, keys, -BIG).reshape(b, h, c // size, size, d).max(axis=3)
    kmin = jnp.where(valid, keys, BIG).reshape(b, h, c // size, size, d).min(axis=3)
    return kmax, kmin


def init_bounds(keys: jax.Array, length: int, s1: int = S1, s2: int = S2, alpha: float = 0.6):
    """(rmax2, rmin2, rmax1, rmin1, khat2, khat1) for one layer's cache keys [b, k, C, d].

    Level-1 bounds are the max/min of their s1/s2 level-2 children's (exact: a level-1
    cluster is the union of its children; empty children hold -BIG/+BIG): one comparison per
    level-1 cluster and dimension at s1 = 2*s2 instead of s1 - 1."""
    rmax2, rmin2 = bounds_of(keys, length, s2)
    b, h, n2, d = rmax2.shape
    per = s1 // s2
    rmax1 = rmax2.reshape(b, h, n2 // per, per, d).max(axis=3)
    rmin1 = rmin2.reshape(b, h, n2 // per, per, d).min(axis=3)
    return (rmax2, rmin2, rmax1, rmin1, khat(rmax2, rmin2, alpha), khat(rmax1, rmin1, alpha))


def update_bounds(bounds, key: jax.Array, index, s1: int = S1, s2: int = S2,
                  alpha: float = 0.6):
    """Folds the key written at cache `index` (public) into its clusters' bounds and khat.

    bounds: one layer's (rmax2, rmin2, rmax1, rmin1, khat2, khat1); key: [b, k, d].
    Touches one cluster per level: 2*d comparisons and d multiplications per level.
    """
    out = list(bounds)
    cs = [index // size for size in (s2, s1)]
    # the four rows (max and min of both levels) in ONE comparison: max(r, k) for the maxima,
    # -max(-r, -k) for the minima (exact), so a step pays one round of comparisons, not four
    old = jnp.stack([sign * jax.lax.dynamic_slice_in_dim(bounds[2 * level + j], cs[level], 1,
                                                         axis=2)
                     for level in (0, 1) for j, sign in ((0, 1.0), (1, -1.0))])
    k = key[:, :, None]
    new = jnp.maximum(old, jnp.stack([k, -k, k, -k]))
    for level in (0, 1):
        rows = (new[2 * level], -new[2 * level + 1])
        for j in (0, 1):
            out[2 * level + j] = jax.lax.dynamic_update_slice_in_dim(
                bounds[2 * level + j], rows[j], cs[level], axis=2)
        out[4 + level] = jax.lax.dynamic_update_slice_in_dim(
            bounds[4 + level], khat(rows[0], rows[1], alpha), cs[level], axis=2)
    return tuple(out)


def khat(rmax: jax.Array, rmin: jax.Array, alpha: float) -> jax.Array:
    """MPCache's cluster representative: alpha*r_max + (1-alpha)*r_min (linear in q)."""
    return alpha * rmax + (1.0 - alpha) * rmin


def cluster_candidates(length, n_clusters: int, size: int, recent: int = 1):
    """Clusters that may be chosen (completely filled, excluding the forced ones) and the
    forced ones (first = sink, and the `recent` last: the one holding the current token and
    recent - 1 before it). length counts the current token. Both depend on public lengths
    only. Returns 2 x bool [n_clusters]."""
    idx = jnp.arange(n_clusters)
    current = (length - 1) // size
    full = (idx + 1) * size <= length
    forced = jnp.logical_or(idx == 0, jnp.logical_and(idx <= current, idx > current - recent))
    return jnp.logical_and(full, jnp.logical_not(forced)), forced


def expand(mask: jax.Array, size: int) -> jax.Array:
    """Cluster mask [..., n] -> entry mask [..., n*size]."""
    return jnp.repeat(mask, size, axis=-1)


def forced_rows(length, n_clusters: int, size: int, recent: int) -> jax.Array:
    """Public one-hot rows [1 + recent, n_clusters] of the forced clusters (first, then the
    `recent` last, oldest first); a row repeating an earlier row's cluster (short caches) or
    pointing before the first is zero."""
    current = (length - 1) // size
    which = jnp.concatenate([jnp.zeros((1,), jnp.int32),
                             current - jnp.arange(recent - 1, -1, -1, dtype=jnp.int32)])
    rows = which[:, None] == jnp.arange(n_clusters)
    first_time = jnp.logical_and(which >= 0, jnp.concatenate(
        [jnp.ones((1,), bool), which[1:] > jnp.maximum(which[:-1], 0)]))
    return jnp.logical_and(rows, first_time[:, None])
