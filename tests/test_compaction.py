"""Compaction kernels: the stable 1-bit sort moves what the one-hot reference moves, in
plaintext and under SPU (SEMI2K, ABY3), ties and plateaus included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close
from eviction import make_policy
from eviction.attention import partition_scores, scatter_partitioned
from eviction.clusters import init_bounds
from eviction.compaction import SORT_PROTOCOLS, for_protocol, kernel_for, pad_to, partition
from mpc_llama.config import preset
from protocols.registry import get_protocol
from protocols.session import SpuSession

K, G, D, C = 2, 2, 8, 256     # KV heads, group, head dim, cache entries (16 clusters of 16)


def test_partition_is_stable_and_pads_every_row_to_its_slots():
    mask = jnp.asarray([[True, False, True, False, False, True],
                        [False, False, False, False, True, False]])
    padded = pad_to(mask, 3)
    np.testing.assert_array_equal(padded.sum(-1), [3, 3])
    np.testing.assert_array_equal(padded[1], [True, True, False, False, True, False])
    vals = jnp.arange(12.0).reshape(2, 6)
    got, flag = partition(padded, 3, [vals, mask])
    np.testing.assert_array_equal(got, [[0, 2, 5], [6, 7, 10]])     # position order per row
    np.testing.assert_array_equal(flag, [[True, True, True], [False, False, True]])


def test_kernel_choice_per_protocol():
    for kind in ("SEMI2K", "ABY3", "CHEETAH", None):
        assert kernel_for("auto", kind) == ("sort" if kind in SORT_PROTOCOLS else "onehot")
    assert kernel_for("sort", "ABY3") == "sort" and kernel_for("onehot", "SEMI2K") == "onehot"
    p = for_protocol(make_policy("mpcache", 0.1, compaction="sort"), "SEMI2K")
    assert (p.compaction, p.backend) == ("sort", "spu")
    assert for_protocol(make_policy("mpcache", 0.1), None).backend == "plain"
    p = for_protocol(make_policy("mpcache", 0.1, refresh=4), "SEMI2K")
    assert (p.compaction, p.backend) == ("onehot", "spu")   # a kept selection is a one-hot
    assert p.split_kept and not for_protocol(make_policy("mpcache", 0.1, refresh=4),
                                             "ABY3").split_kept   # compact rows kept apart
    assert for_protocol(None, "ABY3") is None


@pytest.mark.parametrize("heads,group,fold", [(4, 1, 2), (4, 3, 2), (6, 2, 4), (3, 3, 2)])
def test_folded_scatter_equals_one_matmul_per_head(heads, group, fold):
    """Heads folded into block-diagonal matmuls (ABY3's fewer rounds) move the same values;
    3 heads cannot fold by 2 (fold_for: the largest divisor, 1)."""
    from eviction.attention import scatter_probs
    from eviction.compaction import FOLD_HEADS, fold_for

    rng = np.random.default_rng(heads + fold)
    n, size, slots = 8, 4, 3
    p = (rng.random((1, heads, slots, n)) < 0.3).astype(np.float32)
    probs = rng.normal(size=(1, heads, group, slots * size)).astype(np.float32)
    np.testing.assert_array_equal(scatter_probs(p, probs, size, 1),
                                  scatter_probs(p, probs, size, fold))
    assert fold_for(3, 2) == 1 and fold_for(32, 2) == 2 and fold_for(6, 4) == 3
    assert for_protocol(make_policy("mpcache", 0.1), "ABY3").fold_heads == \
        FOLD_HEADS.get("ABY3", 1)
    assert for_protocol(make_policy("mpcache", 0.1, fold_heads=2), "ABY3").fold_heads == 2
    assert for_protocol(make_policy("mpcache", 0.1), "SEMI2K").fold_heads == 1
    assert for_protocol(make_policy("mpcache", 0.1, fold_heads=1), "ABY3").fold_heads == 1


@pytest.mark.parametrize("form,proto,slots", [("ge", None, 6), ("ge", "semi2k", 6),
                                               ("digits", None, 6), ("digits", None, 17),
                                               ("digits", None, 1), ("digits", "cheetah", 6)])
def test_threshold_and_digit_onehots_equal_the_equality_onehot(form, proto, slots):
    """onehot_form "ge" (SEMI2K's: threshold comparisons) and "digits" (a setting: the
    destination's binary digits) build the equality one-hot's matrix, with more kept entries
    than slots, fewer, and none, slot counts that are and are not a multiple of the low
    digit's base; in plaintext and under SPU."""
    from eviction.compaction import ONEHOT_FORM, compaction_matrix, low_digit_base

    rng = np.random.default_rng(7)
    mask = rng.random((1, 4, 40)) < np.array([0.05, 0.2, 0.5, 0.0])[None, :, None]
    want = np.asarray(compaction_matrix(jnp.asarray(mask), slots, "eq"))
    assert [low_digit_base(n) for n in (1, 6, 17, 819)] == [2, 4, 8, 32]
    fn = lambda m: (compaction_matrix(m > 0.5, slots, form),)  # noqa: E731
    if proto is None:
        got = np.asarray(fn(mask.astype(np.float32))[0])
    else:
        session = SpuSession(get_protocol(proto))
        prog = session.compile(fn, (mask.astype(np.float32),), ("m",))
        session.put("m", mask.astype(np.float32))
        (ref,), _ = session.run(prog, ("p",))
        got = np.asarray(session.reveal(ref)).astype(bool)
    np.testing.assert_array_equal(got, want)
    assert want[0, 2].sum() == slots and not want[0, 3].any()
    assert ONEHOT_FORM.get("SEMI2K") == "ge" and "CHEETAH" not in ONEHOT_FORM
    assert for_protocol(make_policy("mpcache", 0.1), "CHEETAH").onehot_form == "eq"
    assert for_protocol(make_policy("mpcache", 0.1), "SEMI2K").onehot_form == "ge"
    assert for_protocol(make_policy("mpcache", 0.1), "ABY3").onehot_form == "eq"


def _inputs(seed=0):
    """Keys whose clusters repeat in pairs (equal cluster scores: plateaus at the top-k
    threshold), a query along a random direction."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(1, K, C // 32, 16, D)).astype(np.float32)
    keys = np.repeat(base, 2, axis=2).reshape(1, K, C, D)
    values = rng.normal(size=(1, K, C, D)).astype(np.float32)
    q = rng.normal(size=(1, 1, K * G, D)).astype(np.float32)
    return q, keys, values


def _attention(policy, cfg, length):
    def fn(q, keys, values):
        bounds = init_bounds(keys, length, *policy.cluster_sizes, policy.bounds_alpha)
        out, sel, count, _ = policy.decode_attention(q, keys, values, bounds, jnp.asarray(length),
                                                  C, cfg)
        return out, count
    return fn


@pytest.mark.parametrize("proto", ["semi2k", "aby3"])
@pytest.mark.parametrize("length", [C, C - 5])   # a full last cluster, and a partial one
def test_sort_kernel_on_spu_equals_onehot_in_plaintext(proto, length):
    cfg = preset("tiny").replace(n_heads=K * G, n_kv_heads=K, head_dim=D)
    ref = make_policy("mpcache", 0.25, selector="search", compaction="onehot", s2=16,
                      refresh=1)
    spu_policy = for_protocol(make_policy("mpcache", 0.25, selector="search",
                                          compaction="sort", s2=16), get_protocol(proto).kind)
    assert spu_policy.compaction == "sort"
    inputs = _inputs()
    want_out, want_count = (np.asarray(x) for x in jax.jit(_attention(ref, cfg, length))(*inputs))
    session = SpuSession(get_protocol(proto).without_beaver_cache()
                         if proto == "semi2k" else get_protocol(proto))
    fn = _attention(spu_policy, cfg, length)
    prog = session.compile(fn, inputs, ("q", "keys", "values"))
    for name, x in zip(("q", "keys", "values"), inputs):
        session.put(name, x)
    refs, _ = session.run(prog, ("out", "count"))
    assert_close(session.reveal(refs[0]), want_out, rtol=2e-2, atol=2e-2)
    np.testing.assert_array_equal(np.asarray(session.reveal(refs[1])), want_count)


@pytest.mark.parametrize("proto", ["semi2k", "aby3"])
def test_spu_partition_and_scatter_move_exactly_the_selected_clusters(proto):
    """The packed digits (which cluster each slot holds) equal plaintext's exactly, and the
    scatter puts every packed value back where it came from."""
    rng = np.random.default_rng(3)
    n, size, slots = 16, 4, 5
    scores = rng.normal(size=(1, K, G, n * size)).astype(np.float32)
    pick = np.zeros((1, K, n), bool)
    pick[0, 0, [0, 3, 4, 9, 15]] = True
    pick[0, 1, [0, 2, 15]] = True                       # fewer than slots: padded
    length = n * size - 2

    def fn(sel, s):
        hi, lo, picked, ok = partition_scores(sel > 0.5, s, size, slots, jnp.asarray(length),
                                              backend)
        return hi, lo, picked, ok, scatter_partitioned(hi, lo, jnp.where(ok, picked, 0.0),
                                                       size, n)

    backend = "plain"
    want = [np.asarray(x) for x in fn(pick.astype(np.float32), scores)]
    expect_back = np.where(np.repeat(pick, size, -1)[:, :, None] & (np.arange(n * size) < length),
                           scores, 0.0)
    np.testing.assert_allclose(want[4], expect_back, atol=1e-6)
    backend = "spu"
    session = SpuSession(get_protocol(proto))
    prog = session.compile(fn, (pick.astype(np.float32), scores), ("sel", "s"))
    session.put("sel", pick.astype(np.float32))
    session.put("s", scores)
    refs, _ = session.run(prog, ("hi", "lo", "picked", "ok", "back"))
    got = [np.asarray(session.reveal(r)) for r in refs]
    for a, b in zip(got[:2], want[:2]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(got[3].astype(bool), want[3])
    assert_close(got[2], want[2], atol=1e-3)
    assert_close(got[4], want[4], atol=1e-3)


def test_spu_sorts_a_true_key_first():
    """The order `backend="spu"` relies on (SPU 0.9.5: a boolean key is a signed bit): if a
    later SPU sorts like XLA, this fails and the backend flag must go."""
    def fn(x, y):
        return jax.lax.sort([x > 0, y], dimension=-1, is_stable=True, num_keys=1)[1]

    x = np.asarray([1., -1., 1., -1., -1.], np.float32)
    y = np.arange(5, dtype=np.float32)
    np.testing.assert_array_equal(jax.jit(fn)(x, y), [1, 3, 4, 0, 2])
    session = SpuSession(get_protocol("semi2k"))
    prog = session.compile(lambda a, b: (fn(a, b),), (x, y), ("x", "y"))
    session.put("x", x)
    session.put("y", y)
    refs, _ = session.run(prog, ("sorted",))
    np.testing.assert_array_equal(np.asarray(session.reveal(refs[0])), [0, 2, 1, 3, 4])


@pytest.mark.parametrize("length,chosen", [(113, False), pytest.param(241, True,
                                                                  marks=pytest.mark.slow)])
def test_sort_kernel_with_a_public_length_on_spu(length, chosen):
    """As private generation compiles it: the length is a public INPUT. When MPCache chooses
    nothing beyond its forced clusters (a 128-entry cache at 25%), the cluster mask is a
    public value, which SPU sorts in XLA's order: the kernel must still attend exactly the
    forced clusters (it takes the one-hot route); with a real choice, the sort."""
    cap = 128 if length < 128 else C
    cfg = preset("tiny").replace(n_heads=K * G, n_kv_heads=K, head_dim=D)
    ref = make_policy("mpcache", 0.25, selector="search", compaction="onehot", s2=16,
                      refresh=1)
    spu_policy = for_protocol(make_policy("mpcache", 0.25, selector="search",
                                          compaction="sort", s2=16), "SEMI2K")
    assert spu_policy.chooses(cap) == chosen
    q, keys, values = _inputs()
    keys, values = keys[:, :, :cap], values[:, :, :cap]
    bounds = init_bounds(jnp.asarray(keys), length, *ref.cluster_sizes, ref.bounds_alpha)

    def fn(policy):
        def attend(q, keys, values, bounds, ln):
            out, _, count, _ = policy.decode_attention(q, keys, values, bounds, ln, cap, cfg)
            return out, count
        return attend

    args = (q, keys, values, bounds, np.int32(length))
    want_out, want_count = (np.asarray(x) for x in fn(ref)(*args))
    session = SpuSession(get_protocol("semi2k").without_beaver_cache())
    names, vis = ("q", "k", "v", "b", "len"), ("secret",) * 4 + ("public",)
    prog = session.compile(fn(spu_policy), args, names, vis)
    for name, x, v in zip(names, args, vis):
        session.put(name, x, public=v == "public")
    refs, _ = session.run(prog, ("out", "count"))
    np.testing.assert_array_equal(np.asarray(session.reveal(refs[1])), want_count)
    assert_close(session.reveal(refs[0]), want_out, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("proto,name", [("aby3", "snapkv:window=4"), ("semi2k", "snapkv:window=4"),
                                        ("cheetah", "snapkv:window=4"),
                                        ("semi2k", "mpcache:static_ratio=0.3:window=8"),
                                        ("cheetah", "snapkv:window=4:static_block=7"),
                                        ("aby3", "h2o:static_block=10")])
def test_static_compaction_on_spu_equals_plaintext(proto, name):
    """The static step's default kernel per protocol (the 1-bit radix sort under ABY3 and
    SEMI2K, the one-hot under CHEETAH), from a tapped window aggregate full of ties
    (plateaus at the top-k threshold), keeps the entries plaintext keeps, in position order,
    with their K and V rows; also where the forced entries fill the whole keep (MPCache's
    first cluster of 32 against 14 kept: nothing ranked, a public mask); and with block-local
    ranking (`static_block`: blocks of 7 and 6 entries with quotas 2 and 1, per-block one-hots
    under CHEETAH; blocks with a forced suffix under ABY3's sort)."""
    from eviction import policy_from_spec
    from eviction.static_step import kept_indices

    kind = get_protocol(proto).kind
    spec, t = policy_from_spec(name, 0.25), 48
    policy, plain = for_protocol(spec, kind), for_protocol(spec, None)
    assert policy.static_sorts == (proto != "cheetah") and not plain.static_sorts
    cfg = preset("tiny")
    rng = np.random.default_rng(11)
    attn = rng.integers(0, 5, (1, K, t)).astype(np.float32)         # many equal values
    k = rng.normal(size=(1, K, t, D)).astype(np.float32)
    v = rng.normal(size=(1, K, t, D)).astype(np.float32)
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (1, K, t)).copy()
    idx = np.asarray(kept_indices(plain, None, jnp.asarray(k), cfg, jnp.asarray(attn)))
    assert (np.diff(idx, axis=-1) > 0).all() and idx.shape[-1] == plain.static_keep(t)

    def fn(a, keys, values, p):
        move = policy.static_move(None, keys, cfg, attn=a)
        return policy.apply_static_move(move, "policy", keys, values, p)

    session = SpuSession(get_protocol(proto))
    if proto == "cheetah":
        session.warm_up()
    prog = session.compile(fn, (attn, k, v, pos), ("attn", "k", "v", "pos"))
    for name, x in zip(("attn", "k", "v", "pos"), (attn, k, v, pos)):
        session.put(name, x)
    refs, _ = session.run(prog, ("k2", "v2", "pos2"))
    got_k, got_v, got_pos = (np.asarray(session.reveal(r)) for r in refs)
    np.testing.assert_array_equal(got_pos, idx)
    assert_close(got_k, np.take_along_axis(k, idx[..., None], 2), rtol=1e-3, atol=1e-3)
    assert_close(got_v, np.take_along_axis(v, idx[..., None], 2), rtol=1e-3, atol=1e-3)
