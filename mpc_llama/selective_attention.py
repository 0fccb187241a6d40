"""Decode-step attention with a policy's query-aware selection (one layer).

`decode_attention` is what every layer of `model.decode_step` runs, and what the cost
benchmarks compile on their own: selection, then attention over the selected entries.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mpc_llama import nonlinear
from mpc_llama.config import LlamaConfig
from mpc_llama.eviction_hooks import compaction_matrix, gather_clusters
from mpc_llama.model import attend


def attend_selected(q: jax.Array, k: jax.Array, v: jax.Array, onehot: jax.Array, size: int,
                    valid: jax.Array, cfg: LlamaConfig) -> jax.Array:
    """Attention of one decode query over the selected clusters, by "score then select":
    scores against the whole cache (a matmul whose output is one scalar per entry), the
    selected clusters' SCORES gathered by the one-hot matrix, softmax over those only, the
    probabilities scattered back, then p . V. No key or value row is ever gathered, which under
    ABY3 (communication ~ matmul output) is what makes selection pay.

    q: [b, 1, n, d]; k, v: [b, k, c, d]; onehot: [b, k, slots, c/size] (bool); valid: [c].
    Returns [b, 1, n*d].
    """
    b = q.shape[0]
    kh, g, d = cfg.n_kv_heads, cfg.group_size, cfg.head_dim
    c = k.shape[2]
    p = onehot.astype(k.dtype)
    qg = q.reshape(b, kh, g, d)
    scores = jnp.einsum("bkgd,bkcd->bkgc", qg, k) / math.sqrt(d)
    scores = scores.reshape(b, kh, g, c // size, size)
    picked = jnp.einsum("bksn,bkgnz->bkgsz", p, scores).reshape(b, kh, g, -1)
    ok = jnp.einsum("bksn,nz->bksz", p, valid.reshape(c // size, size).astype(k.dtype))
    probs = nonlinear.SOFTMAX[cfg.softmax](picked, ok.reshape(b, kh, 1, -1) > 0.5)
    probs = probs.reshape(b, kh, g, -1, size)
    full = jnp.einsum("bksn,bkgsz->bkgnz", p, probs).reshape(b, kh, g, c)
    return jnp.einsum("bkgc,bkcd->bkgd", full, v).reshape(b, 1, cfg.n_heads * d)


def _select(policy, q, ck, bounds, length, prompt_len, cfg):
    """(policy.gather, P [b, k, slots, n], cluster size) for cluster policies that gather
    ("scores" or "kv"), else ("mask", bool [b, k, c], None)."""
    picked = policy.select_clusters(q, ck, bounds, length, prompt_len, cfg)
    mode = getattr(policy, "gather", "mask")
    if picked is not None and mode != "mask":
        mask, size, slots = picked
        return mode, compaction_matrix(mask, slots), size
    return "mask", policy.select(q, ck, bounds, length, prompt_len, cfg), None


def decode_attention(q, ck, cv, bounds, length, policy, prompt_len: int, cfg: LlamaConfig,
                     selection=None):
    """One layer's attention for the current token.

    q: [b, 1, n, d] (rotated); ck, cv: [b, k, c, d] with the current entry written;
    bounds: this layer's cluster bounds or None; length: [] valid entries (public);
    selection: a sharing source's selection to reuse, or None to select here.
    Returns (out [b, 1, n*d], selection (or None), attended counts [b, k]).
    """
    valid = jnp.arange(ck.shape[2]) < length
    mask = jnp.broadcast_to(valid, ck.shape[:3])  # [b, k, c]
    if policy is None or not policy.dynamic:
        return attend(q, ck, cv, mask[:, :, None, None, :], cfg), None, mask.sum(axis=-1)
    if selection is None:
        qg = q[:, 0].reshape(q.shape[0], cfg.n_kv_heads, cfg.group_size, cfg.head_dim)
        selection = _select(policy, qg, ck, bounds, length, prompt_len, cfg)
    kind, sel, size = selection
    if kind == "scores":
        count = jnp.einsum("bksn,nz->bk", sel.astype(jnp.int32),
                           valid.reshape(-1, size).astype(jnp.int32))
        return attend_selected(q, ck, cv, sel, size, valid, cfg), selection, count
    keys, values = ck, cv
    if kind == "kv":
        keys, values, picked = gather_clusters(sel, size, ck, cv, mask.astype(ck.dtype))
        mask = picked > 0.5
    else:
        mask = jnp.logical_and(mask, sel)
    out = attend(q, keys, values, mask[:, :, None, None, :], cfg)
    return out, selection, mask.sum(axis=-1)
