"""Compaction: moving a policy's selected entries (or clusters) to a fixed number of public
slots without forming a secret index.

"onehot" (the reference, any protocol): a one-hot matrix P [slots, n] from a prefix sum
(local under MPC) and slots x n secure equalities with public slot numbers; gathers and
scatters are matmuls with P.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def compaction_matrix(mask: jax.Array, n: int) -> jax.Array:
    """One-hot matrix P [b, k, n, t] moving the kept entries of `mask` [b, k, t] to the front
    in position order: P[i, j] = mask[j] and (rank of j among kept == i). Built from a prefix
    sum (local under MPC) and comparisons with public slot numbers: no secret index is formed.
    Rows beyond the number kept are zero."""
    dest = jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1                    # [b, k, t]
    slots = jnp.arange(n)[:, None]                                              # [n, 1]
    return jnp.logical_and(mask[:, :, None, :], dest[:, :, None, :] == slots)  # [b, k, n, t]


def gather_rows(p: jax.Array, a: jax.Array) -> jax.Array:
    """p [b, k, n, t] (bool or 0/1 float) applied to a [b, k, t, ...] -> [b, k, n, ...] as
    one matmul."""
    return jnp.einsum("bknt,bkt...->bkn...", p.astype(a.dtype), a)


def gather_clusters(p: jax.Array, size: int, *arrays):
    """Gathers whole clusters: p [b, k, slots, n] over clusters of `size` consecutive entries;
    arrays [b, k, n*size, ...] -> [b, k, slots*size, ...]."""
    out = []
    for a in arrays:
        b, h, c = a.shape[:3]
        g = gather_rows(p, a.reshape(b, h, c // size, size, *a.shape[3:]))
        out.append(g.reshape(b, h, -1, *a.shape[3:]))
    return out
