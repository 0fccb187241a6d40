"""Decode-step attention with a policy's query-aware selection (one layer).

`decode_attention` is what every layer of `model.decode_step` runs, and what the cost
benchmarks compile on their own: selection, then attention over the selected entries.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mpc_llama import nonlinear
from mpc_llama.config import LlamaConfig
from mpc_llama.eviction_hooks import compaction_matrix, gather_clusters
from mpc_llama.model import attend, attention_scores, attention_values


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
    scores = attention_scores(q, k, cfg)[:, :, :, 0]                            # [b,k,g,c]
    picked, ok = gather_scores(onehot, scores, valid, size)
    probs = nonlinear.SOFTMAX[cfg.softmax](picked, ok > 0.5)
    return attention_values(scatter_probs(onehot, probs, size)[:, :, :, None], v, cfg)


def gather_scores(onehot: jax.Array, scores: jax.Array, valid: jax.Array, size: int):
    """The selected clusters' scores, packed: onehot [b, k, slots, c/size] (0/1), scores
    [b, k, g, c], valid [c] (public) -> picked [b, k, g, slots*size], ok [b, k, 1, slots*size]
    (1.0 where the packed entry is a valid cache entry, else 0.0)."""
    b, kh, g, c = scores.shape
    p = onehot.astype(scores.dtype)
    picked = jnp.einsum("bksn,bkgnz->bkgsz", p, scores.reshape(b, kh, g, c // size, size))
    ok = jnp.einsum("bksn,nz->bksz", p, valid.reshape(c // size, size).astype(scores.dtype))
    return picked.reshape(b, kh, g, -1), ok.reshape(b, kh, 1, -1)


def scatter_probs(onehot: jax.Array, probs: jax.Array, size: int) -> jax.Array:
    """Inverse of gather_scores: probs [b, k, g, slots*size] -> [b, k, g, c], zero elsewhere."""
    b, kh, g, _ = probs.shape
    p = onehot.astype(probs.dtype)
    full = jnp.einsum("bksn,bkgsz->bkgnz", p, probs.reshape(b, kh, g, p.shape[2], size))
    return full.reshape(b, kh, g, -1)


def _select(policy, q, ck, bounds, length, prompt_len, cfg):
    """(policy.gather, P [b, k, slots, n] (0/1 float), cluster size) for cluster policies
    that gather ("scores" or "kv"), else ("mask", bool [b, k, c], None)."""
    picked = policy.select_clusters(q, ck, bounds, length, prompt_len, cfg)
    mode = getattr(policy, "gather", "mask")
    if picked is not None and mode != "mask":
        mask, size, slots = picked
        # float once here: a boolean share would be converted again at every use under MPC
        return mode, compaction_matrix(mask, slots).astype(ck.dtype), size
    return "mask", policy.select(q, ck, bounds, length, prompt_len, cfg), None


def decode_attention(q, ck, cv, bounds, length, policy, prompt_len: int, cfg: LlamaConfig,
                     selection=None, segments=None):
    """One layer's attention for the current token.

    q: [b, 1, n, d] (rotated); ck, cv: [b, k, c, d] with the current entry written;
    bounds: this layer's cluster bounds or None; length: [] valid entries (public);
    selection: a sharing source's selection to reuse, or None to select here;
    segments: None, or (keys, values), each a tuple of row segments of ck / cv that the
    attention matmuls use instead (see model.attention_scores).
    Returns (out [b, 1, n*d], selection (or None), attended counts [b, k]).
    """
    valid = jnp.arange(ck.shape[2]) < length
    mask = jnp.broadcast_to(valid, ck.shape[:3])  # [b, k, c]
    mk, mv = (ck, cv) if segments is None else segments
    if policy is None or not policy.dynamic:
        return attend(q, mk, mv, mask[:, :, None, None, :], cfg), None, mask.sum(axis=-1)
    if selection is None:
        qg = q[:, 0].reshape(q.shape[0], cfg.n_kv_heads, cfg.group_size, cfg.head_dim)
        selection = _select(policy, qg, ck, bounds, length, prompt_len, cfg)
    kind, sel, size = selection
    if kind == "scores":
        count = jnp.einsum("bksn,nz->bk", sel.astype(jnp.int32),
                           valid.reshape(-1, size).astype(jnp.int32))
        return attend_selected(q, mk, mv, sel, size, valid, cfg), selection, count
    keys, values = mk, mv
    if kind == "kv":
        keys, values, picked = gather_clusters(sel, size, ck, cv, mask.astype(ck.dtype))
        mask = picked > 0.5
    else:
        mask = jnp.logical_and(mask, sel)
    out = attend(q, keys, values, mask[:, :, None, None, :], cfg)
    return out, selection, mask.sum(axis=-1)


def attended_mask(selection, valid: jax.Array, shape) -> jax.Array:
    """bool [b, k, c]: the cache entries a layer attended (plaintext diagnostics).
    selection: decode_attention's (kind, sel, size) or None (every valid entry)."""
    if selection is None:
        return jnp.broadcast_to(valid, shape)
    kind, sel, size = selection
    if kind == "mask":
        return jnp.logical_and(sel, valid)
    from eviction.clusters import expand

    return jnp.logical_and(expand(sel.sum(axis=2) > 0.5, size), valid)
