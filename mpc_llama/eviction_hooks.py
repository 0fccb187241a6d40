"""Applies an eviction policy's static step to a prefilled layer (kept in the model package
so that `model.py` stays readable; the policies themselves live in `eviction/`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from eviction.base import topk_mask


def static_mask(policy, q, k, cfg) -> jax.Array:
    """bool [b, k, t]: the entries this layer keeps (forced ones plus top-scored).

    q: [b, t, k, g, d]; k: [b, k, t, d].
    """
    t = k.shape[2]
    forced = policy.static_forced(t)  # public
    keep = policy.static_keep(t) - int(forced.sum())
    # once per prompt, so rounds matter less than exact ranking: by default SPU's top-k (with
    # "search", a finer search than the per-step one); forced entries stay out of the ranking
    chosen = topk_mask(policy.static_scores(q, k, cfg), keep, jnp.asarray(~forced),
                       policy.static_selector, ways=16, bits=24)
    return jnp.logical_or(chosen, jnp.asarray(forced))


def static_selection(policy, q, k, cfg) -> jax.Array:
    """The static step's result as the float one-hot matrix [b, k, keep, t] that compacts a
    layer (computed once per source layer; layers sharing its selection reuse the matrix).
    Float, not bool: under MPC a boolean share would be converted at every use."""
    mask = static_mask(policy, q, k, cfg)
    return compaction_matrix(mask, policy.static_keep(k.shape[2])).astype(k.dtype)


def kept_indices(policy, q, k, cfg) -> jax.Array:
    """Plaintext twin of `static_selection`: int [b, k, keep], the kept positions in order
    (an index gather with them moves exactly the entries the one-hot matrix moves). Not for
    SPU: it forms secret indices."""
    mask = static_mask(policy, q, k, cfg)
    order = jnp.argsort(jnp.logical_not(mask), axis=-1, stable=True)
    return order[..., :policy.static_keep(k.shape[2])]


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
