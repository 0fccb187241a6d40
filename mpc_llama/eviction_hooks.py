"""Applies an eviction policy's static step to a prefilled layer (kept in the model package
so that `model.py` stays readable; the policies themselves live in `eviction/`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from eviction.base import BIG, topk_mask


def static_mask(policy, q, k, cfg) -> jax.Array:
    """bool [b, k, t]: the entries this layer keeps (forced ones plus top-scored).

    q: [b, t, k, g, d]; k: [b, k, t, d].
    """
    t = k.shape[2]
    forced = jnp.asarray(policy.static_forced(t))
    scores = jnp.where(forced, BIG, policy.static_scores(q, k, cfg))
    return topk_mask(scores, policy.static_keep(t), jnp.ones((t,), bool))


def compact(mask: jax.Array, n_keep: int, *arrays):
    """Moves the kept entries to the front, in position order, as a one-hot matmul.

    mask: [b, k, t] with exactly n_keep True per row; arrays: [b, k, t, ...]. The one-hot
    matrix P[i, j] = mask[j] and (rank of j among kept == i) uses a prefix sum and public
    comparisons with i: no secret index is ever formed. Returns arrays [b, k, n_keep, ...].
    """
    dest = jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1                 # [b, k, t]
    slots = jnp.arange(n_keep)[:, None]                                      # [n, 1]
    onehot = jnp.logical_and(mask[:, :, None, :], dest[:, :, None, :] == slots)  # [b,k,n,t]
    out = []
    for a in arrays:
        p = onehot.astype(a.dtype)
        out.append(jnp.einsum("bknt,bkt...->bkn...", p, a))
    return out
