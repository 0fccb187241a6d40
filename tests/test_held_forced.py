"""MPCache's held forced rows (SEMI2K): a reusing step attends exactly the forced rows that
`forced_kv` gives, from the rows held at the last selection and the last `refresh` rows."""

import jax.numpy as jnp
import numpy as np
import pytest

from eviction import make_policy


def _valid_values(keys, ok):
    """Sorted first feature of the attended rows (each row's position + 1 below)."""
    return sorted(np.asarray(keys)[0, 0, np.asarray(ok)[0, 0], 0].tolist())


def _cache(capacity, length):
    """k [1, 1, capacity, 2]: row j holds j + 1 where written (j < length), -7 elsewhere
    (rows not yet written hold whatever: a held row past its selection must not be read)."""
    pos = np.arange(capacity)
    k = np.where(pos < length, pos + 1.0, -7.0).astype(np.float32)
    k = np.stack([k, -k], -1)[None, None]
    return jnp.asarray(k)


# capacities in whole clusters, as build_cache rounds them (s1 = s2 here); some shorter
# than the recent window (zero rows padded)
@pytest.mark.parametrize("s2,refresh,capacity", [(4, 3, 40), (4, 4, 40), (8, 5, 16),
                                                 (8, 5, 8), (2, 2, 10), (16, 16, 112),
                                                 (4, 2, 4)])
def test_held_and_live_rows_are_the_forced_rows(s2, refresh, capacity):
    policy = make_policy("mpcache", 0.5, s2=s2, s1=s2, refresh=refresh, warmup=0,
                         split_kept=True)
    assert policy.holds_forced
    for selected in range(1, capacity + 1):     # the length at the selecting step
        held = policy.hold_forced(_cache(capacity, selected), _cache(capacity, selected) * 2,
                                  jnp.asarray(selected))
        for length in range(selected, min(selected + refresh, capacity + 1)):
            k = _cache(capacity, length)
            want_k, _, want_ok = policy.forced_kv(k, k * 2, jnp.asarray(length))
            live_k, live_v, ok = policy.forced_from_held(k, k * 2, jnp.asarray(length))
            got = jnp.concatenate([held[0], live_k], axis=2)
            assert _valid_values(got, ok) == _valid_values(want_k, want_ok), (selected, length)
            assert np.array_equal(np.asarray(jnp.concatenate([held[1], live_v], axis=2)),
                                  2 * got)
            assert min(_valid_values(got, ok) or [1]) > 0   # no stale row attended


def test_held_only_where_it_saves():
    """Held rows only under split_kept (SEMI2K) with a kept selection of K/V rows; the
    plaintext policy's state is unchanged."""
    keys = jnp.zeros((1, 2, 64, 8))
    plain, semi2k = (make_policy("mpcache", 0.1, split_kept=x) for x in (False, True))
    assert semi2k.holds_forced and not plain.holds_forced
    assert not make_policy("mpcache", 0.1, split_kept=True, refresh=1).holds_forced
    assert not make_policy("mpcache", 0.1, split_kept=True, kept="onehot").holds_forced
    # held after the compact rows, in the same arrays (one Beaver-cached matmul operand)
    rows = [[a.shape[2] for a in p.init_state(keys, 64, 640)] for p in (plain, semi2k)]
    nb = plain.n_bounds
    assert rows[1][nb + 1] - rows[0][nb + 1] == (1 + semi2k.recent) * semi2k.s2
    assert len(rows[0]) == len(rows[1])
