"""Forced slices (eviction.slices) and MPCache's budget with them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eviction import make_policy
from eviction.mpcache import MPCache
from eviction.slices import Spans, candidates, entry_mask, put, take, valid, window_rows
from eviction.topk import BIG
from mpc_llama.errors import ConfigError


@pytest.mark.parametrize("length", [3, 20, 40, 63, 64])
def test_take_and_put_are_inverse_on_the_slice_entries(length):
    """take picks entries [0, sink) and [length - window, length); put writes them back,
    zero elsewhere and where an entry is not valid (a short cache's window repeating the
    sink, entries beyond the cache)."""
    spans, cap = Spans(8, 12), 64
    x = jnp.arange(cap, dtype=jnp.float32) + 1.0
    got = np.asarray(take(x[None], jnp.asarray(length), spans))[0]
    ok = np.asarray(valid(jnp.asarray(length), cap, spans))
    want_pos = set(range(min(8, length))) | set(range(max(8, length - 12), length))
    assert {int(v) - 1 for v, o in zip(got, ok) if o} == want_pos
    assert ok.sum() == len(want_pos)
    back = np.asarray(put(jnp.asarray(got)[None], jnp.asarray(length), spans, cap))[0]
    np.testing.assert_array_equal(back, np.where(np.isin(np.arange(cap), list(want_pos)),
                                                 np.asarray(x), 0.0))
    mask = np.asarray(entry_mask(jnp.asarray(length), cap, spans))
    assert set(np.flatnonzero(mask)) == want_pos


@pytest.mark.parametrize("length", [40, 63, 64, 100, 128])
def test_candidates_lie_between_the_sink_and_the_window(length):
    spans, size, n = Spans(16, 20), 16, 8
    cand = np.asarray(candidates(jnp.asarray(length), n, size, spans))
    forced = np.asarray(entry_mask(jnp.asarray(length), n * size, spans))
    for j in range(n):
        entries = np.arange(j * size, (j + 1) * size)
        full = (j + 1) * size <= length
        assert cand[j] == (full and not forced[entries].any())


def test_window_rows_hold_the_window_for_one_max():
    spans, cap = Spans(4, 10), 32
    s = jnp.asarray(np.random.default_rng(0).normal(size=(2, cap)), jnp.float32)
    rows = np.asarray(window_rows(s, jnp.asarray(30), spans, 8))
    assert rows.shape == (2, 2, 8)
    np.testing.assert_allclose(rows.max(axis=(-1, -2)), np.asarray(s)[:, 20:30].max(-1))
    assert (rows.reshape(2, -1)[:, 10:] == -BIG).all()


@pytest.mark.parametrize("prompt", [500, 2048, 4096, 8192])
@pytest.mark.parametrize("s2", [16, 32])
def test_slices_fill_the_budget_exactly(prompt, s2):
    """Sink (one cluster) + window + chosen clusters attend exactly n_attend entries, the
    window between s2 and 2 s2 of them (short prompts: what the sink leaves), as many
    clusters chosen as with forced clusters (whose current cluster holds 1 entry after a
    prompt of whole clusters)."""
    pol = MPCache(budget=0.1, s2=s2, refresh=1)
    spans, m = pol.spans(prompt), pol.free_slots(prompt)
    assert pol.slices and spans.sink == s2
    assert spans.sink + spans.window + m * s2 == pol.n_attend(prompt)
    if pol.n_attend(prompt) >= 2 * s2:
        assert s2 <= spans.window < 2 * s2
        old = MPCache(budget=0.1, s2=s2, forced="clusters", refresh=1)
        assert old.spans(prompt) is None and old.free_slots(prompt) == m
    else:
        assert m == 0 and spans.window == pol.n_attend(prompt) - s2


def test_forced_setting_is_checked():
    assert not MPCache(refresh=2).slices and MPCache(refresh=2, forced="clusters").refresh == 2
    with pytest.raises(ConfigError, match="forced=slices needs refresh=1"):
        MPCache(refresh=2, forced="slices")
    with pytest.raises(ConfigError, match="forced must be one of"):
        make_policy("mpcache", 0.1, forced="window")


@pytest.mark.parametrize("gather", ["scores", "kv"])
@pytest.mark.parametrize("length", [200, 255, 256])
def test_slices_attention_equals_masked_attention(gather, length):
    """The decode step's attention with forced slices (scores gathered by the one-hot,
    slices appended) equals attention over the whole cache under the attended mask, and
    the attended mask is the chosen clusters, the sink and the window."""
    from eviction.attention import attended_mask, decode_attention
    from mpc_llama.config import preset
    from mpc_llama.model import attend

    cfg = preset("tiny").replace(n_heads=4, n_kv_heads=2, head_dim=8)
    rng = np.random.default_rng(length)
    cap = 256
    q = jnp.asarray(rng.normal(size=(1, 1, 4, 8)), jnp.float32)
    ck, cv = (jnp.asarray(rng.normal(size=(1, 2, cap, 8)), jnp.float32) for _ in range(2))
    pol = make_policy("mpcache", 0.2, s2=16, gather=gather, refresh=1)
    n = jnp.asarray(length)
    out, selection, count = decode_attention(q, ck, cv, (), n, pol, 240, cfg)
    mask = attended_mask(selection, jnp.arange(cap) < n, ck.shape[:3])
    want = attend(q, ck, cv, mask[:, :, None, None, :], cfg)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)
    m = np.asarray(mask)
    spans = pol.spans(240)
    forced = np.asarray(entry_mask(n, cap, spans))
    assert (m[..., forced]).all() and (np.asarray(count) == m.sum(-1)).all()
    assert m.sum(-1).max() <= pol.n_attend(240)
    chosen = m & ~forced
    assert (chosen.reshape(1, 2, -1, 16).all(-1) == chosen.reshape(1, 2, -1, 16).any(-1)).all()
    assert (chosen.reshape(1, 2, -1, 16).any(-1).sum(-1) == pol.free_slots(240)).all()


def test_every_step_selection_uses_slices_and_the_published_setting_keeps_forced_clusters():
    """`mpcache:refresh=1` attends sink + window as slices; `mpcache_published` keeps the
    paper's form (first and current clusters in the one-hot: k2 rows, no spans); the default
    (a kept selection) forces first, previous and current clusters."""
    from eviction import policy_from_spec

    every, paper = (policy_from_spec(s, 0.1) for s in ("mpcache:refresh=1", "mpcache_published"))
    assert every.slices and every.spans(2048) is not None
    assert not paper.slices and paper.spans(2048) is None
    assert paper.free_slots(2048) == paper.k2(2048) - 1 - paper.recent
    default = policy_from_spec("mpcache", 0.1)
    assert not default.slices and default.spans(2048) is None and default.recent == 2
