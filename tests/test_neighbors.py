"""Neighbour dilation of MPCache's level-2 selection (eviction.neighbors)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eviction import make_policy, policy_from_spec
from eviction.clusters import cluster_candidates, init_bounds
from eviction.slices import candidates
from eviction.neighbors import dilate, select, shift, tops
from mpc_llama.errors import ConfigError


def test_shift_and_dilate_by_hand():
    m = jnp.array([[1, 0, 0, 1, 0, 0, 0, 1]], bool)
    assert shift(m, 1).astype(int).tolist() == [[0, 1, 0, 0, 1, 0, 0, 0]]
    assert shift(m, -1).astype(int).tolist() == [[0, 0, 1, 0, 0, 0, 1, 0]]
    assert shift(m, 9).astype(int).tolist() == [[0] * 8]
    assert dilate(m, 2).astype(int).tolist() == [[1, 1, 1, 1, 1, 1, 0, 1]]
    assert dilate(m, 1, 1).astype(int).tolist() == [[1, 1, 1, 1, 1, 0, 1, 1]]
    allowed = jnp.arange(8) < 5
    assert dilate(m, 1, allowed=allowed).astype(int).tolist() == [[1, 1, 0, 1, 1, 0, 0, 0]]
    assert dilate(m, 0).tolist() == m.tolist()
    assert [tops(10, 1), tops(10, 2), tops(10, 1, 1), tops(10, 0)] == [(5, 5), (3, 3), (3, 3),
                                                                      (10, 10)]
    assert tops(10, 1, best=1) == (9, 1) and tops(10, 2, best=2) == (6, 2)
    assert tops(4, 2, best=2) == (2, 1)       # short of slots: fewer get neighbours


def test_best_only_dilates_the_highest():
    scores = jnp.array([[0.0, 5.0, 1.0, 9.0, 2.0, 0.5, 3.0, 0.0]])
    allowed = jnp.ones(8, bool)
    got = select(scores, 4, allowed, allowed, right=1, best=1, selector="rank")
    # top 3 (clusters 3, 6, 1) plus the right neighbour of the best (cluster 4)
    assert np.flatnonzero(np.asarray(got[0])).tolist() == [1, 3, 4, 6]
    got = select(scores, 4, allowed, allowed, right=1, best=0, selector="rank")
    assert np.flatnonzero(np.asarray(got[0])).tolist() == [1, 2, 3, 4]
    tie = jnp.array([[9.0, 9.0, 0.0, 0.0]])
    got = select(tie, 2, jnp.ones(4, bool), jnp.ones(4, bool), right=1, best=1)
    assert int(got.sum()) <= 2


def _select(policy, length=2048, seed=0):
    b, k, g, d = 1, 3, 3, 64
    rng = jax.random.PRNGKey(seed)
    keys = jax.random.normal(rng, (b, k, length, d))
    q = jax.random.normal(jax.random.PRNGKey(seed + 1), (b, k, g, d))
    bounds = init_bounds(keys, length, policy.s1, policy.s2, policy.alpha)
    mask, size, slots = policy.select_clusters(q, keys, bounds, length, length, None)
    return np.asarray(mask), size, slots


@pytest.mark.parametrize("spec", ["mpcache:neighbors=1", "mpcache:neighbors=2",
                                  "mpcache:neighbors=1:neighbors_left=1",
                                  "mpcache:neighbors=1:neighbor_tops=1",
                                  "mpcache:neighbors=2:neighbor_tops=2"])
@pytest.mark.parametrize("budget", [0.05, 0.1, 0.2])
def test_selection_stays_within_the_slots_and_keeps_neighbours(spec, budget):
    pol = policy_from_spec(spec, budget)
    mask, size, slots = _select(pol)
    base, _, _ = _select(policy_from_spec("mpcache", budget))
    n = mask.shape[-1]
    cand, forced = _candidates(pol, 2048, n)
    assert (mask.sum(-1) <= slots).all()
    assert mask[..., forced].all()               # forced clusters (none with forced slices)
    chosen = mask & ~forced
    assert not (chosen & ~cand).any()            # nothing chosen overlaps a forced slice
    # every chosen cluster comes with its right neighbours (those that may be chosen)
    for j in np.argwhere(chosen) if pol.neighbor_tops == 0 else []:
        c = j[-1]
        if c + 1 < n and cand[c + 1] and not mask[tuple(j[:-1]) + (c - 1,)]:   # a run start
            assert mask[tuple(j[:-1]) + (c + 1,)]
    # the best clusters of the plain selection stay selected (the top ones come first); a
    # free slot too few for a cluster and its neighbours chooses nothing
    n_top = tops(slots, pol.neighbors, pol.neighbors_left, pol.neighbor_tops)[0]
    assert mask.sum() >= base.sum() * 0.6 if n_top else not chosen.any()


def _candidates(pol, length, n):
    """(clusters that may be chosen, forced clusters), bool [n] each, for the policy."""
    spans = pol.spans(length)
    if spans is None:
        return map(np.asarray, cluster_candidates(jnp.asarray(length), n, pol.s2, pol.recent))
    return np.asarray(candidates(jnp.asarray(length), n, pol.s2, spans)), np.zeros(n, bool)


def test_neighbors_zero_is_the_plain_selection():
    a, _, _ = _select(make_policy("mpcache", 0.1))
    b, _, _ = _select(make_policy("mpcache", 0.1, neighbors=0, neighbors_left=0))
    assert (a == b).all()
    with pytest.raises(ConfigError, match="neighbors"):
        make_policy("mpcache", 0.1, neighbors=-1)
