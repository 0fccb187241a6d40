"""Eviction policies in plaintext: hand-computed pieces, budgets, sharing, validation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eviction import POLICIES, make_policy, policy_from_spec
from eviction.base import topk_mask
from eviction.clusters import bounds_of, cluster_candidates, init_bounds, khat, update_bounds
from eviction.slices import candidates
from eviction.mpcache import MPCache
from eviction.quest import quest_bound
from eviction.sharing import share_source
from mpc_llama.config import preset
from mpc_llama.errors import ConfigError
from mpc_llama.generation import greedy_generate
from mpc_llama.model import decode_step, init_params, prefill

T = 200


@pytest.fixture(scope="module")
def six_layers():
    cfg = preset("tiny").replace(n_layers=6, max_seq_len=512)
    return cfg, init_params(cfg, jax.random.PRNGKey(1), scale=0.3)


def test_cluster_bounds_by_hand():
    keys = jnp.asarray([[1., -1.], [3., 0.], [2., 5.], [-4., 1.]])[None, None]
    kmax, kmin = bounds_of(keys, length=4, size=2)
    np.testing.assert_array_equal(kmax[0, 0], [[3, 0], [2, 5]])
    np.testing.assert_array_equal(kmin[0, 0], [[1, -1], [-4, 1]])
    kmax, kmin = bounds_of(keys, length=3, size=2)  # entry 3 not written yet
    np.testing.assert_array_equal(kmax[0, 0, 1], [2, 5])
    np.testing.assert_array_equal(kmin[0, 0, 1], [2, 5])


def test_incremental_bounds_equal_recomputed():
    keys = jax.random.normal(jax.random.PRNGKey(0), (1, 2, 64, 4))
    b = init_bounds(keys, 40)
    for i in range(40, 64):
        b = update_bounds(b, keys[:, :, i], i)
    for got, want in zip(b, init_bounds(keys, 64)):
        np.testing.assert_allclose(got, want)


@pytest.mark.parametrize("s1,s2", [(32, 16), (32, 8), (16, 16)])
@pytest.mark.parametrize("length", [64, 40, 17, 0])
def test_level1_bounds_from_children_equal_direct(s1, s2, length):
    """init_bounds' level-1 bounds (from the level-2 ones) equal the max/min over the level-1
    cluster's own entries, partly filled and empty clusters included."""
    keys = jax.random.normal(jax.random.PRNGKey(2), (1, 2, 64, 4))
    rmax2, rmin2, rmax1, rmin1, khat2, khat1 = init_bounds(keys, length, s1, s2, 0.6)
    want_max, want_min = bounds_of(keys, length, s1)
    np.testing.assert_array_equal(rmax1, want_max)
    np.testing.assert_array_equal(rmin1, want_min)
    np.testing.assert_array_equal(khat1, khat(want_max, want_min, 0.6))
    assert rmax1.shape == (1, 2, 64 // s1, 4) and rmax2.shape == (1, 2, 64 // s2, 4)


def test_similarity_is_linear_in_q():
    q = jnp.asarray([1.0, 2.0])
    rmax, rmin = jnp.asarray([3.0, 0.0]), jnp.asarray([1.0, -1.0])
    k = khat(rmax, rmin, 0.6)
    np.testing.assert_allclose(k, [2.2, -0.4])
    assert float(q @ k) == pytest.approx(1.4)
    assert float(q @ k) == pytest.approx(0.6 * float(q @ rmax) + 0.4 * float(q @ rmin))


@pytest.mark.parametrize("softmax", ["exact", "clipped"])
def test_h2o_chunked_scores_equal_one_shot(monkeypatch, softmax):
    """H2O's query-chunked accumulated attention (keys past a chunk skipped) equals the sum
    over all queries of one causal t x t softmax; t not a multiple of the chunk."""
    from eviction import h2o
    from eviction.base import group_probs
    from mpc_llama import nonlinear

    cfg = preset("tiny").replace(softmax=softmax)
    rng = np.random.default_rng(3)
    t = 45
    q = jnp.asarray(rng.normal(size=(2, t, cfg.n_kv_heads, cfg.group_size, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, cfg.n_kv_heads, t, 8)), jnp.float32)
    causal = jnp.tril(jnp.ones((t, t), bool))
    want = group_probs(q, k, causal, nonlinear.SOFTMAX[softmax]).sum(axis=2)
    monkeypatch.setattr(h2o, "QUERY_CHUNK", 16)
    got = h2o.H2O(budget=0.2).static_scores(q, k, cfg)
    assert got.shape == (2, cfg.n_kv_heads, t)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(got - want).max()) < 1e-4 and float(got.sum()) > 0


def test_quest_bound_is_never_below_a_true_score():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, 2, 3, 8)), jnp.float32)       # [b, k, g, d]
    keys = jnp.asarray(rng.normal(size=(1, 2, 64, 8)), jnp.float32)   # [b, k, c, d]
    rmax, rmin = bounds_of(keys, 64, 16)
    bound = np.asarray(quest_bound(q, rmax, rmin))                     # [b, k, pages]
    true = np.einsum("bkgd,bkcd->bkc", q, keys).reshape(1, 2, 4, 16)  # summed over g
    per_head = np.einsum("bkgd,bkcd->bkgc", q, keys).reshape(1, 2, 3, 4, 16).max(-1).sum(2)
    assert (bound >= true.max(-1) - 1e-5).all()
    assert (bound >= per_head - 1e-5).all()


