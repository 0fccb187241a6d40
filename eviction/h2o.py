"""H2O (Zhang et al. 2023): heavy hitters by attention accumulated over all prompt queries,
plus a recent window (half the budget each, as in the paper)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from eviction.base import Policy, group_probs, check_ratio
from mpc_llama import nonlinear


QUERY_CHUNK = 256  # prompt queries per step of the accumulated-attention score


@dataclasses.dataclass(frozen=True)
class H2O(Policy):
    name = "h2o"
    budget: float = 0.1
    recent_fraction: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        check_ratio("recent_fraction", self.recent_fraction)

    def static_keep(self, prompt_len):
        return self.n_attend(prompt_len)

    def static_forced(self, prompt_len):
        recent = int(self.recent_fraction * self.static_keep(prompt_len))
        return np.arange(prompt_len) >= prompt_len - recent

    def prompt_attention(self, prompt_len):
        return prompt_len, "sum"   # every prompt query's attention, accumulated

    def static_attention(self, q, k, cfg):
        """Attention accumulated over all prompt queries, in query chunks of QUERY_CHUNK: a
        chunk ending at query e reads keys 0..e-1 only (the rest are causally masked, their
        probabilities exactly 0), so no t x t probability matrix is formed and half the
        products are skipped. q: [b, t, k, g, d]; k: [b, k, t, d] -> [b, k, t]."""
        t = q.shape[1]
        softmax = nonlinear.SOFTMAX[cfg.softmax]
        total = None
        for s in range(0, t, QUERY_CHUNK):
            e = min(s + QUERY_CHUNK, t)
            causal = jnp.arange(e)[None, :] <= jnp.arange(s, e)[:, None]       # [e - s, e]
            part = group_probs(q[:, s:e], k[:, :, :e], causal, softmax).sum(axis=2)
            part = jnp.pad(part, ((0, 0), (0, 0), (0, t - e)))
            total = part if total is None else total + part
        return total
