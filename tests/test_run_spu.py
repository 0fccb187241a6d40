"""The whole-model benchmark: composition from blocks equals a directly measured decode step,
extrapolations hold, and the CLI writes complete outputs or fails cleanly."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from eviction import make_policy, policy_from_spec
from eviction.compaction import for_protocol
from mpc_llama.config import LlamaConfig
from mpc_llama.model import init_params, prefill
from protocols.benchmark import (BlockMeter, Counters, compose_static, compose_step, extrapolate,
                                 extrapolate_seq, static_lengths, total)
from protocols.blocks import attention_blocks, dense_blocks, retained, static_blocks
from protocols.private_generation import (PrivateGenerator, _secret_part, _split, kept_parts,
                                          spu_config)
from protocols.registry import get_protocol
from protocols.session import SpuSession

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = spu_config(LlamaConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                               head_dim=16, ffn_dim=64, max_seq_len=1024))
SEQ = 256


def direct_step(protocol, cfg, policy, seq, select_now=True):
    """Every party's counters of one real decode step (PrivateGenerator's program) on a cache
    of `seq` prompt tokens; with SEMI2K's Beaver cache, of a steady step (run twice on the
    same weights and frozen rows, the second measured), as the blocks are."""
    s = SpuSession(protocol)
    if protocol.kind == "CHEETAH":
        s.warm_up()
    gen = PrivateGenerator(s, cfg, init_params(cfg, jax.random.PRNGKey(0)), policy=policy)
    prog = gen.decode_program(seq, seq + 1, select_now=select_now)
    spec = jax.eval_shape(lambda p, t: prefill(p, gen.cfg, t, seq + 1, policy=gen.policy)[1],
                          gen.params, jax.ShapeDtypeStruct((1, seq), np.int32))
    rng = np.random.default_rng(0)
    fill = lambda a: (rng.normal(size=a.shape).astype(np.float32)  # noqa: E731
                      if a.dtype == np.float32 else np.zeros(a.shape, a.dtype))
    kept = kept_parts(gen.policy) if gen.split else ()
    if gen.split:
        parts = jax.eval_shape(lambda c: _split(c, retained(policy, seq)[0] - 1, kept), spec)
        s.put("frozen", jax.tree_util.tree_map(fill, parts[0]))
        if kept:
            s.put("kept", jax.tree_util.tree_map(fill, parts[1]))
        s.put("cache", jax.tree_util.tree_map(fill, parts[-1]))
    else:
        s.put("cache", jax.tree_util.tree_map(fill, _secret_part(spec)))
    s.put("token", np.zeros((1,), np.int32), owner=1)
    s.put("position", np.int32(seq), public=True)
    s.put("length", np.int32(retained(policy, seq)[0] - 1), public=True)
    outs = ("next", "kept", "cache") if kept and select_now else ("next", "cache")
    if gen.split:
        s.run(prog, outs)  # opens the weights and the frozen (and kept) rows
    return Counters.of(s.run(prog, outs)[1])


@pytest.fixture(scope="module")
def meters(tmp_path_factory):
    """One BlockMeter per protocol for the module, with a block cache of its own: blocks
    shared by several checks (the dense ones of every policy) are measured once."""
    cache, made = tmp_path_factory.mktemp("block_cache"), {}

    def get(protocol):
        if protocol.name not in made:
            made[protocol.name] = BlockMeter(protocol, str(cache))
        return made[protocol.name]

    return get


def composed_step(protocol, cfg, policy, seq, heads, meter=None, parts=False):
    """The step as run_spu composes it, the policy compiled for the protocol as run_spu does
    (its per-protocol kernels: the direct step's PrivateGenerator resolves them too).
    parts: return the composed {block name: (block, counters)} instead of their total."""
    from eviction.compaction import for_protocol

    policy = for_protocol(policy, protocol.kind)
    meter = meter or BlockMeter(protocol)
    measured = {None: [(b, meter.measure(b)) for b in dense_blocks(cfg)]}
    for h in heads:
        measured[h] = [(b, meter.measure(b)) for b in attention_blocks(cfg, policy, seq, h)]
    composed = compose_step(measured, cfg.n_kv_heads)
    return composed if parts else total(composed, protocol.world_size)


def close(a, b, tol):
    return abs(a - b) <= tol * max(abs(a), abs(b))


# Tolerances: SEMI2K composes exactly up to compile-level differences (<1% measured). ABY3's
# truncation draws the parties' roles from a public random pivot, so a party's counters vary
# from run to run while the all-party sums do not: ABY3 is compared on those sums (measured:
# bytes 2.5% apart for mpcache, 1.70 vs 1.74 MB, the direct step identical in every run;
# sends 0.5%). CHEETAH's silent-OT buffers are refilled by whichever run drains them, which
# moves up to ~2% of bytes between runs.
# CHEETAH's cases (~15-18 s each), SEMI2K's selecting step (ABY3's covers the path) and the
# dense-layer case (~22 s) under make test-slow (the fast suite's time)
@pytest.mark.parametrize("protocol,tol_bytes,policy", [
    (proto, tol, pol) if proto == "aby3" or (proto, pol) == ("semi2k", "full") else
    pytest.param(proto, tol, pol, marks=pytest.mark.slow)
    for proto, tol in (("semi2k", 0.02), ("aby3", 0.05), ("cheetah", 0.03))
    for pol in ("full", "mpcache:refresh=1")] + [
    pytest.param("semi2k", 0.02, "mpcache:dense_layers=1", marks=pytest.mark.slow)])
def test_composed_equals_direct_decode_step(protocol, tol_bytes, policy, meters):
    """The composed step (blocks measured apart, counted per layer) costs what the real
    decode step costs; with dense_layers=1 one of the two layers attends the whole cache."""
    proto = get_protocol(protocol)
    pol = None if policy == "full" else policy_from_spec(policy, 0.4)
    assert pol is None or pol.chooses(SEQ)   # a secret selection, not the forced clusters
    direct = direct_step(proto, SMALL, pol, SEQ)
    comp = composed_step(proto, SMALL, pol, SEQ, [SMALL.n_kv_heads], meters(proto))
    assert close(comp.total_bytes, direct.total_bytes, tol_bytes), (comp, direct)
    if protocol == "aby3":  # a party's sends follow the random truncation roles
        assert close(sum(comp.sends), sum(direct.sends), 0.02), (comp.sends, direct.sends)
    else:
        assert close(max(comp.sends), max(direct.sends), 0.02), (comp.sends, direct.sends)
    if protocol != "aby3":
        for a, b in zip(comp.bytes_sent, direct.bytes_sent):
            assert close(a, b, tol_bytes)


@pytest.mark.slow   # ~11-23 s each (make test-slow)
@pytest.mark.parametrize("protocol,tol_bytes", [("semi2k", 0.02), ("aby3", 0.05)])
def test_composed_equals_direct_with_the_selections_row_max(protocol, tol_bytes, meters):
    """One query head per KV head (7B's shape): the select block hands its row max to the
    softmax block; composed, that is the direct step's cost."""
    cfg = SMALL.replace(n_heads=SMALL.n_kv_heads)
    proto = get_protocol(protocol)
    pol = make_policy("mpcache", 0.4, refresh=1)
    assert pol.gives_max(cfg.group_size, SEQ)
    direct = direct_step(proto, cfg, pol, SEQ)
    comp = composed_step(proto, cfg, pol, SEQ, [cfg.n_kv_heads], meters(proto))
    assert close(comp.total_bytes, direct.total_bytes, tol_bytes), (comp, direct)
    assert close(sum(comp.sends), sum(direct.sends), 0.02), (comp.sends, direct.sends)


def test_composed_refresh_is_the_mean_of_its_steps(meters):
    """MPCache with refresh=2 and kept="kv": the composed (amortised) step equals the mean of
    a selecting step (selection, compact gather) and a reusing one (attention over the compact
    cache), both measured directly. ABY3: no Beaver cache, whose marking of the compact rows
    only the benchmark does (docs/benchmark.md)."""
    proto = get_protocol("aby3")
    pol = make_policy("mpcache", 0.25, refresh=2)
    both = [direct_step(proto, SMALL, pol, SEQ, select_now=s) for s in (True, False)]
    parts = composed_step(proto, SMALL, pol, SEQ, [SMALL.n_kv_heads], meters(proto), True)
    comp = total(parts, proto.world_size)
    mean = sum(d.total_bytes for d in both) / 2
    assert both[0].total_bytes > 1.2 * both[1].total_bytes  # the selection is not free
    assert close(comp.total_bytes, mean, 0.05), (comp.total_bytes, mean)
    assert close(sum(comp.sends), sum(sum(d.sends) for d in both) / 2, 0.03)
    # the selecting step run_spu reports apart (the warm-up's steps): the direct one
    every = {n: b.every for n, (b, _) in parts.items()}
    assert sorted(n for n, e in every.items() if e == 2) == ["compact", "select"]
    from experiments.run_spu import DENSE_BLOCKS, selecting_step
    from protocols.network import get_profile

    lan = [get_profile("lan")]
    sel = selecting_step(parts, every, proto.world_size, proto, lan)
    # composed 6% above direct at these tiny shapes (blocks' boundary shares); counting the
    # selection at its per-step share would be 15% below
    assert close(sel["bytes"], both[0].total_bytes, 0.08), (sel["bytes"], both[0])
    assert sel["latency_s"]["lan"] > 0
    dense = {n: v for n, v in parts.items() if n in DENSE_BLOCKS}
    assert selecting_step(dense, every, proto.world_size, proto, lan) is None


@pytest.mark.slow  # ~20 s
def test_composed_reusing_step_under_the_beaver_cache(meters):
    """SEMI2K, MPCache with refresh=2 and kept="kv": the blocks every step runs (steady: the
    compact rows and the forced rows held after them Beaver-cached, the last `refresh` rows
    opened) cost what the real reusing step costs, run twice on the same kept variables (the
    second measured)."""
    from eviction.compaction import for_protocol
    from protocols.blocks import random_inputs

    proto = get_protocol("semi2k")
    pol = make_policy("mpcache", 0.25, refresh=2)
    assert for_protocol(pol, proto.kind).holds_forced
    direct = direct_step(proto, SMALL, pol, SEQ, select_now=False)
    parts = composed_step(proto, SMALL, pol, SEQ, [SMALL.n_kv_heads], meters(proto), True)
    forced = parts["forced"][0]
    assert forced.fn(*random_inputs(forced))[0].shape[2] == pol.refresh   # the live rows only
    comp = total({n: v for n, v in parts.items() if v[0].every == 1}, proto.world_size)
    assert close(comp.total_bytes, direct.total_bytes, 0.02), (comp.total_bytes, direct)
    assert close(max(comp.sends), max(direct.sends), 0.02), (comp.sends, direct.sends)


@pytest.mark.slow  # ~11 s
def test_head_extrapolation_matches_a_direct_measurement(meters):
    """Attention blocks measured on 1 and 2 KV heads, extrapolated to 4, against 4 measured."""
    proto = get_protocol("semi2k")
    cfg = SMALL.replace(n_kv_heads=4, n_heads=8)
    pol = make_policy("mpcache", 0.4)
    assert pol.chooses(SEQ)
    meter = meters(proto)
    measured = {h: [(b, meter.measure(b)) for b in attention_blocks(cfg, pol, SEQ, h)]
                for h in (1, 2, 4)}
    direct = total(compose_step({4: measured[4]}, 4), 2)
    extra = total(compose_step({1: measured[1], 2: measured[2]}, 4), 2)
    assert close(extra.total_bytes, direct.total_bytes, 0.02), (extra, direct)
    assert close(max(extra.sends), max(direct.sends), 0.02), (extra.sends, direct.sends)


@pytest.mark.slow   # ~17-23 s each (make test-slow; .ci/run runs it)
@pytest.mark.parametrize("name", ["snapkv:window=8", "mpcache_static:s2=16:aggregate=max",
                                  "snapkv:window=8:static_block=32:static_compaction=onehot"])
def test_static_blocks_are_what_the_private_prefill_adds(meters, name):
    """The static step's blocks (from the prefill's tapped attention: a window "sum" enters as
    its aggregate, a "max" as the window's rows) cost what a private prefill with the policy
    costs beyond one without it, ABY3, 128 tokens, the static kernel per protocol (the 1-bit
    sort under ABY3; and the block-local one-hots CHEETAH runs, `static_block`): the window
    attention is the prefill's own, not computed twice."""
    from eviction.compaction import for_protocol

    proto, seq = get_protocol("aby3"), 128
    pol = for_protocol(policy_from_spec(name, 0.25), proto.kind)
    assert pol.static_sorts == ("onehot" not in name)
    assert pol.static_forced(seq).sum() < pol.static_keep(seq) < seq
    session = SpuSession(proto)
    params = init_params(SMALL, jax.random.PRNGKey(0))

    def prefill_bytes(policy):
        gen = PrivateGenerator(session, SMALL, params, policy=policy)
        session.put("tokens", np.zeros((1, seq), np.int32), owner=1)
        refs, cost = session.run(gen.prefill_program(seq, seq + 1), ("next", "cache"))
        return Counters.of(cost).total_bytes

    added = prefill_bytes(pol) - prefill_bytes(None)
    blocks = static_blocks(SMALL, pol, seq, 2)
    assert blocks[0].arg_names[0] == ("attn" if "max" not in name else "probs")
    meter = meters(proto)
    composed = total(compose_static({(seq, 2): [(b, meter.measure(b)) for b in blocks]},
                                    seq, 2), proto.world_size)
    assert composed.total_bytes > 0
    # 8%: SPU's top-k is a quickselect over a secretly shuffled array, so its comparisons vary
    # from run to run and with the values (seen: composed 5.6% below one prefill's)
    assert close(composed.total_bytes, added, 0.08), (composed.total_bytes, added)


@pytest.mark.slow  # ~25 s: the static step's blocks measured at four lengths
def test_static_step_length_extrapolation(meters):
    """The static step at 512 tokens from 128, 256 and 384, against 512 measured (SEMI2K)."""
    proto = get_protocol("semi2k")
    pol = make_policy("mpcache_static", 0.25, s2=16)
    # every measured length ranks entries (with clusters of 32 the forced sink and window
    # fill the whole keep at 128 tokens: nothing is ranked there, a public step of 0 bytes)
    assert all(pol.static_keep(t) > pol.static_forced(t).sum() for t in (128, 256, 384))
    meter = meters(proto)
    measured = {(t, 2): [(b, meter.measure(b)) for b in static_blocks(SMALL, pol, t, 2)]
                for t in (128, 256, 384, 512)}
    direct = total(compose_static({k: v for k, v in measured.items() if k[0] == 512}, 512, 2), 2)
    extra = total(compose_static({k: v for k, v in measured.items() if k[0] < 512}, 512, 2), 2)
    assert direct.total_bytes > 0
    assert close(extra.total_bytes, direct.total_bytes, 0.05), (extra, direct)


def test_extrapolation_arithmetic():
    def c(b, s, t):
        return Counters((b, b), (b, b), (s, s), t)

    line = extrapolate({2: c(20, 10, 1.0), 4: c(40, 12, 2.0)}, 32)
    assert line.bytes_sent == (320, 320) and line.sends == (40, 40) and line.seconds == 16.0
    clipped = extrapolate({2: c(20, 12, 1.0), 4: c(40, 10, 2.0)}, 32)   # noisy: sends fell
    assert clipped.sends == (10, 10)
    clipped = extrapolate({2: c(20, 2, 1.0), 4: c(40, 40, 2.0)}, 32)    # noisy: a jump
    assert clipped.sends == (320, 320)                                   # proportional at most
    quad = extrapolate_seq({1: c(1, 1, 1), 2: c(4, 2, 4), 3: c(9, 3, 9)}, 8)
    assert quad.bytes_sent == pytest.approx((64, 64)) and quad.sends == (3, 3)
    assert quad.seconds == pytest.approx(64)
    mixed = extrapolate_seq({1: c(3, 1, 0), 2: c(8, 1, 0), 4: c(24, 1, 0)}, 8)  # 2T + T^2
    assert mixed.bytes_sent == pytest.approx((80, 80))
    line = extrapolate_seq({2: c(3, 1, 1), 4: c(7, 2, 1)}, 8, line=True)     # 2T - 1
    assert line.bytes_sent == pytest.approx((15, 15)) and line.sends == (4, 4)  # T / 2
    with pytest.raises(ValueError):
        extrapolate({2: c(1, 1, 1)}, 4)


def test_static_lengths_of_a_block_local_step():
    """A static step ranked inside blocks is measured only at lengths already cut into
    blocks (its cost grows one block at a time), the global one at T/4, T/2, T."""
    from eviction.static_step import block_plan

    pol = make_policy("mpcache_static", 0.1)
    assert pol.static_block == 512 and block_plan(pol, 8192) is not None
    lengths = static_lengths(8192, 1024, pol.static_block)
    assert lengths == [1024, 2048]
    assert all(block_plan(pol, t) is not None for t in lengths)
    assert static_lengths(8192, 4096, 512) == [2048, 4096]
    assert static_lengths(2048, 1024, 512) == [2048]          # 4 x block: measured itself
    assert static_lengths(8192, 8192, 512) == [8192]
    assert static_lengths(8192, 1024) == [256, 512, 1024]


@pytest.mark.slow  # ~20 s: block-local static steps measured at three lengths
def test_block_local_static_step_length_extrapolation(meters):
    """A block-local static step (blocks of 64, the one-hot kernel) at 512 tokens from the
    lengths static_lengths picks under a 256-token cap, against 512 measured (SEMI2K)."""
    proto = get_protocol("semi2k")
    pol = for_protocol(policy_from_spec(
        "snapkv:window=8:static_block=64:static_compaction=onehot", 0.25), proto.kind)
    lengths = static_lengths(512, 256, pol.static_block)
    assert lengths == [128, 256]
    meter = meters(proto)
    measured = {(t, 2): [(b, meter.measure(b)) for b in static_blocks(SMALL, pol, t, 2)]
                for t in lengths + [512]}
    direct = total(compose_static({k: v for k, v in measured.items() if k[0] == 512}, 512, 2), 2)
    extra = total(compose_static({k: v for k, v in measured.items() if k[0] < 512}, 512, 2,
                                 line=True), 2)
    assert direct.total_bytes > 0
    assert close(extra.total_bytes, direct.total_bytes, 0.05), (extra, direct)
    # sends: SPU's quick-select varies from run to run (seen: 3-20% high in 9 runs); the
    # longest length's own sends, as for a global step, would be ~50% low
    assert close(max(extra.sends), max(direct.sends), 0.3), (extra.sends, direct.sends)


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "experiments/run_spu.py", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("args,needle", [
    (["--protocol", "spdz"], "unknown protocol"),
    (["--seq", "12,abc"], "--seq"),
    (["--seq", "32"], ">= 64"),
    (["--policies", "full,nope"], "unknown policy"),
    (["--bandwidth", "100"], "--bandwidth and --rtt"),
    (["--budget", "0"], "--budget"),
    (["--model", "/no/such/model.gguf"], "no such model"),
    (["--networks", "moon"], "unknown network profile"),
    (["--heads", "4"], "two counts"),
    (["--protocol", "aby3", "--heads", "3,5", "--policies", "mpcache:fold_heads=2"],
     "multiples of 2"),   # a fold of 2 heads is linear only at even head counts
])
def test_cli_bad_input(tmp_path, args, needle, cli):
    from experiments.run_spu import main

    out = tmp_path / "out"
    code, _, err = cli(main, *args, "--out", out)
    assert code == 2
    assert err.strip().count("\n") == 0 and needle in err, err
    assert not out.exists()


@pytest.mark.slow   # ~30 s; run_spu's composition is checked in the default suite above
def test_cli_end_to_end(tmp_path, cli):
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = ["--model", "tiny", "--protocol", "semi2k", "--seq", "64,96",
            "--policies", "full,mpcache,snapkv:window=2", "--heads", "1,2", "--bandwidth", "50",
            "--rtt", "30", "--static-max-seq", "256", "--block-cache", str(cache)]
    r = run_cli(*args, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["bytes_by_category.png", "latency.png",
                                                      "results.csv", "results.json"]
    res = json.loads((out / "results.json").read_text())
    rows = res["rows"]
    assert {(r["policy"], r["seq"]) for r in rows} == {
        (p, s) for p in ("full", "mpcache", "snapkv:window=2", "oracle") for s in (64, 96)}
    for row in rows:
        for key in ("policy", "protocol", "seq", "bytes", "sends", "compute_s",
                    "attention_bytes", "latency_s", "reduction_vs_full"):
            assert key in row
        assert set(row["latency_s"]) >= {"lan", "wan", "custom_50mbps_30ms"}
        assert set(row["reduction_vs_full"]) >= {"bytes", "attention_bytes", "lan", "wan"}
        assert row["bytes"] == pytest.approx(sum(row["bytes_per_party"]))
        assert row["bytes"] == pytest.approx(sum(row["bytes_by_category"].values()))
        assert row["attention_bytes"] < row["bytes"]
        if row["policy"] == "full":
            assert row["reduction_vs_full"]["bytes"] == 1.0
        if row["policy"] == "snapkv:window=2":   # ranks keep - 2 entries (a window of 32
            assert row["static_prefill"]["bytes"] > 0  # would force all it keeps: public)
        if row["policy"] == "mpcache":   # no static step, and its exact ranking no bounds
            assert "static_prefill" not in row
    assert len((out / "results.csv").read_text().strip().splitlines()) == len(rows) + 1
    assert res["run"]["blocks_measured"] > 0 and res["run"]["wall_s"] > 0
    assert f"{res['run']['blocks_measured']} blocks measured" in r.stdout
    # a rerun (in-process: the same main) takes every block from the cache and gives the
    # same figures
    from experiments.run_spu import main

    code, stdout, _ = cli(main, *args)
    assert code == 0 and "0 blocks measured" in stdout
    assert r.stdout.splitlines()[:3] == stdout.splitlines()[:3]


@pytest.mark.parametrize("seqs", [(8192,), (4096, 8192)])
def test_latency_plot(seqs):
    """One length: one panel of bars, one per (network, policy); several: a panel of lines
    (latency vs length) per network."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from experiments.run_spu import latency_figure

    nets, pols = ["lan", "wan", "puma_llama"], ["full", "mpcache", "oracle"]
    rows = [{"policy": p, "seq": s, "protocol": "CHEETAH",
             "latency_s": {n: 1.0 + i + j for j, n in enumerate(nets)}}
            for s in seqs for i, p in enumerate(pols)]
    fig = latency_figure(rows, nets)
    if len(seqs) == 1:
        (ax,) = fig.axes
        heights = sorted(b.get_height() for b in ax.patches)
        assert heights == sorted(r["latency_s"][n] for r in rows for n in nets)
        assert [t.get_text() for t in ax.get_legend().get_texts()] == pols
    else:
        assert len(fig.axes) == len(nets)
        assert all(len(ax.lines) == len(pols) and len(ax.lines[0].get_xdata()) == len(seqs)
                   for ax in fig.axes)
    plt.close(fig)
