"""CHEETAH's silent-OT refills: finding them in measured counters.

CHEETAH draws its correlated OTs from a Ferret buffer (SPU 0.9.5,
libspu/mpc/cheetah/ot/yacl/yacl_ote_adapter.{h,cc}: LpnParam n = 10,485,760, k = 452,000,
t = 1,280 noise bins). When an op drains it, `Bootstrap` refills ~10M COTs inside that op:
one short message per noise bin, so a refill is a burst of ~1,281 sends of ~208 bytes on the
party that sends the bins (the first refill after the one-time setup, whose small pre-LPN
buffer holds 470k COTs, is ~2,210 sends and ~0.74 MB on each party). Measured here on the
simulator: a run's sends are its program's own (deterministic) plus whole bursts, and which
run carries a burst depends on what drained the buffer before it.

SPU prints nothing when it refills (only an SPDLOG_DEBUG in the adapter's destructor), so a
refill is found from the send pattern: the same program's runs differ only by bursts, the
refill-free floor is the least sends any run of it had (per party), and a run's excess over
that floor, in bursts of at least MIN_BURST_SENDS, is refill traffic. A refill in every run
(an op that alone draws more than a buffer, `BootstrapInplace`) stays in that floor; a
second signal catches most of those: a steady refill's bins come from ONE party, while a
CHEETAH block's own sends are close to symmetric between the two parties (measured on the
8k blocks: within a few hundred sends; the HE matmuls' 512 vs 768 the widest), so a party's
excess over its peer of MIN_BURST_SENDS or more is refill traffic too. Both give lower
bounds (the first refill after setup is symmetric, 2,210 on each party): `refill_sends` is
the larger of the two.

Refill sends are not round trips: the bins go out back to back (measured: a 2,342-send SiLU
run took 15 s on 50 Mbit/s / 40 ms, where 2,342 round trips would take 55 s).
protocols.network prices them apart.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

# a refill as counted: ~2,200 sends on the busiest party (the first one after setup: 2,210 on
# each party; steady ones: one or two bursts of 1,281 = t bins + 1); an excess below
# MIN_BURST_SENDS is the link's own jitter (brpc splits large messages: +-4 sends a run)
REFILL_SENDS = 2200
MIN_BURST_SENDS = 640


def refill_floor(runs: Sequence[Sequence[float]]) -> Tuple[float, ...]:
    """Per-party refill-free sends of one program: the least each party sent in any run.

    runs: [run][party] sends of runs of the same program (any network, same protocol)."""
    if not runs:
        raise ValueError("no runs")
    return tuple(min(r[p] for r in runs) for p in range(len(runs[0])))


def refill_sends(sends: Sequence[float], floor: Sequence[float]) -> Tuple[float, ...]:
    """Per-party sends of one run that are refill bursts (0 where the excess is jitter)."""
    return tuple(s - f if s - f >= MIN_BURST_SENDS else 0 for s, f in zip(sends, floor))


def count_refills(refill: Sequence[float]) -> int:
    """Refills in a run: the busiest party's refill sends in units of REFILL_SENDS (rounded,
    at least 1 when there are any). Informational: latency is priced from the sends."""
    top = max(refill) if len(refill) else 0
    return 0 if top <= 0 else max(1, round(top / REFILL_SENDS))


def split_runs(runs: Sequence[Sequence[float]]) -> List[Tuple[float, ...]]:
    """Per run, per party: its refill sends (block_refill of each run)."""
    return [block_refill(runs, r) for r in runs]


def asymmetric_refill(sends: Sequence[float], count: float = 1) -> Tuple[float, ...]:
    """Per-party refill sends read from one run's two-party asymmetry (see the module
    docstring): party p's excess over its peer where it is at least MIN_BURST_SENDS per run
    of the block (`count`: runs summed into `sends`, e.g. the layers of a composed block)."""
    if len(sends) != 2:
        return tuple(0 for _ in sends)
    out = []
    for p in range(2):
        excess = sends[p] - sends[1 - p]
        out.append(excess if excess >= MIN_BURST_SENDS * count else 0)
    return tuple(out)


def block_refill(runs: Sequence[Sequence[float]], chosen: Sequence[float]) -> Tuple[float, ...]:
    """Refill sends of the run `chosen` (e.g. the per-party median) of a block measured in
    `runs`: the larger of its excess over the runs' floor and its two-party asymmetry."""
    over = refill_sends(chosen, refill_floor(runs))
    asym = asymmetric_refill(chosen)
    return tuple(min(c, max(a, b)) for a, b, c in zip(over, asym, chosen))
