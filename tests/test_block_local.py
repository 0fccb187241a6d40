"""Block-local ranking of the static step (`Policy.static_block`): its public layout and its
selection, by hand."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from eviction import policy_from_spec
from eviction.compaction import for_protocol
from eviction.static_step import block_plan, static_mask
from mpc_llama.config import preset
from mpc_llama.errors import ConfigError


@pytest.mark.parametrize("spec,t", [("snapkv:static_block=512", 8192),
                                    ("snapkv:window=4:static_block=7", 50),
                                    ("mpcache_static:static_block=16", 200),
                                    ("h2o:static_block=10", 61)])
def test_block_plan_covers_the_prompt(spec, t):
    """Blocks tile the entries between the forced ends, differ in size by at most one, and
    their quotas (non-increasing, within each block's size) sum to what is ranked."""
    policy = policy_from_spec(spec, 0.1 if t > 1000 else 0.25)
    plan = block_plan(policy, t)
    forced = policy.static_forced(t)
    assert plan.head + sum(plan.sizes) + plan.tail == t
    assert forced[:plan.head].all() and forced[t - plan.tail:].all()
    assert not forced[plan.head:t - plan.tail].any()
    assert max(plan.sizes) - min(plan.sizes) <= 1 and len(plan.sizes) > 1
    assert sum(plan.quotas) == policy.static_keep(t) - forced.sum()
    assert all(a >= b for a, b in zip(plan.quotas, plan.quotas[1:]))
    assert all(0 < q <= s for q, s in zip(plan.quotas, plan.sizes))
    assert sum(plan.sizes) / len(plan.sizes) <= policy.static_block


def test_block_plan_none_where_global():
    """No blocks: static_block 0, one block's worth of prompt, nothing ranked."""
    assert block_plan(policy_from_spec("snapkv", 0.1), 8192) is None
    assert block_plan(policy_from_spec("snapkv:static_block=4096", 0.1), 2048) is None
    assert block_plan(policy_from_spec("streaming_llm:static_block=8", 0.1), 2048) is None
    with pytest.raises(ConfigError):
        policy_from_spec("snapkv:static_block=-1", 0.1)


def test_block_plan_refuses_forced_inside():
    """Forced entries in the middle of the prompt would break the blocks: refused."""
    policy = policy_from_spec("snapkv:static_block=8", 0.25)
    odd = type("Odd", (type(policy),), {"static_forced": lambda self, t: np.arange(t) == t // 2})
    with pytest.raises(ConfigError, match="ends"):
        block_plan(odd(**{f.name: getattr(policy, f.name)
                          for f in dataclasses.fields(policy)}), 64)


def test_block_mask_is_each_blocks_top_k():
    """The mask keeps, in each block, its quota of highest scores (ties to the earliest), and
    the forced window: checked against numpy block by block, with many ties."""
    policy = for_protocol(policy_from_spec("snapkv:window=4:kernel=1:static_block=7", 0.25),
                          None)
    t, cfg = 50, preset("tiny")
    rng = np.random.default_rng(3)
    attn = rng.integers(0, 4, (1, 2, t)).astype(np.float32)
    mask = np.asarray(static_mask(policy, None, jnp.zeros((1, 2, t, 4)), cfg,
                                  jnp.asarray(attn)))
    plan = block_plan(policy, t)
    want = np.zeros_like(mask)
    want[..., t - plan.tail:] = True
    start = plan.head
    for size, quota in zip(plan.sizes, plan.quotas):
        for h in range(2):
            row = attn[0, h, start:start + size]
            order = np.argsort(-row, kind="stable")[:quota]
            want[0, h, start + order] = True
        start += size
    np.testing.assert_array_equal(mask, want)
