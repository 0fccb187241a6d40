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


def tops(slots: int, right: int, left: int = 0) -> int:
    """Clusters to choose by top-k so that, each with `right` + `left` neighbours, they fill at
    most `slots` slots (public)."""
    return slots // (1 + right + left)


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