@pytest.mark.parametrize("length", [64, 57])
def test_quest_split_bound_equals_the_elementwise_max(length):
    """relu(q) . r_max + min(q, 0) . r_min = sum_d max(q_d r_max, q_d r_min) on filled pages
    (the last one partly filled when length = 57)."""
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(2, 2, 3, 8)), jnp.float32)
    keys = jnp.asarray(rng.normal(size=(2, 2, 64, 8)), jnp.float32)
    rmax, rmin = bounds_of(keys, length, 16)
    split = np.asarray(quest_bound(q, rmax, rmin, "split"))
    literal = np.asarray(quest_bound(q, rmax, rmin, "max"))
    np.testing.assert_allclose(split, literal, rtol=1e-5, atol=1e-5)
    assert np.ptp(split) > 1.0  # not a constant


def test_forced_clusters_and_candidates():
    cand, forced = cluster_candidates(jnp.asarray(40), 4, 16)
    np.testing.assert_array_equal(forced, [True, False, True, False])  # sink, current (39//16)
    np.testing.assert_array_equal(cand, [False, True, False, False])  # full, not forced


def test_topk_mask_respects_allowed():
    s = jnp.asarray([5., 1., 4., 3., 2.])
    allowed = jnp.asarray([False, True, True, True, True])
    np.testing.assert_array_equal(topk_mask(s, 2, allowed), [False, False, True, True, False])
    assert not topk_mask(s, 0, allowed).any()


def test_k1_k2_formulas():
    p = MPCache.with_static(0.1)
    assert p.n_attend(1000) == 100
    assert p.k2(1000) == 3                # floor(100 / 32)
    assert MPCache.published(0.1).k2(1000) == 6   # the paper's clusters of 16
    assert p.static_keep(1000) == 500     # static ratio max(0.5, 2 * budget)
    assert p.k1(1000, n1=100) == 8        # ratio1 * ceil(500 / 32) = 0.5 * 16
    assert p.k1(1000, n1=5) == 5          # capped by the clusters that exist
    assert MPCache(budget=0.1).k1(1000, n1=100) == 16   # no static step: 0.5 * ceil(1000 / 32)
    assert MPCache(budget=0.05, s2=16, refresh=1).k2(1000) == 3
    assert MPCache(budget=0.05, s2=8, refresh=1).k2(1000) == 6     # floor(50 / 8)
    # a kept selection forces three clusters and chooses at least one
    assert MPCache(budget=0.05, s2=16).k2(1000) == 4 and MPCache(budget=0.05, s2=8).k2(1000) == 6
    assert MPCache().share == "none" and MPCache.shared().share == "pairs"
    assert MPCache(budget=0.4, static_ratio=None).static_keep(1000) == 800
    assert MPCache(budget=0.4).static_keep(1000) == 1000   # default: no static step


def test_sharing_pattern():
    assert [share_source("pairs", i, 8) for i in range(8)] == [0, 1, 2, 2, 4, 4, 6, 7]
    skipped = [i for i in range(32) if share_source("pairs", i, 32) != i]
    assert skipped == list(range(3, 30, 2)) and len(skipped) == 14
    assert [share_source("none", i, 8) for i in range(8)] == list(range(8))


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_budgets_honoured(six_layers, name):
    cfg, params = six_layers
    policy = make_policy(name, 0.25)
    toks = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, T)))
    _, cache = prefill(params, cfg, toks, T + 3, policy=policy)
    keep = policy.static_keep(T)
    assert int(cache.length) == (T if keep is None else keep)
    n_attend = policy.n_attend(T)
    for step in range(3):
        _, cache, counts = decode_step(params, cfg, toks[:, step], T + step, cache, policy, T,
                                       return_attended=True)
        counts = np.asarray(counts)
        if name == "full":
            assert (counts == T + step + 1).all()
        elif name == "oracle":                   # the budget + the generated entries
            assert (counts == n_attend + step + 1).all()
        elif policy.dynamic and keep is None:   # quest: whole pages within the budget
            assert (counts <= n_attend).all() and (counts > 0).all()
        elif policy.dynamic:                     # mpcache: k2 clusters of s2 entries at most
            assert (counts <= policy.k2(T) * policy.s2).all()
        else:                                    # static: kept prompt entries + generated ones
            assert (counts == n_attend + step + 1).all()


def test_static_eviction_keeps_forced_and_compacts_in_order(six_layers):
    cfg, params = six_layers
    policy = make_policy("snapkv", 0.25)
    toks = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (1, T)))
    _, full = prefill(params, cfg, toks, T)
    _, cache = prefill(params, cfg, toks, T, policy=policy)
    n = int(cache.length)
    pos = np.asarray(cache.pos)[:, 0, :, :n]                    # [L, K, n]
    assert (np.diff(pos, axis=-1) > 0).all()                    # position order
    assert set(range(T - policy.window, T)) <= set(pos[0, 0])   # window forced
    # kept keys are exactly the original (post-RoPE) keys of those positions
    for layer in (0, 3):
        for h in range(cfg.n_kv_heads):
            np.testing.assert_allclose(cache.k[layer, 0, h, :n], full.k[layer, 0, h, pos[layer, h]],
                                       rtol=1e-5, atol=1e-5)


