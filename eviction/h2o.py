"""H2O (Zhang et al. 2023): heavy hitters by attention accumulated over all prompt queries,
plus a recent window (half the budget each, as in the paper)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from eviction.base import Policy, group_probs, check_ratio
from mpc_llama import nonlinear


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

    def static_scores(self, q, k, cfg):
        t = q.shape[1]
        causal = jnp.tril(jnp.ones((t, t), bool))
        return group_probs(q, k, causal, nonlinear.SOFTMAX[cfg.softmax]).sum(axis=2)
