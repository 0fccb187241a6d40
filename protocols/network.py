"""Network profiles and the one cost model that turns measured counters into seconds.

    T = T_comp + k * max_i(A_i) * RTT / 2 + max_i(B_i) / BW          (projection)
    upper bound: the same with sum_i A_i and sum_i B_i (no overlap between parties)

A_i: sends of party i (link send actions, a proxy for message flights), B_i: bytes party i
sent, k: flights per send fitted on real two-process runs (spu-notes.md: ~1.05 SEMI2K;
CHEETAH 1.1, refitted on experiments/validate_network.py's shaped runs, where the earlier 1.3
overestimated round-heavy blocks by up to 39%; ABY3 taken as 1.0, not fitted). The simulator has no network clock: every
network second here is a projection and is labelled so wherever it is reported.

CHEETAH's silent-OT refills (protocols.refill) are bursts of short sends that go out back to
back, not round trips. With R_i of party i's sends found to be refill bursts:

    T = T_comp + k * max_i(A_i - R_i) * RTT / 2 + rho * max_i(R_i) * RTT / 2 + max_i(B_i) / BW

rho (REFILL_FLIGHTS_PER_SEND): flights per refill send, fitted on shaped two-process runs
(experiments/validate_network.py, results/netval): one steady refill (~1,281 sends) costs
rho * 1,281 / 2 round trips plus its ~0.27 MB. The bytes stay in B (refill bytes are bytes).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Sequence

from mpc_llama.errors import ConfigError

FLIGHTS_PER_SEND = {"SEMI2K": 1.05, "CHEETAH": 1.1, "ABY3": 1.0}
# fitted on results/netval (validate_network.py --fit); only CHEETAH refills. The compute of
# a refill is in T_comp (the simulator's compute_s measures it); the validation fits it too
REFILL_FLIGHTS_PER_SEND = {"CHEETAH": 0.2}
REFILL_COMPUTE_PER_SEND_S = 0.0


@dataclasses.dataclass(frozen=True)
class NetworkProfile:
    """bandwidth in bits per second, rtt in seconds, source: where the setting comes from."""

    name: str
    bandwidth_bps: float
    rtt_s: float
    source: str = "custom"

    def __post_init__(self):
        if self.bandwidth_bps <= 0:
            raise ConfigError(f"bandwidth must be positive, got {self.bandwidth_bps}")
        if self.rtt_s < 0:
            raise ConfigError(f"RTT must be >= 0, got {self.rtt_s}")


def _p(name, gbps, rtt_ms, source):
    return NetworkProfile(name, gbps * 1e9, rtt_ms / 1e3, source)


PROFILES: Dict[str, NetworkProfile] = {p.name: p for p in (
    _p("lan", 1.0, 0.5, "common LAN setting (1 Gbps, 0.5 ms RTT); BumbleBee's LAN"),
    _p("wan", 0.1, 80.0, "common WAN setting (100 Mbps, 80 ms RTT)"),
    _p("puma_lan", 5.0, 1.0, "PUMA (BERT/GPT-2 experiments): 5 Gbps, 1 ms"),
    _p("puma_llama", 20.0, 0.1, "PUMA LLaMA-7B experiments: ~20 Gbps, 0.1 ms"),
    _p("ditto_lan", 5.0, 0.4, "Ditto LAN: 5 Gbps, 0.4 ms"),
    _p("ditto_wan", 0.4, 40.0, "Ditto WAN: 400 Mbps, 40 ms"),
    _p("nimbus_lan", 3.0, 1.0, "Nimbus LAN: 3 Gbps, 1 ms"),
    _p("nimbus_wan", 0.4, 10.0, "Nimbus WAN: 400 Mbps, 10 ms"),
    _p("bumblebee_wan", 0.4, 4.0, "BumbleBee WAN: 400 Mbps, 4 ms"),
    _p("secretflow_wan", 0.1, 50.0, "SecretFlow benchmarks: 100 Mbps, 50 ms"),
)}


def get_profile(name: str) -> NetworkProfile:
    if name not in PROFILES:
        raise ConfigError(f"unknown network profile {name!r}; choose from {sorted(PROFILES)}")
    return PROFILES[name]


def custom_profile(bandwidth_mbps: float, rtt_ms: float) -> NetworkProfile:
    return NetworkProfile(f"custom_{bandwidth_mbps:g}mbps_{rtt_ms:g}ms", bandwidth_mbps * 1e6,
                          rtt_ms / 1e3, "given on the command line")


def projected_seconds(compute_s: float, bytes_sent: Sequence[int], sends: Sequence[int],
                      profile: NetworkProfile, protocol_kind: str,
                      upper_bound: bool = False,
                      refill_sends: Optional[Sequence[float]] = None) -> float:
    """Projected wall-clock of a run: compute + latency of message flights + transfer time.

    bytes_sent / sends: per party (None entries, parties not measured, are not allowed);
    refill_sends: per party, the part of `sends` that is CHEETAH refill bursts (None: none),
    priced at REFILL_FLIGHTS_PER_SEND instead of k.
    """
    if any(v is None for v in list(bytes_sent) + list(sends)):
        raise ValueError("every party's counters are needed to project latency")
    refill = [0.0] * len(sends) if refill_sends is None else list(refill_sends)
    if len(refill) != len(sends) or any(r < 0 or r > s for r, s in zip(refill, sends)):
        raise ValueError("refill_sends must be per party, between 0 and that party's sends")
    k = FLIGHTS_PER_SEND[protocol_kind]
    rho = REFILL_FLIGHTS_PER_SEND.get(protocol_kind, k)
    regular = [s - r for s, r in zip(sends, refill)]
    pick = sum if upper_bound else max
    flights = k * pick(regular) + rho * pick(refill)
    volume = pick(bytes_sent)
    return compute_s + flights * profile.rtt_s / 2 + 8.0 * volume / profile.bandwidth_bps
