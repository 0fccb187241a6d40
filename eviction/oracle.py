"""Oracle: the exact top-budget prompt entries by true attention at every step, selection
free; generated entries are always attended (as with every static policy).

The accuracy ceiling and, costed with free selection, the floor on MPC cost.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from eviction.base import Policy, group_probs, topk_mask
from mpc_llama import nonlinear


@dataclasses.dataclass(frozen=True)
class Oracle(Policy):
    name = "oracle"
    budget: float = 0.1
    selector: str = "topk"   # exact ranking: the oracle is a reference, its selection is free
    dynamic = True

    def select(self, q, cache_k, bounds, length, prompt_len, cfg):
        c = cache_k.shape[2]
        valid = jnp.arange(c) < length
        probs = group_probs(q[:, None], cache_k, valid, nonlinear.SOFTMAX[cfg.softmax])[:, :, 0]
        prompt = jnp.arange(c) < prompt_len
        chosen = topk_mask(probs, self.n_attend(prompt_len), prompt, self.selector)
        return jnp.logical_or(chosen, jnp.logical_and(valid, jnp.logical_not(prompt)))
