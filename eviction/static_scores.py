"""Scores used by static (prefill-time) eviction: observation-window attention and pooling."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from eviction.base import BIG, group_probs
from mpc_llama import nonlinear


def window_attention(q: jax.Array, k: jax.Array, window: int, aggregate: str, cfg) -> jax.Array:
    """Attention of the last `window` prompt queries on every key, aggregated over the window
    ("sum" or "max") and summed over the query heads of each KV group.

    q: [b, t, k, g, d]; k: [b, k, t, d]. Returns [b, k, t].
    """
    t = q.shape[1]
    w = min(window, t)
    causal = jnp.arange(t)[None, :] <= jnp.arange(t - w, t)[:, None]  # [w, t]
    probs = group_probs(q[:, t - w:], k, causal, nonlinear.SOFTMAX[cfg.softmax])  # [b,k,w,t]
    return probs.sum(axis=2) if aggregate == "sum" else probs.max(axis=2)


def max_pool(scores: jax.Array, kernel: int) -> jax.Array:
    """1-D max pooling along the last axis, same length (SnapKV's clustering of neighbours)."""
    if kernel <= 1:
        return scores
    pad = kernel // 2
    window = (1,) * (scores.ndim - 1) + (kernel,)
    return jax.lax.reduce_window(scores, jnp.asarray(-BIG, scores.dtype), jax.lax.max, window,
                                 (1,) * scores.ndim,
                                 [(0, 0)] * (scores.ndim - 1) + [(pad, kernel - 1 - pad)])