def test_mpcache_layers_share_static_and_dynamic_selection(six_layers):
    cfg, params = six_layers
    policy = MPCache.with_static(0.25)
    toks = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (1, T)))
    _, cache = prefill(params, cfg, toks, T + 1, policy=policy)
    pos = np.asarray(cache.pos)
    np.testing.assert_array_equal(pos[3], pos[2])   # layer 3 reuses layer 2's kept set
    assert (pos[1] != pos[0]).any() or (pos[2] != pos[1]).any()


def test_mpcache_selects_the_cluster_the_query_points_at():
    """Hand-built cache: 8 clusters of 16; keys of cluster 5 align with q, others oppose it."""
    c = 128
    u = jnp.asarray([1.0, 0.0, 0.0, 0.0])
    keys = jnp.tile(-u, (c, 1)).at[80:96].set(u)[None, None]   # [1, 1, c, d]
    policy = MPCache(budget=0.5, s1=32, s2=16, static_ratio=None)   # k2 = 4 clusters, k1 = 3
    bounds = init_bounds(keys, c, alpha=policy.alpha)
    q = u[None, None, None]                                      # [1, 1, 1, d]
    mask = np.asarray(policy.select(q, keys, bounds, jnp.asarray(c), prompt_len=c, cfg=None))[0, 0]
    chosen = {i // 16 for i in np.flatnonzero(mask)}
    assert {0, 7, 5} <= chosen                                   # sink, current, best
    assert len(chosen) <= policy.k2(c)


@pytest.mark.parametrize("length", [128, 121])
def test_mpcache_bound_score_without_level1_pruning_selects_quests_pages(length):
    """score2="bound" with every level-1 cluster kept (ratio1=1) is Quest over pages of s2:
    same scores, same candidates, same k. With level-1 pruning (score1 either way) the
    choice stays inside the kept level-1 clusters."""
    rng = np.random.default_rng(4)
    keys = jnp.asarray(rng.normal(size=(2, 2, 128, 8)), jnp.float32)
    q = jnp.asarray(rng.normal(size=(2, 2, 3, 8)), jnp.float32)
    bounds = init_bounds(keys, length, 32, 16)
    sel = lambda pol: np.asarray(pol.select(q, keys, bounds, jnp.asarray(length),
                                            prompt_len=length, cfg=None))
    quest = sel(make_policy("quest", 0.5, page=16))
    # forced clusters (first and current), as Quest's pages
    mp = sel(MPCache(budget=0.5, ratio1=1.0, score2="bound", s2=16, forced="clusters",
                     refresh=1))
    np.testing.assert_array_equal(mp, quest)
    assert not np.array_equal(sel(MPCache(budget=0.5, ratio1=1.0, score2="khat", s2=16,
                                          refresh=1)), quest)
    mix = MPCache(score1="mix", score2="mix")
    for level in (1, 2):                                          # mix = khat sim + bound
        parts = [MPCache(score1=f, score2=f).cluster_score(q, bounds, level)
                 for f in ("khat", "bound")]
        np.testing.assert_allclose(mix.cluster_score(q, bounds, level), parts[0] + parts[1],
                                   rtol=1e-5, atol=1e-5)
    for score1 in ("khat", "bound"):
        pol = MPCache(budget=0.5, ratio1=0.25, score1=score1, score2="bound", s2=16,
                      forced="clusters")
        sim1 = np.asarray(pol.cluster_score(q, bounds, 1))
        m = sel(pol).reshape(2, 2, 4, 32).any(-1)                 # level-1 clusters touched
        assert m.sum(-1).max() <= pol.k1(length, 4)
        cand, forced = map(np.asarray, cluster_candidates(jnp.asarray(length), 4, 32))
        assert pol.k1(length, 4) - 2 == 1                        # one level-1 pick + forced
        best = np.where(cand, sim1, -np.inf).argmax(-1)           # top level-1 candidate
        outside = m & ~forced & (np.arange(4) != best[..., None])
        assert not outside.any()


def test_oracle_equals_full_at_full_budget(six_layers):
    cfg, params = six_layers
    prompt = list(np.random.default_rng(3).integers(0, cfg.vocab_size, 60))
    full = greedy_generate(params, cfg, prompt, 6, policy=make_policy("full"))
    oracle = greedy_generate(params, cfg, prompt, 6, policy=make_policy("oracle", 1.0))
    assert oracle.tokens == full.tokens
    assert full.attended_fraction == pytest.approx(1.0)


@pytest.mark.parametrize("build,message", [
    (lambda: make_policy("mpcache", 0.0), "budget"),
    (lambda: make_policy("snapkv", 1.5), "budget"),
    (lambda: MPCache(budget=0.3, static_ratio=0.2), "below the budget"),
    (lambda: MPCache(static_ratio=0.0), "static_ratio"),
    (lambda: MPCache(ratio1=1.2), "ratio1"),
    (lambda: MPCache(s1=32, s2=12), "must divide"),
    (lambda: MPCache(share="odd"), "sharing pattern"),
    (lambda: MPCache(gather="rows"), "gather"),
    (lambda: make_policy("quest", 0.1, selector="sort"), "selector"),
    (lambda: make_policy("quest", 0.1, bound="min"), "bound"),
    (lambda: make_policy("mpcache", 0.1, score1="max"), "score1"),
    (lambda: make_policy("lru"), "unknown policy"),
    (lambda: make_policy("h2o", 0.1, alpha=0.5), "no setting"),
])
def test_bad_settings_fail_at_construction(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


def test_rank_selector_equals_topk_with_ties():
    """Pairwise ranks select exactly what lax.top_k + earliest ties does, ties and disallowed
    entries included, and fewer allowed entries than k."""
    rng = np.random.default_rng(11)
    s = jnp.asarray(rng.integers(0, 5, size=(4, 3, 40)), jnp.float32)   # many ties
    for k, p in ((7, 0.3), (25, 0.5), (39, 0.9)):
        allowed = jnp.asarray(rng.random(40) > p)
        want = np.asarray(topk_mask(s, k, allowed, "topk"))
        got = np.asarray(topk_mask(s, k, allowed, "rank"))
        np.testing.assert_array_equal(got, want)
        assert (got.sum(-1) == min(k, int(allowed.sum()))).all()


def test_auto_selector_switches_on_row_length():
    from eviction import topk as base

    s = jnp.arange(8.0)
    m = base.topk_mask(s, 3, jnp.ones(8, bool), "auto")
    np.testing.assert_array_equal(m, np.arange(8) >= 5)
    with jax.disable_jit():  # which kernel ran: rank forms an n x n comparison
        calls = []
        orig = base._rank_select
        try:
            base._rank_select = lambda *a: calls.append(1) or orig(*a)
            n = base.RANK_MAX
            base.topk_mask(s, 3, jnp.ones(8, bool), "auto")                          # ranked
            base.topk_mask(jnp.zeros((1, 3, n)), 3, jnp.ones(n, bool), "auto")      # ranked
            base.topk_mask(jnp.zeros((1, 3, n + 1)), 3, jnp.ones(n + 1, bool), "auto")  # searched
            base.topk_mask(jnp.zeros((4, 32, n)), 3, jnp.ones(n, bool), "auto")     # ranked
        finally:
            base._rank_select = orig
    assert calls == [1, 1, 1]  # heads and batch size do not change the kernel
    assert MPCache().selector == "lean" and make_policy("quest", 0.1).selector == "search"
    assert MPCache.published().selector == "auto"


def test_topk_mask_is_exact_under_ties():
    s = jnp.asarray([[3., 7., 7., 7., 1., 7.]])
    m = topk_mask(s, 2, jnp.ones(6, bool))
    np.testing.assert_array_equal(m[0], [False, True, True, False, False, False])
    m = topk_mask(s, 5, jnp.ones(6, bool))
    assert int(m.sum()) == 5 and not bool(m[0, 4])


@pytest.mark.parametrize("heads", ["max", "sum", "norm"])
@pytest.mark.parametrize("forced", ["clusters", "slices"])
@pytest.mark.parametrize("length", [128, 121])
def test_mpcache_exact_score_picks_the_clusters_with_the_highest_group_score(length, forced,
                                                                             heads):
    """score2="exact": each level-2 cluster scored by the max over its entries of q . k
    combined over the KV group's query heads (score_heads: their max, their sum, or each
    head's score less its max over the valid cache, then the max); the top free_slots
    candidates are chosen (no
    level-1 pruning), plus the first and current clusters (forced clusters) or nothing
    (forced slices: attention adds them; the candidates lie between them); the same with
    the step's scores passed in."""
    rng = np.random.default_rng(7)
    keys = jnp.asarray(rng.normal(size=(2, 2, 128, 8)), jnp.float32)
    q = jnp.asarray(rng.normal(size=(2, 2, 3, 8)), jnp.float32)
    bounds = init_bounds(keys, length, 32, 16)
    pol = MPCache(budget=0.5, score2="exact", s2=16, forced=forced, score_heads=heads,
                  refresh=1)
    mask, size, slots = pol.select_clusters(q, keys, bounds, jnp.asarray(length), length, None)
    each = np.einsum("bkgd,bkcd->bkgc", np.asarray(q), np.asarray(keys)) / np.sqrt(8)
    if heads == "norm":
        each = each - each[..., :length].max(-1, keepdims=True)
    combined = each.sum(2) if heads == "sum" else each.max(2)
    per = combined.reshape(2, 2, 8, 16).max(-1)
    cand, forced_c = map(np.asarray, cluster_candidates(jnp.asarray(length), 8, 16))
    if forced == "slices":
        spans = pol.spans(length)
        assert spans.sink == 16 and spans.width + 16 * pol.free_slots(length) == \
            pol.n_attend(length)
        cand = np.asarray(candidates(jnp.asarray(length), 8, 16, spans))
        # after the sink, wholly before the window
        assert cand.tolist() == [16 <= 16 * i and 16 * (i + 1) <= length - spans.window
                                 for i in range(8)]
        forced_c = np.zeros(8, bool)
    want = np.zeros((2, 2, 8), bool)
    for b in range(2):
        for h in range(2):
            best = np.argsort(-np.where(cand, per[b, h], -np.inf), kind="stable")
            want[b, h, best[:pol.free_slots(length)]] = True
    np.testing.assert_array_equal(np.asarray(mask), want | forced_c)
    assert size == 16 and pol.free_slots(length) >= 1
    assert slots == (pol.k2(length) if forced == "clusters" else pol.free_slots(length))
    scores = jnp.einsum("bkgd,bkcd->bkgc", q, keys) / np.sqrt(8)
    again = pol.select_clusters(q, keys, bounds, jnp.asarray(length), length, None, scores)[0]
    np.testing.assert_array_equal(np.asarray(again), np.asarray(mask))
    with pytest.raises(ConfigError, match="score1 cannot be exact"):
        MPCache(score1="exact")


@pytest.mark.parametrize("pool", [1, 4, 32])
def test_exact_score_pools_adjacent_entries_before_the_cluster_max(pool):
    """score_pool=p: each cluster's score is the max over its sums of p adjacent entries'
    group-summed scores; p = s2 is q . (sum of the cluster's keys), linear in q."""
    rng = np.random.default_rng(8)
    keys = jnp.asarray(rng.normal(size=(1, 2, 128, 8)), jnp.float32)
    q = jnp.asarray(rng.normal(size=(1, 2, 3, 8)), jnp.float32)
    got = np.asarray(MPCache(score_pool=pool, score_heads="sum").exact_score(q, keys))
    per = np.einsum("bkgd,bkcd->bkc", np.asarray(q), np.asarray(keys)) / np.sqrt(8)
    want = per.reshape(1, 2, 4, 32 // pool, pool).sum(-1).max(-1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if pool == 32:
        lin = np.einsum("bkgd,bknd->bkn", np.asarray(q),
                        np.asarray(keys).reshape(1, 2, 4, 32, 8).sum(3)) / np.sqrt(8)
        np.testing.assert_allclose(got, lin, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="score_pool"):
        MPCache(score_pool=3)


@pytest.mark.slow   # ~20 s each; the compact gather is compared with the kept one-hot below
@pytest.mark.parametrize("name", ["mpcache", "quest"])
def test_gathered_attention_equals_masked_attention(six_layers, name):
    """Gathering the selected clusters (attention over k2 * s2 entries, by the one-hot matrix
    or by the stable 1-bit sort) gives the same logits and counts as attending the whole
    cache under the selection mask."""
    cfg, params = six_layers
    toks = jnp.asarray(np.random.default_rng(4).integers(0, cfg.vocab_size, (1, T)))
    outs = []
    for gather, compaction in (("scores", "onehot"), ("scores", "sort"), ("kv", "onehot"),
                               ("mask", "onehot")):
        policy = policy_from_spec(name + (":refresh=1" if name == "mpcache" else ""),
                                  0.5 if name.startswith("mpcache") else 0.25)
        policy = dataclasses.replace(policy, gather=gather, compaction=compaction)
        assert policy.chooses(T)
        _, cache = prefill(params, cfg, toks, T + 12, policy=policy)
        # position 208 = 13 * 16 starts a cluster: bounds update, new candidates
        for step in range(12):
            logits, cache, counts = decode_step(params, cfg, toks[:, step], T + step, cache,
                                                policy, T, return_attended=True)
        outs.append((np.asarray(logits), np.asarray(counts)))
    for logits, counts in outs[1:]:
        np.testing.assert_allclose(outs[0][0], logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(outs[0][1], counts)


@pytest.mark.parametrize("selector", ["search", "topk", "rank", "auto"])
def test_selectors_agree_on_random_scores(selector):
    rng = np.random.default_rng(7)
    s = jnp.asarray(rng.normal(size=(3, 5, 97)), jnp.float32)
    allowed = jnp.asarray(rng.random(97) > 0.2)
    m = np.asarray(topk_mask(s, 11, allowed, selector))
    assert (m.sum(-1) == 11).all() and not m[..., ~np.asarray(allowed)].any()
    ref = np.where(np.asarray(allowed), np.asarray(s), -np.inf)
    kth = np.sort(ref, axis=-1)[..., -11][..., None]
    np.testing.assert_array_equal(m, ref >= kth)


def test_lean_search_counts_exactly_and_agrees_on_separated_scores():
    """selector "lean" (4 parts, 8 bits: 12 comparisons per entry instead of 28) returns
    exactly k entries, ties to the earliest positions, and the same top-k as "topk" where
    the scores are further apart than (max - min) / 2**8."""
    rng = np.random.default_rng(11)
    levels = rng.permutation(97).astype(np.float32) * 0.1            # gaps 0.1 > 9.7 / 256
    s = jnp.asarray(np.stack([levels, levels[::-1]])[None])
    allowed = jnp.asarray(rng.random(97) > 0.2)
    lean = np.asarray(topk_mask(s, 11, allowed, "lean"))
    np.testing.assert_array_equal(lean, np.asarray(topk_mask(s, 11, allowed, "topk")))
    flat = jnp.zeros((1, 1, 40)).at[0, 0, 30].set(1.0)               # a plateau of 39 ties
    m = np.asarray(topk_mask(flat, 5, jnp.ones(40, bool), "lean"))[0, 0]
    assert m.sum() == 5 and m[30] and m[:4].all()


def test_refresh_keeps_the_selection_between_refreshes(six_layers):
    """With refresh=4 the chosen clusters of steps 1-3 are step 0's; only the forced ones
    (first, previous, current: public) follow the new tokens. Step 4 selects again."""
    cfg, params = six_layers
    toks = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (1, T)))
    policy = make_policy("mpcache", 0.25, refresh=4)
    _, cache = prefill(params, cfg, toks, T + 20, policy=policy)
    dynamic = []
    for step in range(6):
        _, cache, diag = decode_step(params, cfg, toks[:, step], T + step, cache, policy, T,
                                     diagnostics=True, select_now=policy.selects_at(step))
        length = T + step + 1
        s2 = policy.s2
        cur = (length - 1) // s2
        forced = {0, cur - 1, cur}
        pos = np.asarray(diag["attended_pos"])                               # [L, b, K, C]
        counts = (pos >= 0).sum(-1)
        assert (counts <= policy.k2(T) * s2).all()
        dynamic.append([[{int(p) // s2 for p in row if p >= 0} - forced for row in layer[0]]
                        for layer in pos])
    assert [policy.selects_at(s) for s in range(6)] == [True, False, False, False, True, False]
    for step in (1, 2, 3):
        assert dynamic[step] == dynamic[0]
    assert all(len(h) == policy.k2(T) - 3 for layer in dynamic[0] for h in layer)


def test_refresh_schedule_anchored_at_the_last_input_with_a_warmup(six_layers):
    """The public schedule: the first step, every step of the warm-up from the step that reads
    the last input token (and, with a warm-up, every step reading fed input before it), then
    every `refresh` steps; a warm-up step gives the logits of a
    step that selects afresh, and the kept (compact) cache built in the warm-up is reused."""
    assert [s for s in range(12) if MPCache(refresh=4).selects_at(s, 5)] == [0, 1, 5, 9]
    pol = MPCache(refresh=4, warmup=3)
    assert [s for s in range(14) if pol.selects_at(s)] == [0, 1, 2, 6, 10]
    # input fed token by token (a question after the context) selects at every step
    assert [s for s in range(14) if pol.selects_at(s, 6)] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 12]
    for bad in (dict(warmup=-1, refresh=4), dict(warmup=2, refresh=1)):
        with pytest.raises(ConfigError, match="warmup"):
            MPCache(**bad)
    cfg, params = six_layers
    toks = jnp.asarray(np.random.default_rng(4).integers(0, cfg.vocab_size, (1, T)))
    policy = make_policy("mpcache", 0.25, refresh=4, warmup=3)
    plain = make_policy("mpcache", 0.25, refresh=4)
    caches = [prefill(params, cfg, toks, T + 20, policy=p)[1] for p in (policy, plain)]
    for step in range(8):
        now = policy.selects_at(step)
        outs = []
        for i, p in enumerate((policy, plain)):  # plain: told to select when the warm-up does
            logits, caches[i], counts = decode_step(params, cfg, toks[:, step], T + step,
                                                    caches[i], p, T, return_attended=True,
                                                    select_now=now)
            outs.append(np.asarray(logits))
        np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)
        if step in (3, 4, 5):   # the selection of step 2 reused
            assert not now


@pytest.mark.parametrize("extra", [{}, dict(neighbors=1, s1=8, s2=8)], ids=["plain", "neighbors"])
def test_refresh_compact_kv_equals_the_kept_onehot(six_layers, extra):
    """refresh=4 with kept="kv" (the chosen clusters' K/V rows gathered once per refresh,
    attention over them and the forced clusters) gives the logits and attended counts of
    kept="onehot" (scores gathered by the kept one-hot at every step), over 20 steps that
    cross cluster boundaries and 5 refreshes; with neighbours, whose overlapping dilations
    leave compact slots empty (they must stay unattended)."""
    cfg, params = six_layers
    toks = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (1, T)))
    outs = []
    for kept in ("onehot", "kv"):
        policy = make_policy("mpcache", 0.25, refresh=4, kept=kept, **extra)
        _, cache = prefill(params, cfg, toks, T + 20, policy=policy)
        steps = []
        for step in range(20):
            logits, cache, counts = decode_step(params, cfg, toks[:, step], T + step, cache,
                                                policy, T, return_attended=True,
                                                select_now=policy.selects_at(step))
            steps.append((np.asarray(logits), np.asarray(counts)))
        outs.append(steps)
    for (la, ca), (lb, cb) in zip(*outs):
        np.testing.assert_allclose(la, lb, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(ca, cb)
    assert (outs[0][-1][1] > 0).all()
    with pytest.raises(ConfigError):
        MPCache(refresh=4, kept="rows")


def test_refresh_one_selects_what_it_always_did(six_layers):
    """refresh=1 keeps one recent cluster forced and the same selections; the default
    schedule (refresh, warmup left to None) is a kept selection wherever the settings allow
    one, and every step where they do not."""
    assert MPCache(refresh=1).recent == 1 and MPCache(refresh=2).recent == 2
    assert (MPCache().refresh, MPCache().warmup, MPCache().recent) == (32, 16, 2)
    assert (MPCache(s2=8).refresh, MPCache(refresh=4).warmup) == (8, 0)
    for every_step in (dict(forced="slices"), dict(compaction="sort"), dict(gather="kv"),
                       dict(dense_layers=1), dict(share="pairs")):
        assert (MPCache(**every_step).refresh, MPCache(**every_step).warmup) == (1, 0)
    assert MPCache.published().refresh == MPCache.with_static().refresh == 1
    with pytest.raises(ConfigError):
        MPCache(refresh=2, compaction="sort")
    with pytest.raises(ConfigError):
        MPCache(refresh=MPCache().s2 + 1)


def test_refresh_selection_from_key_segments_selects_the_same():
    """A kept selection scored over row segments of the cache (the frozen rows apart, as
    SEMI2K's Beaver cache multiplies them) is the one scored over the whole cache, with
    ties (repeated keys) and a cache not yet full."""
    cfg = preset("tiny")
    rng = np.random.default_rng(3)
    policy = MPCache(budget=0.25, refresh=4, s2=8, s1=16)
    prompt, length = 256, 200
    k = rng.normal(size=(1, cfg.n_kv_heads, prompt, cfg.head_dim)).astype(np.float32)
    k[:, :, 40:56] = k[:, :, 100:116]                                   # tied clusters
    k = jnp.asarray(k)
    q = jnp.asarray(rng.normal(size=(1, cfg.n_kv_heads, cfg.group_size, cfg.head_dim)),
                    jnp.float32)
    whole = policy.refresh_selection(q, k, (), length, prompt, cfg)
    for n in (64, 199):
        parts = (k[:, :, :n], k[:, :, n:])
        split = policy.refresh_selection(q, k, (), length, prompt, cfg, parts)
        np.testing.assert_array_equal(np.asarray(split), np.asarray(whole))
    assert float(whole.sum()) > 0


def test_kept_rows_are_all_valid_where_the_policy_says_so():
    """kept_rows_valid (public, from the prompt length): every row of the compact cache is a
    valid entry at every later length, with random, tied and constant keys (a plateau the
    search must still fill with exactly the slots' count); where it says no (a prompt of
    two clusters, both forced), a kept row is indeed invalid, so attention keeps its secret
    mask (the test is conservative: it also says no to some prompts whose rows are valid)."""
    cfg = preset("tiny")
    rng = np.random.default_rng(7)
    policy = MPCache(budget=0.25, refresh=4, s2=8, s1=16)
    q = jnp.asarray(rng.normal(size=(1, cfg.n_kv_heads, cfg.group_size, cfg.head_dim)),
                    jnp.float32)
    shape = (1, cfg.n_kv_heads, 304, cfg.head_dim)
    tied = rng.normal(size=shape).astype(np.float32)
    tied[:, :, 40:120] = tied[:, :, 8:16].repeat(10, axis=2)
    for keys in (rng.normal(size=shape).astype(np.float32), tied, np.ones(shape, np.float32)):
        k = jnp.asarray(keys)
        for prompt in (40, 200):
            assert policy.kept_rows_valid(prompt)
            for length in (prompt + 1, prompt + 8, prompt + 17):
                kept = policy.refresh_selection(q, k, (), length, prompt, cfg)
                ok = np.asarray(policy.compact_kv(kept, k, k, length)[2])
                assert ok.shape[-1] == (policy.k2(prompt) - 3) * 8 and (ok == 1).all()
    short = 2 * 8
    assert not policy.kept_rows_valid(short)
    kept = policy.refresh_selection(q, k, (), short + 1, short, cfg)
    assert (np.asarray(policy.compact_kv(kept, k, k, short + 1)[2]) == 0).any()


def test_wide_search_selects_what_lean_selects():
    """selector "wide" (16 parts, 2 rounds) cuts lean's 256 levels in half its rounds: the
    same final interval, so the same mask, plateaus and disallowed entries included; and
    with_max returns the row max over the allowed entries."""
    rng = np.random.default_rng(5)
    for trial in range(8):
        s = rng.normal(size=(4, 128)) * rng.uniform(0.5, 8)
        if trial % 2:
            s = np.round(s * 2) / 2                                   # plateaus
        s = jnp.asarray(s.astype(np.float32))
        allowed = jnp.asarray(rng.random(128) > 0.1)
        k = int(rng.integers(1, 40))
        lean = np.asarray(topk_mask(s, k, allowed, "lean"))
        wide, top = topk_mask(s, k, allowed, "wide", with_max=True)
        np.testing.assert_array_equal(np.asarray(wide), lean)
        np.testing.assert_allclose(np.asarray(top)[:, 0],
                                   np.where(np.asarray(allowed), np.asarray(s), -np.inf).max(-1))


def test_near_selects_the_top_within_its_span():
    """selector "near" (one round of 16 parts over [max - 16, max + 1)): k entries when at
    least k allowed entries lie within the span, else all of those; never one below
    max - span; every chosen entry beats every unchosen one within the span by more than a
    part's width or is in the same part (ties to the earliest); with_max is the row max."""
    from eviction.topk import NEAR_SPAN, NEAR_WAYS

    rng = np.random.default_rng(6)
    step = (NEAR_SPAN + 1.0) / NEAR_WAYS
    for trial in range(12):
        s = rng.normal(size=(4, 128)) * rng.uniform(0.5, 12)
        if trial % 3 == 1:
            s = np.round(s * 2) / 2                                   # plateaus
        s = s.astype(np.float32)
        allowed = rng.random(128) > 0.1
        k = int(rng.integers(1, 40))
        mask, top = topk_mask(jnp.asarray(s), k, jnp.asarray(allowed), "near", with_max=True)
        mask, top = np.asarray(mask), np.asarray(top)[:, 0]
        best = np.where(allowed, s, -np.inf).max(-1)
        np.testing.assert_allclose(top, best)
        for r in range(4):
            near = allowed & (s[r] >= best[r] - NEAR_SPAN)
            assert not (mask[r] & ~allowed).any() and not (mask[r] & ~near).any()
            assert mask[r].sum() == min(k, near.sum())
            if (near & ~mask[r]).any():
                assert s[r][mask[r]].min() >= s[r][near & ~mask[r]].max() - step - 1e-5
    # the exact top k when the scores are farther apart than a part
    s = jnp.asarray(rng.permutation(np.arange(16, dtype=np.float32))[None] * 1.1)
    np.testing.assert_array_equal(np.asarray(topk_mask(s, 5, jnp.ones(16, bool), "near")),
                                  np.asarray(topk_mask(s, 5, jnp.ones(16, bool), "topk")))


@pytest.mark.slow  # ~10 s (the fast suite's time)
def test_dense_layers_attend_the_whole_cache(six_layers):
    """dense_layers=L: every decode layer attends the whole cache (the full cache's tokens);
    dense_layers=1: the first layer does, the others their budget."""
    cfg, params = six_layers
    prompt = list(np.random.default_rng(5).integers(0, cfg.vocab_size, 120))
    full = greedy_generate(params, cfg, prompt, 4, policy=make_policy("full"))
    dense = greedy_generate(params, cfg, prompt, 4,
                            policy=make_policy("mpcache", 0.2, s2=16, dense_layers=cfg.n_layers))
    # (dense layers select every step: cost blocks for them are built for refresh=1)
    assert dense.tokens == full.tokens and dense.attended_fraction == pytest.approx(1.0)
    one = make_policy("mpcache", 0.2, s2=16, dense_layers=1)
    assert [one.layer_policy(i, 6) is None for i in range(3)] == [True, False, False]
    part = greedy_generate(params, cfg, prompt, 4, policy=one)
    plain = greedy_generate(params, cfg, prompt, 4,
                            policy=make_policy("mpcache", 0.2, s2=16, refresh=1))
    # one layer in six attends everything, the others about 20%
    assert part.attended_fraction == pytest.approx(
        (1.0 + 5 * plain.attended_fraction) / 6, rel=1e-3)
    with pytest.raises(ConfigError, match="dense_layers"):
        make_policy("mpcache", 0.1, dense_layers=-1)


@pytest.mark.parametrize("name", ["snapkv", "h2o", "tova", "mpcache_static:s2=16",
                                  "mpcache_static:s2=16:aggregate=max"])
def test_static_step_from_the_prefills_probabilities(six_layers, name):
    """A static step ranked by attention reads the prefill's own probabilities (the tap that
    `prefill` hands to run_prompt) and keeps exactly the entries that recomputing the window
    attention from q and k keeps, with a different aggregate per policy; a chunked prefill
    (no probabilities) cannot be tapped."""
    from mpc_llama.model import build_cache, run_prompt

    cfg, params = six_layers
    policy = policy_from_spec(name, 0.2)
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, cfg.vocab_size, (2, T)))
    tap = policy.prefill_tap(T)
    assert tap is not None and policy.static_keep(T) < T
    x_tap, tapped = run_prompt(params, cfg, tokens, tap=tap)
    x, layers = run_prompt(params, cfg, tokens)
    np.testing.assert_allclose(x_tap, x, rtol=1e-6, atol=1e-6)
    rows, aggregate = policy.prompt_attention(T)
    for (q, k, _), (_, _, _, attn) in zip(layers, tapped):
        qg = q.reshape(2, T, cfg.n_kv_heads, cfg.group_size, cfg.head_dim)
        np.testing.assert_allclose(attn, policy.static_attention(qg, k, cfg), rtol=1e-5,
                                   atol=1e-6)
    assert aggregate == ("max" if "max" in name else "sum")
    kept_tap = build_cache(cfg, tapped, T + 1, policy).pos
    kept = build_cache(cfg, layers, T + 1, policy).pos
    np.testing.assert_array_equal(kept_tap, kept)
    np.testing.assert_array_equal(prefill(params, cfg, tokens, T + 1, policy=policy)[1].pos,
                                  kept)
    with pytest.raises(ValueError, match="unchunked"):
        run_prompt(params, cfg, tokens, chunk=16, tap=tap)
    assert make_policy("streaming_llm", 0.2).prefill_tap(T) is None
    assert make_policy("mpcache", 0.2).prefill_tap(T) is None     # no static step
