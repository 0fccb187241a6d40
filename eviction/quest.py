"""Quest (Tang et al. 2024): query-aware page selection with the EXACT upper bound
sum_d max(q_d r_max, q_d r_min) over pages of 16 entries; no static step.

Under MPC the bound needs no comparison per page: since r_max >= r_min on every filled page,
max(q_d r_max, q_d r_min) = relu(q_d) r_max + min(q_d, 0) r_min, so one comparison per query
element (G*D per KV head and step, whatever the cache length) and one matmul of twice the
width give the same scores (`bound="split"`, default). `bound="max"` is the literal form, G*D
comparisons per page and step (the cost MPCache's comparison-free similarity was designed to
avoid), kept to measure that difference."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from eviction.base import Policy, check_gather, topk_mask
from eviction.clusters import cluster_candidates
from mpc_llama.errors import ConfigError


BOUNDS = ("split", "max")


def quest_bound(q, rmax, rmin, form: str = "split"):
    """Upper bound on q . k over a page, summed over the group's query heads.

    q: [b, k, g, d]; rmax, rmin: [b, k, c, d]. Returns [b, k, c].
    form "split": relu(q) . r_max + min(q, 0) . r_min, one comparison per element of q
    (G*D per step); equal to "max" on every page with r_max >= r_min (all filled pages;
    empty ones hold -BIG/+BIG and are never candidates).
    form "max": sum of max(q_d r_max, q_d r_min), one comparison per (head, page, dim).
    """
    if form == "split":
        pos = jnp.maximum(q, 0.0)
        both = jnp.concatenate([pos, q - pos], axis=-1)             # one matmul, not two
        return jnp.einsum("bkgd,bkcd->bkc", both, jnp.concatenate([rmax, rmin], axis=-1))
    hi = q[:, :, :, None, :] * rmax[:, :, None]
    lo = q[:, :, :, None, :] * rmin[:, :, None]
    return jnp.maximum(hi, lo).sum(axis=(2, 4))


@dataclasses.dataclass(frozen=True)
class Quest(Policy):
    name = "quest"
    budget: float = 0.1
    page: int = 16
    bound: str = "split"      # split (G*D comparisons per step) | max (G*D per page)
    gather: str = "scores"    # scores | kv | mask: how attention reaches the selection
    dynamic = True
    needs_bounds = True

    def __post_init__(self):
        super().__post_init__()
        check_gather(self.gather)
        if self.page < 1:
            raise ConfigError(f"page must be >= 1, got {self.page}")
        if self.bound not in BOUNDS:
            raise ConfigError(f"bound must be one of {BOUNDS}, got {self.bound!r}")

    @property
    def cluster_sizes(self):
        return (2 * self.page, self.page)

    def pages(self, prompt_len: int) -> int:
        """Pages attended per step, forced first and current pages included (public)."""
        return max(2, self.n_attend(prompt_len) // self.page)

    def chooses(self, prompt_len: int) -> bool:
        return self.pages(prompt_len) > 2

    def select_clusters(self, q, cache_k, bounds, length, prompt_len, cfg, scores=None):
        rmax2, rmin2 = bounds[0], bounds[1]
        score = quest_bound(q, rmax2, rmin2, self.bound)
        cand, forced = cluster_candidates(length, rmax2.shape[2], self.page)
        n_forced = 2
        chosen = topk_mask(score, self.pages(prompt_len) - n_forced, cand, self.selector)
        return jnp.logical_or(chosen, forced), self.page, self.pages(prompt_len)
