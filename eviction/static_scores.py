"""Scores used by static (prefill-time) eviction: observation-window attention and pooling.

The window attention a static step ranks by is the prefill's own: the causal softmax of the
last `rows` prompt queries over the prompt, which a prefill computes for every query anyway.
`aggregate_rows` takes it from those probabilities (what the private prefill does, through the
tap a policy hands to `mpc_llama.model.prefill`: with "sum", additions only, local under MPC);
`window_attention` recomputes the same values from q and k (the plaintext harness's chunked
prefill keeps no probabilities)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from eviction.topk import BIG
from mpc_llama import nonlinear


def group_probs(q: jax.Array, k: jax.Array, mask: jax.Array, softmax) -> jax.Array:
    """Attention probabilities summed over the query heads of each KV group.

    q: [b, t, k, g, d]; k: [b, k, s, d]; mask broadcastable to [b, k, g, t, s].
    Returns [b, k, t, s].
    """
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k) / math.sqrt(q.shape[-1])
    return softmax(scores, mask).sum(axis=2)


def aggregate_rows(probs: jax.Array, rows: int, aggregate: str) -> jax.Array:
    """The last `rows` query rows of a layer's attention probabilities, summed over each KV
    group's query heads and aggregated over the rows ("sum" or "max").

    probs: [b, k, g, t, s] (causal, as the prefill computes them). Returns [b, k, s]."""
    w = min(rows, probs.shape[3])
    per_row = probs[:, :, :, probs.shape[3] - w:].sum(axis=2)                  # [b, k, w, s]
    return per_row.sum(axis=2) if aggregate == "sum" else per_row.max(axis=2)


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
