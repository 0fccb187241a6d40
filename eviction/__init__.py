"""KV-cache eviction policies as JAX ops, one code path for plaintext and SPU.

`POLICIES` maps CLI names to policy classes; `make_policy(name, budget, **fields)` builds one;
`policy_from_spec("mpcache:static_ratio=0.5:s2=8", budget)` builds one from a CLI spec.
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


# named settings of a registered policy: name -> budget -> policy
VARIANTS = {"mpcache_published": MPCache.published, "mpcache_static": MPCache.with_static,
            "mpcache_shared": MPCache.shared}


def make_policy(name: str, budget: float = 0.1, **fields) -> Policy:
    """Builds a registered policy or named setting ("mpcache_published": the paper's,
    "mpcache_static": MPCache with a static step, "mpcache_shared": the paper's layer sharing
    without a static step), with `fields` overriding settings."""
    if name in VARIANTS:
        base = VARIANTS[name](budget)
        return dataclasses.replace(base, **_checked(type(base), fields))
    if name not in POLICIES:
        raise ConfigError(f"unknown policy {name!r}; choose from "
                          f"{sorted(POLICIES) + sorted(VARIANTS)}")
    cls = POLICIES[name]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(fields) - known
    if unknown:
        raise ConfigError(f"policy {name} has no setting(s) {sorted(unknown)}")
    if name == "full":
        return cls(budget=1.0, **fields)
    return cls(budget=budget, **fields)


def _value(text: str):
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def policy_from_spec(spec: str, budget: float = 0.1) -> Policy:
    """A policy from "name" or "name:field=value[:field=value...]" (values parsed as int,
    float or string), e.g. "mpcache:static_ratio=1.0:window=64". The spec string is the name
    results are reported under."""
    name, *settings = spec.strip().split(":")
    fields = {}
    for item in settings:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"policy spec {spec!r}: expected field=value, got {item!r}")
        fields[key.strip()] = _value(value.strip())
    return make_policy(name, budget, **fields)


def _checked(cls, fields):
    unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ConfigError(f"policy {cls.name} has no setting(s) {sorted(unknown)}")
    return fields
