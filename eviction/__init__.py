"""KV-cache eviction policies as JAX ops, one code path for plaintext and SPU.

`POLICIES` maps CLI names to policy classes; `make_policy(name, budget, **fields)` builds one.
"""

from __future__ import annotations

import dataclasses

from eviction.base import Policy
from eviction.h2o import H2O
from eviction.mpcache import MPCache
from eviction.oracle import Oracle
from eviction.quest import Quest
from eviction.snapkv import SnapKV
from eviction.streaming_llm import StreamingLLM
from eviction.tova import TOVA
from mpc_llama.errors import ConfigError

POLICIES = {cls.name: cls for cls in (Policy, StreamingLLM, H2O, SnapKV, TOVA, Quest, MPCache,
                                      Oracle)}


def make_policy(name: str, budget: float = 0.1, **fields) -> Policy:
    """Builds a registered policy; "mpcache_published" gives the paper's settings."""
    if name == "mpcache_published":
        return MPCache.published(budget)
    if name not in POLICIES:
        raise ConfigError(f"unknown policy {name!r}; choose from {sorted(POLICIES)}")
    cls = POLICIES[name]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(fields) - known
    if unknown:
        raise ConfigError(f"policy {name} has no setting(s) {sorted(unknown)}")
    if name == "full":
        return cls(budget=1.0, **fields)
    return cls(budget=budget, **fields)
