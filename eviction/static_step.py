"""A policy's static step on a prefilled layer: which entries it keeps, and the compaction
that moves them to the front of the cache (once per prompt, at the end of prefill)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from eviction.compaction import compaction_matrix, onehot_form, partition
from eviction.topk import topk_mask


def static_mask(policy, q, k, cfg, attn=None) -> jax.Array:
    """bool [b, k, t]: the entries this layer keeps (forced ones plus top-scored).

    q: [b, t, k, g, d]; k: [b, k, t, d]; attn: the prefill's tapped attention aggregate
    [b, k, t] (`Policy.prefill_tap`; then q is not read), or None (recomputed from q, k).
    """
    t = k.shape[2]
    forced = policy.static_forced(t)  # public
    keep = policy.static_keep(t) - int(forced.sum())
    if keep <= 0:
        # nothing ranked: the first static_keep forced entries, a PUBLIC mask (a mask that
        # passed through the top-k would be a secret one, which SPU sorts in another order)
        first = forced & (np.cumsum(forced) <= policy.static_keep(t))
        return jnp.broadcast_to(jnp.asarray(first), k.shape[:3])
    # once per prompt, so rounds matter less than exact ranking: by default SPU's top-k (with
    # "search", a finer search than the per-step one); forced entries stay out of the ranking
    chosen = topk_mask(policy.static_scores(q, k, cfg, attn), keep, jnp.asarray(~forced),
                       policy.static_selector, ways=16, bits=24)
    return jnp.logical_or(chosen, jnp.asarray(forced))


def static_selection(policy, q, k, cfg, attn=None) -> jax.Array:
    """The static step's result as the float one-hot matrix [b, k, keep, t] that compacts a
    layer (computed once per source layer; layers sharing its selection reuse the matrix).
    Float, not bool: under MPC a boolean share would be converted at every use."""
    mask = static_mask(policy, q, k, cfg, attn)
    return compaction_matrix(mask, policy.static_keep(k.shape[2]),
                             onehot_form(policy)).astype(k.dtype)


def kept_indices(policy, q, k, cfg, attn=None) -> jax.Array:
    """Plaintext twin of `static_selection`: int [b, k, keep], the kept positions in order
    (an index gather with them moves exactly the entries the one-hot matrix moves). Not for
    SPU: it forms secret indices."""
    mask = static_mask(policy, q, k, cfg, attn)
    order = jnp.argsort(jnp.logical_not(mask), axis=-1, stable=True)
    return order[..., :policy.static_keep(k.shape[2])]


def take_public(a: jax.Array, idx: np.ndarray) -> jax.Array:
    """a[:, :, idx] for PUBLIC increasing indices idx, as static slices of its contiguous runs
    (no gather op: under SPU a slice of a secret is local). a: [b, k, t, ...]."""
    breaks = np.nonzero(np.diff(idx) != 1)[0] + 1
    runs = [(int(r[0]), int(r[-1]) + 1) for r in np.split(idx, breaks)]
    parts = [a[:, :, s:e] for s, e in runs]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=2)


def partition_rows(mask: jax.Array, keep: int, k: jax.Array, v: jax.Array, pos: jax.Array,
                   backend: str):
    """The "sort" kernel's static compaction: the `keep` entries of a SECRET `mask` [b, k, t]
    (exactly `keep` per row, as static_mask returns when it ranks) of k, v [b, k, t, d] and
    pos [b, k, t], in position order, by one stable 1-bit sort over all heads
    (eviction.compaction.partition): one radix pass moving 2d + 1 columns, instead of keep x t
    equalities. A public mask (nothing ranked) is taken by `take_public` instead."""
    d = k.shape[-1]
    cols = [k[..., i] for i in range(d)] + [v[..., i] for i in range(d)] + [pos]
    out = partition(mask, keep, cols, backend)
    return jnp.stack(out[:d], -1), jnp.stack(out[d:2 * d], -1), out[2 * d]
