"""CHEETAH's silent-OT refills: found in a captured run's counters, and priced apart."""

import numpy as np
import pytest

from protocols import refill
from protocols.benchmark import Counters, _with_refills, extrapolate
from protocols.network import (FLIGHTS_PER_SEND, REFILL_FLIGHTS_PER_SEND, NetworkProfile,
                               projected_seconds)
from protocols.registry import get_protocol


def test_projection_prices_refill_sends_apart():
    net = NetworkProfile("shaped", 50e6, 0.040)   # 50 Mbit/s, 40 ms RTT
    k, rho = FLIGHTS_PER_SEND["CHEETAH"], REFILL_FLIGHTS_PER_SEND["CHEETAH"]
    sends, refills, volume = [2342, 2342], [2210, 2210], [9_700_000, 9_700_000]
    t = projected_seconds(0.6, volume, sends, net, "CHEETAH", refill_sends=refills)
    assert t == pytest.approx(0.6 + (k * 132 + rho * 2210) * 0.020 + 8 * 9.7e6 / 50e6)
    old = projected_seconds(0.6, volume, sends, net, "CHEETAH")
    assert old == pytest.approx(0.6 + k * 2342 * 0.020 + 8 * 9.7e6 / 50e6)
    assert rho < k and t < old                    # a refill send is not a round trip
    # no refill sends: the model is unchanged, for every protocol
    for kind in ("SEMI2K", "CHEETAH", "ABY3"):
        assert projected_seconds(1.0, [10, 20], [5, 7], net, kind, refill_sends=[0, 0]) == \
            projected_seconds(1.0, [10, 20], [5, 7], net, kind)
    upper = projected_seconds(0.0, [1, 1], [300, 2000], net, "CHEETAH", True, [0, 1500])
    assert upper == pytest.approx((k * 800 + rho * 1500) * 0.020 + 16 / 50e6)
    with pytest.raises(ValueError, match="refill_sends"):
        projected_seconds(0.0, [1, 1], [10, 10], net, "CHEETAH", refill_sends=[20, 0])


def test_refill_split_from_runs_and_asymmetry():
    runs = [[136, 132], [2346, 2342], [132, 136]]   # one run carries the first refill
    assert refill.refill_floor(runs) == (132, 132)
    split = refill.split_runs(runs)
    assert split == [(0, 0), (2214, 2210), (0, 0)]
    assert [refill.count_refills(s) for s in split] == [0, 1, 0]
    # a steady refill in every run: the floor cannot see it, the one-sided burst can
    assert refill.block_refill([[2622, 42]] * 3, [2622, 42]) == (2580, 0)
    # HE matmuls' asymmetric rounds are not refills
    assert refill.asymmetric_refill([768, 512]) == (0, 0)
    assert refill.asymmetric_refill([91744, 50688], count=32) == (41056, 0)
    assert refill.count_refills((13785, 0)) == 6


def test_counters_carry_refill_sends():
    a = Counters((10, 10), (10, 10), (2000, 200), 1.0, (1800, 0))
    b = Counters((30, 30), (30, 30), (3300, 300), 2.0, (3000, 0))
    assert (a + b).refill_sends == (4800, 0)
    assert a.scale(32).refill_sends == (57600, 0)
    assert Counters.from_json(a.to_json()) == a
    old = Counters.from_json({"bytes_sent": [1, 1], "bytes_recv": [1, 1], "sends": [5, 5],
                              "seconds": 0.1})           # a cache entry from before refills
    assert old.refill_sends is None and old.refills == (0, 0)
    assert (old + a).refill_sends == (1800, 0)
    line = extrapolate({2: a, 4: b}, 8)
    assert line.refill_sends == (5400, 0) and line.sends[0] == 5900
    cached = _with_refills(get_protocol("cheetah"),
                           Counters((1, 1), (1, 1), (2622, 42), 0.1), None)
    assert cached.refill_sends == (2580, 0)
    assert _with_refills(get_protocol("semi2k"), old, None) is old


def test_refill_found_in_a_captured_cheetah_run():
    """A tiny CHEETAH program right after warm-up drains the small post-setup OT buffer
    (470k COTs): exactly one of its runs carries the first refill (~2,210 sends on each
    party), parsed from SPU's captured profile lines."""
    import jax.numpy as jnp

    from protocols.session import SpuSession

    session = SpuSession(get_protocol("cheetah"))
    session.warm_up()
    x = np.linspace(-1, 1, 20_000, dtype=np.float32)
    prog = session.compile(lambda v: (jnp.maximum(v, 0.0),), (x,), ("x",))
    session.put("x", x)
    runs = []
    for _ in range(3):
        (out,), cost = session.run(prog, ("o",))
        session.delete(out)
        runs.append(cost.sends)
    split = refill.split_runs(runs)
    counts = [refill.count_refills(s) for s in split]
    assert sum(counts) == 1, (runs, split)
    burst = split[counts.index(1)]
    assert all(1800 <= r <= 2600 for r in burst), (runs, split)
    floor = refill.refill_floor(runs)
    assert max(floor) < 200                       # the program's own sends: a few dozen
