"""Quest (Tang et al. 2024): query-aware page selection with the EXACT upper bound
sum_d max(q_d r_max, q_d r_min) over pages of 16 entries; no static step. The bound costs
G*D secure comparisons per page and step under MPC, which is what MPCache avoids."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from eviction.base import Policy, check_gather, topk_mask
from eviction.clusters import cluster_candidates
from mpc_llama.errors import ConfigError


def quest_bound(q, rmax, rmin):
    """Upper bound on q . k over a page, summed over the group's query heads.

    q: [b, k, g, d]; rmax, rmin: [b, k, c, d]. Returns [b, k, c]. One comparison per
    (head, page, dim): G*D per page and step.
    """
    hi = q[:, :, :, None, :] * rmax[:, :, None]
    lo = q[:, :, :, None, :] * rmin[:, :, None]
    return jnp.maximum(hi, lo).sum(axis=(2, 4))


@dataclasses.dataclass(frozen=True)
class Quest(Policy):
    name = "quest"
    budget: float = 0.1
    page: int = 16
    gather: str = "scores"    # scores | kv | mask: how attention reaches the selection
    dynamic = True
    needs_bounds = True

    def __post_init__(self):
        super().__post_init__()
        check_gather(self.gather)
        if self.page < 1:
            raise ConfigError(f"page must be >= 1, got {self.page}")

    @property
    def cluster_sizes(self):
        return (2 * self.page, self.page)

    def pages(self, prompt_len: int) -> int:
        """Pages attended per step, forced first and current pages included (public)."""
        return max(2, self.n_attend(prompt_len) // self.page)

    def select_clusters(self, q, cache_k, bounds, length, prompt_len, cfg):
        rmax2, rmin2 = bounds[0], bounds[1]
        score = quest_bound(q, rmax2, rmin2)
        cand, forced = cluster_candidates(length, rmax2.shape[2], self.page)
        n_forced = 2
        chosen = topk_mask(score, self.pages(prompt_len) - n_forced, cand, self.selector)
        return jnp.logical_or(chosen, forced), self.page, self.pages(prompt_len)
