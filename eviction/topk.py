"""Top-k masks over secret scores, written as batched jnp ops (plaintext and SPU alike).

Every selector returns a bool mask of exactly min(k, #allowed) entries along the last axis,
ties to the earliest positions; none forms a secret index, and "search", "rank" and "auto"
open nothing under SPU (the compiled programs are inspected by tests/test_eviction_spu.py).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

BIG = 1.0e4  # stands in for infinity: fixed point has none, and this cannot overflow FM64


SEARCH_BITS = 12   # resolution of the threshold search: (max - min) / 2**12
SEARCH_WAYS = 8    # parts per round: 3 bits per round, 4 rounds
MIN_STEP = 2.0 ** -14  # 16 ulps of FM64 with 18 fraction bits


# "auto" ranks rows of at most this many entries and searches longer ones. Per row only, so
# that a layer measured on a few of its heads runs the same kernel as all of them. From the
# ABY3 costs in topk_mask's docstring: with SmolLM2's 3 KV heads ranking's extra bytes cost
# less than the ~240 rounds it saves on the LAN profile up to ~147 entries (on WAN it wins
# much further); with 32 heads the LAN break-even is ~45 entries (rank costs more on LAN,
# less on WAN).
RANK_MAX = 160
# "lean": the search with 4 parts per round and 8 bits (4 rounds of 3 comparisons per entry:
# 12 instead of "search"'s 28; ties within (max - min) / 256 go to the earliest positions,
# so selections can differ from "search": a cost variant until its accuracy is measured)
LEAN_WAYS, LEAN_BITS = 4, 8
# "wide": the same 256 levels as "lean" in 2 rounds of 16 parts (30 comparisons per entry
# instead of 12, half the rounds): the same final interval, so the same selection
WIDE_WAYS, WIDE_BITS = 16, 8
# "near": ONE round of NEAR_WAYS parts over [max - NEAR_SPAN, max] (no min tree, one cut
# round instead of lean's 4): entries below max - NEAR_SPAN are never chosen (their softmax
# weight is below e^-NEAR_SPAN of the row max when scores are attention logits), so a row can
# get FEWER than k; ties within NEAR_SPAN / NEAR_WAYS go to the earliest positions
NEAR_WAYS, NEAR_SPAN = 16, 16.0
SELECTORS = ("search", "topk", "rank", "auto", "lean", "wide", "near")


def topk_mask(scores: jax.Array, k: int, allowed: jax.Array, selector: str = "search",
              ways: int = SEARCH_WAYS, bits: int = SEARCH_BITS, with_max: bool = False):
    """Bool mask of exactly min(k, #allowed) highest `scores` among `allowed` entries, along
    the last axis.

    selector "search" (default): a threshold search written as batched jnp ops. Each round
    splits the row's interval [lo, hi) into `ways` parts (never below MIN_STEP), compares
    every entry with the ways-1 cut points and each count with k, all rows (heads, batch) at
    once; ceil(bits / log2(ways)) rounds, so the number of message rounds does not grow with
    heads (SPU's secret lax.top_k works row by row). Entries left inside the final interval,
    within (max - min) / 2**bits of the threshold, are ties, given to the earliest positions
    by a prefix sum (local under MPC), so the count is exact: max-pooling plateaus would
    otherwise overflow a fixed-size compacted cache. Nothing is revealed and no secret index
    is formed.
    selector "rank": every pair compared in one batched comparison, each entry's rank counted,
    rank < k: two comparison rounds whatever n is, n^2 comparisons (ABY3, 3 rows: 22 sends
    instead of 261 at n=64, 2.8x the bytes; 10.7x the bytes at n=256).
    selector "auto": "rank" for rows of at most RANK_MAX entries, else "search" (the choice
    depends on the row length only: not on heads or batch).
    selector "lean": "search" with ways=LEAN_WAYS, bits=LEAN_BITS (fewer comparisons).
    selector "wide": "search" with ways=WIDE_WAYS, bits=WIDE_BITS: lean's 256 levels in half
    its rounds (more comparisons per round; the same cut points, so the same mask).
    selector "near": at most k (not exactly): the k highest among the entries within
    NEAR_SPAN of the row max, found in ONE round of NEAR_WAYS parts over [max - NEAR_SPAN,
    max + 1) plus the final comparison; meant for attention logits (what it drops weighs
    less than e^-NEAR_SPAN of the row max).
    selector "topk": the k-th largest value from lax.top_k (SPU: a secret shuffle, then a
    quick-select that opens comparison bits of the shuffled array; rounds grow with rows),
    then the same exact-count tie breaking.
    with_max: also return the row max over `allowed` entries, [..., 1] (-BIG where none is
    allowed): free for "search" and "lean" (their first min/max tree), one max tree otherwise.
    """
    mask, top = _topk(scores, k, allowed, selector, ways, bits)
    if not with_max:
        return mask
    if top is None:
        top = jnp.max(jnp.where(jnp.broadcast_to(allowed, mask.shape), scores, -BIG), axis=-1,
                      keepdims=True)
    return mask, top


def _topk(scores, k, allowed, selector, ways, bits):
    """(topk_mask's mask, the row max over allowed entries [..., 1] or None where the
    selector did not compute it)."""
    n = scores.shape[-1]
    k = min(int(k), n)
    shape = jnp.broadcast_shapes(scores.shape, jnp.shape(allowed))
    if k <= 0:
        return jnp.zeros(shape, bool), None
    allowed = jnp.broadcast_to(allowed, shape)
    masked = jnp.where(allowed, scores, -BIG)
    if selector == "topk":
        kth = jax.lax.top_k(masked, k)[0][..., -1:]
        return _exact_count(masked, masked > kth, masked == kth, allowed, k), None
    if selector == "auto":
        selector = "rank" if n <= RANK_MAX else "search"
    if selector == "rank":
        return _rank_select(masked, allowed, k), None
    if selector == "lean":
        ways, bits = LEAN_WAYS, LEAN_BITS
    if selector == "wide":
        ways, bits = WIDE_WAYS, WIDE_BITS
    if selector == "near":
        return _near(masked, allowed, k)
    # min and max in one reduction (min = -max(-x), exact): one comparison tree, half the
    # message rounds of two
    ends = jnp.max(jnp.stack([masked, jnp.where(allowed, -scores, -BIG)]), axis=-1,
                   keepdims=True)
    lo, top = -ends[1], ends[0]
    # invariant: count(masked >= lo) >= k (if k entries are allowed); count(masked >= lo +
    # span) < k. The span is clamped ONCE (one comparison, not one per round) so that the
    # last round's step is at least MIN_STEP: a step under one fixed-point ulp would round to
    # zero and collapse the interval (the invariant holds for any span >= max - min)
    rounds = -(-bits // max(1, int(math.log2(ways))))
    span = jnp.maximum(top + 1.0 - lo, MIN_STEP * float(ways) ** rounds)          # [..., 1]
    parts = jnp.arange(1, ways, dtype=scores.dtype)                              # [ways-1]
    for r in range(rounds):
        step = span * (1.0 / float(ways) ** (r + 1))                              # [..., 1]
        cuts = lo + step * parts                                                  # [..., w-1]
        counts = jnp.sum(masked[..., None, :] >= cuts[..., :, None], axis=-1)     # [..., w-1]
        passed = jnp.sum(counts >= k, axis=-1, keepdims=True).astype(scores.dtype)
        lo = lo + passed * step
    return _final_interval(masked, lo, step, allowed, k), top


def _final_interval(masked, lo, step, allowed, k):
    """The entries above [lo, lo + step) and the earliest inside it, k at most, from ONE
    comparison of every entry with both ends (a single message round)."""
    ge = masked[..., :, None] >= jnp.concatenate([lo, lo + step], axis=-1)[..., None, :]
    above = ge[..., 1]
    return _exact_count(masked, above, jnp.logical_and(ge[..., 0], jnp.logical_not(above)),
                        allowed, k)


def _near(masked, allowed, k):
    """The "near" selector: (mask of at most k entries, the row max [..., 1])."""
    top = jnp.max(masked, axis=-1, keepdims=True)
    lo = top - NEAR_SPAN
    step = (NEAR_SPAN + 1.0) / NEAR_WAYS
    cuts = lo + step * jnp.arange(1, NEAR_WAYS, dtype=masked.dtype)              # [..., w-1]
    counts = jnp.sum(masked[..., None, :] >= cuts[..., :, None], axis=-1)
    lo = lo + jnp.sum(counts >= k, axis=-1, keepdims=True).astype(masked.dtype) * step
    # count(>= lo + step) < k; the band [lo, lo + step) fills the rest, earliest first
    return _final_interval(masked, lo, step, allowed, k), top


def _rank_select(masked, allowed, k):
    """The k highest by rank: entry i's rank is the number of entries ordered before it
    (higher score, or an equal score at an earlier position), from ONE batched comparison of
    every pair (n^2 comparisons, a constant number of message rounds however large n is);
    rank < k is a second comparison. Same mask as "topk" (ties to the earliest positions).
    masked: [..., n], disallowed entries at -BIG."""
    n = masked.shape[-1]
    ge = masked[..., None, :] >= masked[..., :, None]          # [..., i, j]: s_j >= s_i
    earlier = jnp.tril(jnp.ones((n, n), bool), -1)              # j < i (public)
    # j before i: s_j >= s_i if j < i, s_j > s_i (= not s_i >= s_j) if j > i; never i itself
    before = jnp.where(earlier, ge, jnp.logical_not(jnp.swapaxes(ge, -1, -2)))
    rank = jnp.sum(before.astype(jnp.int32), axis=-1)
    return jnp.logical_and(rank < k, allowed)


def _exact_count(masked, above, ties, allowed, k):
    """above | the earliest ties, exactly k in all (a prefix sum: local under MPC)."""
    above = jnp.logical_and(above, allowed)
    ties = jnp.logical_and(ties, allowed)
    room = k - above.sum(axis=-1, keepdims=True)
    take = jnp.logical_and(ties, jnp.cumsum(ties.astype(jnp.int32), axis=-1) <= room)
    return jnp.logical_or(above, take)
