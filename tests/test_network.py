"""The network cost model against hand-computed values."""

import pytest

from mpc_llama.errors import ConfigError
from protocols.network import (PROFILES, NetworkProfile, custom_profile, get_profile,
                               projected_seconds)


def test_projection_by_hand():
    lan = get_profile("lan")          # 1 Gbps, 0.5 ms RTT
    t = projected_seconds(2.0, [125_000_000, 100], [1000, 900], lan, "SEMI2K")
    # 2 s compute + 1.05 * 1000 sends * 0.25 ms + 1 Gbit / 1 Gbps
    assert t == pytest.approx(2.0 + 0.2625 + 1.0)
    upper = projected_seconds(2.0, [125_000_000, 100], [1000, 900], lan, "SEMI2K", True)
    assert upper == pytest.approx(2.0 + 1.05 * 1900 * 0.25e-3 + 8 * 125_000_100 / 1e9)


def test_profiles_have_sources_and_custom_profiles_validate():
    assert {"lan", "wan"} <= set(PROFILES)
    assert all(p.source for p in PROFILES.values())
    assert get_profile("wan").rtt_s == pytest.approx(0.08)
    assert custom_profile(400, 10).bandwidth_bps == pytest.approx(4e8)
    with pytest.raises(ConfigError):
        NetworkProfile("x", 0, 1)
    with pytest.raises(ConfigError, match="unknown network profile"):
        get_profile("5g")
    with pytest.raises(ValueError, match="every party"):
        projected_seconds(0, [1, None], [1, 1], get_profile("lan"), "ABY3")
