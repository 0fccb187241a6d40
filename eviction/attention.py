"""Decode-step attention with a policy's query-aware selection (one layer).

`decode_attention` is what every layer of `model.decode_step` runs, and what the cost
benchmarks compile on their own: selection, then attention over the selected entries.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mpc_llama import nonlinear
from mpc_llama.config import LlamaConfig
from eviction import slices
from eviction.clusters import expand
from eviction.compaction import (block_diagonal, compaction_matrix, digits, fold_for,
                                 gather_clusters, onehot_form, pad_to, partition,
                                 scatter_by_digits)
from mpc_llama.model import attend, attention_scores, attention_values


def attend_selected(q: jax.Array, k: jax.Array, v: jax.Array, onehot: jax.Array, size: int,
                    valid: jax.Array, cfg: LlamaConfig, scores=None, row_max=None,
                    fold: int = 1, spans=None, length=None) -> jax.Array:
    """Attention of one decode query over the selected clusters, by "score then select":
    scores against the whole cache (a matmul whose output is one scalar per entry), the
    selected clusters' SCORES gathered by the one-hot matrix, softmax over those only, the
    probabilities scattered back, then p . V. No key or value row is ever gathered, which under
    ABY3 (communication ~ matmul output) is what makes selection pay.

    q: [b, 1, n, d]; k, v: [b, k, c, d]; onehot: [b, k, slots, c/size] (bool); valid: [c];
    scores: q . k [b, k, g, c] when the selection computed them already (else computed here);
    row_max: the max over the selected valid entries [b, k, g, 1] when the selection has it
    (the softmax then runs no max tree), else None; fold: KV heads per block-diagonal
    scatter matmul (scatter_probs); spans: the forced slices (eviction.slices.Spans) attended
    next to the one-hot's clusters, or None; length: [] valid entries (public; with spans).
    Returns [b, 1, n*d].
    """
    if scores is None:
        scores = attention_scores(q, k, cfg)[:, :, :, 0]                        # [b,k,g,c]
    picked, ok = gather_packed(onehot, scores, valid, size, spans, length)
    w = nonlinear.SOFTMAX[cfg.softmax](picked, ok > 0.5, row_max=row_max, normalise=False)
    full = scatter_packed(onehot, w.p, size, fold, spans, length, scores.shape[-1])
    return attention_values(nonlinear.Weights(full[:, :, :, None], w.recip[:, :, :, None]),
                            v, cfg)


def gather_packed(onehot, scores, valid, size: int, spans=None, length=None):
    """gather_scores, then the forced slices' scores appended (public slices; with_spans):
    picked [b, k, g, slots*size + spans.width], ok [b, k, 1, same] (1.0: a valid attended
    entry). onehot may have 0 slots (nothing chosen: the slices only)."""
    b, kh, g, _ = scores.shape
    if onehot.shape[2]:
        picked, ok = gather_scores(onehot, scores, valid, size)
    else:
        picked, ok = (jnp.zeros((b, kh, g, 0), scores.dtype),
                      jnp.zeros((b, kh, 1, 0), scores.dtype))
    return with_spans(picked, ok, scores, length, spans)


def scatter_packed(onehot, probs, size: int, fold: int = 1, spans=None, length=None,
                   capacity: int = None):
    """Inverse of gather_packed for the probabilities: [b, k, g, slots*size (+ spans.width)]
    -> [b, k, g, capacity] in cache order, zero where nothing was attended."""
    n = onehot.shape[2] * size
    return scatter_spans(lambda p: scatter_probs(onehot, p, size, fold) if n else 0.0,
                         probs, n, length, spans, capacity)


def gather_scores(onehot: jax.Array, scores: jax.Array, valid: jax.Array, size: int):
    """The selected clusters' scores, packed: onehot [b, k, slots, c/size] (0/1), scores
    [b, k, g, c], valid [c] (public) -> picked [b, k, g, slots*size], ok [b, k, 1, slots*size]
    (1.0 where the packed entry is a valid cache entry, else 0.0). One matmul per KV head:
    folded into block-diagonal matmuls (as scatter_probs can be) it took fewer rounds but
    more time (ABY3, 32 heads, 8k, a probe; the benchmark's gather block too)."""
    b, kh, g, c = scores.shape
    p = onehot.astype(scores.dtype)
    picked = jnp.einsum("bksn,bkgnz->bkgsz", p, scores.reshape(b, kh, g, c // size, size))
    ok = jnp.einsum("bksn,nz->bksz", p, valid.reshape(c // size, size).astype(scores.dtype))
    return picked.reshape(b, kh, g, -1), ok.reshape(b, kh, 1, -1)


def scatter_probs(onehot: jax.Array, probs: jax.Array, size: int, fold: int = 1) -> jax.Array:
    """Inverse of gather_scores: probs [b, k, g, slots*size] -> [b, k, g, c], zero elsewhere.
    fold: KV heads per block-diagonal matmul (the policy's `fold_heads`, 1 unless set; the
    same values, 1/fold of the rounds; eviction.compaction says why no protocol folds)."""
    b, kh, g, _ = probs.shape
    slots, n = onehot.shape[2], onehot.shape[3]
    p = onehot.astype(probs.dtype)
    f = fold_for(kh, fold)
    if f == 1:
        full = jnp.einsum("bksn,bkgsz->bkgnz", p, probs.reshape(b, kh, g, slots, size))
        return full.reshape(b, kh, g, -1)
    rows = probs.reshape(b, kh // f, f, g, slots, size).transpose(0, 1, 2, 4, 3, 5)
    out = jnp.einsum("brsn,brsz->brnz", block_diagonal(p, f),
                     rows.reshape(b, kh // f, f * slots, g * size))
    return out.reshape(b, kh, n, g, size).transpose(0, 1, 3, 2, 4).reshape(b, kh, g, -1)


def partition_scores(mask: jax.Array, scores: jax.Array, size: int, slots: int, length,
                     backend: str):
    """The "sort" kernel's gather: the selected clusters' scores packed by one stable 1-bit
    sort (eviction.compaction.partition), with each slot's cluster-index digits for the way
    back. mask: bool [b, k, n] clusters (at most `slots` per row; a comparison result, so a
    one-bit key under SPU); scores [b, k, g, n*size]; length: [] valid cache entries (public).
    Returns hi, lo [b, k, slots] (int), picked [b, k, g, slots*size] and ok [b, k, 1,
    slots*size] (bool: a real selected, valid entry)."""
    b, kh, g, c = scores.shape
    n = c // size
    _, base = digits(n)
    idx = jnp.arange(n)
    full = (idx + 1) * size <= length                                   # public
    part = jnp.logical_and(idx * size < length, jnp.logical_not(full))  # the current cluster
    cols = scores.reshape(b, kh, g, n, size).transpose(0, 1, 3, 2, 4).reshape(b, kh, n, g * size)
    out = partition(pad_to(mask, slots), slots,
                    [idx // base, idx % base, jnp.logical_and(mask, full),
                     jnp.logical_and(mask, part)] + [cols[..., i] for i in range(g * size)],
                    backend)
    hi, lo, full_s, part_s = out[:4]
    picked = jnp.stack(out[4:], axis=-1).reshape(b, kh, slots, g, size)
    tail = jnp.arange(size) < length - (length // size) * size           # public [size]
    ok = jnp.logical_or(full_s[..., None], jnp.logical_and(part_s[..., None], tail))
    return (hi, lo, picked.transpose(0, 1, 3, 2, 4).reshape(b, kh, g, slots * size),
            ok.reshape(b, kh, 1, slots * size))


def scatter_partitioned(hi: jax.Array, lo: jax.Array, probs: jax.Array, size: int,
                        n: int) -> jax.Array:
    """Inverse of partition_scores for the probabilities: probs [b, k, g, slots*size] ->
    [b, k, g, n*size] in cache order, zero where nothing was selected."""
    b, kh, g, _ = probs.shape
    slots = hi.shape[-1]
    full = scatter_by_digits(hi.reshape(b * kh, slots), lo.reshape(b * kh, slots),
                             probs.reshape(b * kh, g, slots, size), n)
    return full.reshape(b, kh, g, n * size)


def attend_partitioned(q, k, v, mask, size: int, slots: int, length, cfg: LlamaConfig,
                       backend: str, entries: int, scores=None, row_max=None, spans=None):
    """attend_selected with the "sort" kernel: scores against the whole cache, the selected
    clusters' scores packed by partition_scores, softmax over those only, the probabilities
    back in cache order (scatter_partitioned), then p . V. Same output as attend_selected.
    k, v: [b, k, entries, d] or tuples of row segments (see model.attention_scores).
    scores, row_max, spans: as in attend_selected. Returns (out [b, 1, n*d], attended counts
    [b, k])."""
    if scores is None:
        scores = attention_scores(q, k, cfg)[:, :, :, 0]                        # [b,k,g,c]
    hi, lo, picked, ok = partition_scores(mask, scores, size, slots, length, backend)
    picked, ok = with_spans(picked, ok, scores, length, spans)
    w = nonlinear.SOFTMAX[cfg.softmax](picked, ok, row_max=row_max, normalise=False)
    full = scatter_spans(lambda p: scatter_partitioned(hi, lo, p, size, entries // size),
                         w.p, slots * size, length, spans, entries)
    return (attention_values(nonlinear.Weights(full[:, :, :, None], w.recip[:, :, :, None]),
                             v, cfg), ok.sum(axis=(2, 3)))


def with_spans(picked, ok, scores, length, spans):
    """Packed scores (picked [b, k, g, m], ok [b, k, 1, m], bool or 0/1 float) with the
    forced slices' scores appended, taken from scores [b, k, g, c] (public slices); m may be
    0. Both compaction kernels (one-hot and sort) pack through here."""
    if spans is None:
        return picked, ok
    b, kh, g, c = scores.shape
    oks = jnp.broadcast_to(slices.valid(length, c, spans).astype(ok.dtype),
                           (b, kh, 1, spans.width))
    extra = slices.take(scores, length, spans)
    if picked.shape[-1] == 0:
        return extra, oks
    return jnp.concatenate([picked, extra], axis=-1), jnp.concatenate([ok, oks], axis=-1)


def scatter_spans(scatter, probs, n: int, length, spans, capacity: int):
    """scatter(probs[..., :n]) plus the forced slices' probabilities put back in place."""
    if spans is None:
        return scatter(probs)
    return scatter(probs[..., :n]) + slices.put(probs[..., n:], length, spans, capacity)


def _select(policy, q, ck, bounds, length, prompt_len, cfg, scores=None, with_max=False):
    """(kind, selection, cluster size, slots, spans): for cluster policies that gather
    ("scores" or "kv"), kind is the gather mode and the selection P [b, k, slots, n] (0/1
    float), except under the "sort" compaction with gather "scores", where kind is "sort"
    and the selection the bool cluster mask [b, k, n]; otherwise ("mask", bool [b, k, c],
    None, None, None), the forced slices included. spans: the forced slices attended next to
    the selection (eviction.slices.Spans, the policy's `spans`), or None.
    scores: the step's q . k [b, k, g, c] for policies with `needs_scores`, else None.
    with_max: return (that tuple, row_max), row_max the softmax's max over the selected
    valid entries [b, k, 1, 1] where the policy's selection yields it (`gives_max`), else
    None."""
    row_max = None
    if with_max and getattr(policy, "gives_max", lambda g, t: False)(q.shape[2], prompt_len):
        *picked, row_max = policy.select_clusters(q, ck, bounds, length, prompt_len, cfg,
                                                  scores=scores, with_max=True)
    else:
        picked = policy.select_clusters(q, ck, bounds, length, prompt_len, cfg, scores=scores)
    selection = _selection(policy, picked, q, ck, bounds, length, prompt_len, cfg)
    return (selection, row_max) if with_max else selection


def _selection(policy, picked, q, ck, bounds, length, prompt_len, cfg):
    """_select's tuple from the policy's select_clusters output `picked`."""
    mode = getattr(policy, "gather", "mask")
    spans = getattr(policy, "spans", lambda t: None)(prompt_len) if picked is not None \
        else None
    if picked is not None and mode != "mask":
        mask, size, slots = picked
        if mode == "scores" and getattr(policy, "compaction", "onehot") == "sort" and \
                policy.chooses(prompt_len):
            return "sort", mask, size, slots, spans
        # (nothing chosen: the mask is public, and so is its one-hot matrix)
        # float once here: a boolean share would be converted again at every use under MPC
        return mode, compaction_matrix(mask, slots, onehot_form(policy)).astype(ck.dtype), \
            size, slots, spans
    if picked is None:
        return "mask", policy.select(q, ck, bounds, length, prompt_len, cfg), None, None, None
    mask = expand(picked[0], picked[1])
    if spans is not None:
        mask = jnp.logical_or(mask, slices.entry_mask(length, ck.shape[2], spans))
    return "mask", mask, None, None, None


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
    scores = row_max = None   # row_max only where this layer selects (not a shared selection)
    if selection is None:
        qg = q[:, 0].reshape(q.shape[0], cfg.n_kv_heads, cfg.group_size, cfg.head_dim)
        if policy.needs_scores:   # one q . k matmul for the selection and the attention
            scores = attention_scores(q, mk, cfg)[:, :, :, 0]                   # [b,k,g,c]
        selection, row_max = _select(policy, qg, ck, bounds, length, prompt_len, cfg, scores,
                                     with_max=True)
    kind, sel, size, slots, spans = selection
    if kind == "sort":
        out, count = attend_partitioned(q, mk, mv, sel, size, slots, length, cfg,
                                        getattr(policy, "backend", "plain"), ck.shape[2],
                                        scores, row_max, spans)
        return out, selection, count
    forced = 0 if spans is None else slices.valid(length, ck.shape[2], spans).sum()
    if kind == "scores":
        count = jnp.einsum("bksn,nz->bk", sel.astype(jnp.int32),
                           valid.reshape(-1, size).astype(jnp.int32)) + forced
        return (attend_selected(q, mk, mv, sel, size, valid, cfg, scores, row_max,
                                max(1, getattr(policy, "fold_heads", 1)), spans, length),
                selection, count)
    keys, values = mk, mv
    if kind == "kv":
        keys, values, picked = gather_clusters(sel, size, ck, cv, mask.astype(ck.dtype))
        mask = picked > 0.5
        if spans is not None:   # the forced slices' rows (public slices) after the chosen
            keys, values = (jnp.concatenate([a, slices.take(x, length, spans, axis=2)],
                                            axis=2) for a, x in ((keys, ck), (values, cv)))
            mask = jnp.concatenate([mask, jnp.broadcast_to(
                slices.valid(length, ck.shape[2], spans), mask.shape[:2] + (spans.width,))],
                axis=-1)
    else:
        mask = jnp.logical_and(mask, sel)
    out = attend(q, keys, values, mask[:, :, None, None, :], cfg)
    return out, selection, mask.sum(axis=-1)


def attended_mask(selection, valid: jax.Array, shape) -> jax.Array:
    """bool [b, k, c]: the cache entries a layer attended (plaintext diagnostics).
    selection: decode_attention's (kind, sel, size, slots, spans) or None (every valid
    entry)."""
    if selection is None:
        return jnp.broadcast_to(valid, shape)
    kind, sel, size, _, spans = selection
    if kind == "mask":
        return jnp.logical_and(sel, valid)
    if spans is not None:
        forced = slices.entry_mask(valid.sum(), valid.shape[-1], spans)
        rest = attended_mask((kind, sel, size, None, None), valid, shape)
        return jnp.logical_or(rest, jnp.logical_and(forced, valid))
    if kind == "sort":
        return jnp.logical_and(expand(sel, size), valid)
    return jnp.logical_and(expand(sel.sum(axis=2) > 0.5, size), valid)
