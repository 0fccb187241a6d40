"""Neighbour dilation of a cluster selection: keep what a chosen cluster starts.

A needle rarely ends where a 16-entry cluster does: on natural text the cluster that scores
highest holds the cue words and the start of the answer ("... the code is 148"), and the next
cluster, holding the rest ("35."), scores like the haystack around it. Selecting each chosen
cluster's right neighbours as well keeps the continuation.

Under MPC this is local: the mask is shifted by public amounts and OR-ed (a logical OR of
shares: one AND gate per entry, no comparison, no secret index), so it adds no top-k and no
comparison round. The slot count stays public: `tops(slots, right, left)` chosen clusters
dilated by right+left neighbours fill at most slots entries of the fixed compaction; where
dilations overlap, the unused slots stay empty.
"""

from __future__ import annotations

import jax.numpy as jnp

from eviction.base import BIG, topk_mask


def tops(slots: int, right: int, left: int = 0, best: int = 0):
    """(clusters chosen by top-k, how many of the highest get neighbours) so that, with
    `right` + `left` neighbours each, they fill at most `slots` slots (public). best = 0: all
    chosen ones get neighbours; else the `best` highest (fewer if the slots are short)."""
    width = right + left
    if best == 0 or width == 0:
        n = slots // (1 + width)
        return n, n
    n_best = min(best, slots // (1 + width))
    return slots - n_best * width, n_best


def select(scores, slots: int, allowed, within, right: int, left: int = 0, best: int = 0,
           selector: str = "search", with_max: bool = False):
    """The top clusters of `scores` [..., n] among `allowed` with their neighbours, at most
    `slots` in all, AND `within` (the clusters that hold entries).

    best = 0: every chosen cluster gets its neighbours (tops(...) of them chosen);
    best = 1: only the highest does, found by one max (n - 1 comparisons and n equalities,
              not a second top-k), the other slots go to the plain top-k;
    best > 1: the `best` highest do, by a second top-k.
    with_max: also return the max of `scores` over `allowed` [..., 1] (topk_mask's)."""
    n_top, n_best = tops(slots, right, left, best)
    chosen = topk_mask(scores, n_top, allowed, selector, with_max=with_max)
    if with_max:
        chosen, top = chosen
    done = (lambda m: (m, top)) if with_max else (lambda m: m)
    if right + left == 0 or n_best == 0:
        return done(chosen)
    if n_best == n_top:
        return done(dilate(chosen, right, left, within))
    if n_best == 1:
        masked = jnp.where(allowed, scores, -BIG)
        best_mask = jnp.logical_and(masked >= masked.max(axis=-1, keepdims=True), allowed)
        best_mask = jnp.logical_and(best_mask, jnp.cumsum(best_mask.astype(jnp.int32),
                                                          axis=-1) <= 1)  # ties
    else:
        best_mask = topk_mask(scores, n_best, allowed, selector)
    return done(jnp.logical_or(chosen, dilate(best_mask, right, left, within)))


def shift(mask: jnp.ndarray, by: int) -> jnp.ndarray:
    """mask [..., n] moved `by` clusters along the last axis (right if by > 0), zero-filled."""
    n = mask.shape[-1]
    if by == 0:
        return mask
    if abs(by) >= n:
        return jnp.zeros_like(mask)
    pad = jnp.zeros(mask.shape[:-1] + (abs(by),), mask.dtype)
    if by > 0:
        return jnp.concatenate([pad, mask[..., :n - by]], axis=-1)
    return jnp.concatenate([mask[..., -by:], pad], axis=-1)


def dilate(mask: jnp.ndarray, right: int, left: int = 0, allowed=None) -> jnp.ndarray:
    """mask OR its shifts by 1..right clusters to the right and 1..left to the left, AND
    `allowed` (e.g. clusters that hold entries). bool [..., n] -> bool [..., n]."""
    out = mask
    for by in list(range(1, right + 1)) + [-b for b in range(1, left + 1)]:
        out = jnp.logical_or(out, shift(mask, by))
    return out if allowed is None else jnp.logical_and(out, allowed)
