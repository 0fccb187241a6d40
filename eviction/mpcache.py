"""MPCache (Zeng et al., NeurIPS 2025) with MPC-first choices.

Static step (once, end of prefill): keep round(static_ratio * T) entries per layer and KV head
by observation-window attention (window, aggregation and max-pooling are fields; defaults from
the SmolLM2 measurements in algorithm.md section 7: a 32-query window with max-pooling 7,
where the published 20%-of-prompt window washed out the question), sink and window forced.
Dynamic step (each decode step): level-2 clusters of s2=32 consecutive entries (the paper's 16
for "mpcache_published"), the top ones attended next to a sink (the first cluster) and a
window of the last entries, both public slices (eviction.slices; the paper's form, first and
current clusters forced in the one-hot, is forced="clusters"). `score2` picks how clusters are
ranked: "exact" (default) by the max over each cluster of the step's own q . k, maxed over the
KV group's query heads (`score_heads`; the scores attention computes anyway, so one matmul
serves both; s2 - 1 comparisons per cluster; no level-1 search); "khat" (the paper's) by the
comparison-free similarity q . (alpha r_max + (1-alpha) r_min), after a top-k1 search over
level-1 clusters (s1=32) scored by `score1`; "bound" (Quest's exact upper bound in its split
form, relu(q) . r_max + min(q, 0) . r_min) or "mix" (khat + bound). Why "exact": on varied
natural haystacks the khat similarity ranks the needle's clusters too low (the cluster holding
a code's start is chosen, the next one, holding the rest, is not: docs/accuracy.md); chosen on
seeds 1000-1007 (results/tune_2k_exact), reported on held-out seeds; equal selection bytes
under ABY3 (its max tree replaces the level-1 search), about half the rounds; clusters of 32
scored as 16 did on the tuning seeds, with half the search and a quarter of the one-hot
compaction (results/tune_2k_exact_cheap).
Layer-wise index sharing by `share` pattern. `gather` says how attention reaches the
selection (see eviction.base.check_gather); the default "scores" gathers only score scalars,
so the softmax runs over k2 * s2 entries and no key/value row is gathered. The budget
(fraction of the prompt attended) fixes k2.

Default: NO static eviction (static_ratio=1.0) and NO layer sharing (share="none"): the
dynamic step over the whole prompt, every layer selecting its own clusters. Measured on
SmolLM2 (README, accuracy section): every static step here (the paper's, ours with a 32-query
window and pooling, SnapKV's) loses the needle when the question arrives after the context was
compressed, and the paper's loses it even with the question inside; the dynamic step alone
does not. Under MPC the static step is also the most expensive part of a prompt: at 8k
tokens, LLaMA-2-7B shapes, ~80 GB under ABY3 and SEMI2K (the 1-bit sort) and 265 GB under
CHEETAH (a one-hot per block of 512), 10-16 full decode steps (README). Pair sharing lost
further needles (README).
Level-2 clusters of 8 (`mpcache:s2=8`) kept more of the score still, but double the slots and
the clusters of the per-step compaction (4x its equalities, ~2x the layer's bytes): reported
as a variant, not the default. Named settings: "mpcache_shared" = share="pairs" (no static
step: the second default), "mpcache_static" = static step kept (ratio max(0.5, 2 * budget),
32-query window, max-pooling 7, pairs: the first default), "mpcache_published" = the paper's
(`published()`: window 20% of T, sum, no pooling, pairs).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from eviction import attention
from eviction.base import BIG, Policy, check_gather, check_ratio, topk_mask
from eviction import neighbors, slices
from eviction.clusters import cluster_candidates, expand, forced_rows
from eviction.compaction import compaction_matrix, onehot_form
from eviction.quest import quest_bound
from eviction.sharing import PATTERNS, share_source
from eviction.static_scores import max_pool
from mpc_llama.errors import ConfigError


SCORES = ("khat", "bound", "mix", "exact")
# the default schedule: select at each of the first AUTO_WARMUP decode steps from the last
# input token, then every AUTO_REFRESH steps (tuned on seeds 1000-1007: results/tune_2k_anchor
# for the warm-up, results/tune_2k_refresh32: refresh 32 scored what 16 did, cell by cell, at
# half the amortised selection cost). A warm-up of 16, not 8: a chat answer that restates the
# question first reaches the code after ~12 tokens, and a selection kept from step 8 lost its
# continuation (results/tune_2k_pydoc: needles in Python's documentation prose)
AUTO_REFRESH, AUTO_WARMUP = 32, 16
# "mpcache_static" ranks its static step inside blocks of this many prompt entries
# (`Policy.static_block`): under CHEETAH the global one-hot (keep x T equalities) made its
# static step cost 89.5 full decode steps at 8k (7B shapes), blocks of 512 16.3
# (results/cheetah_8192_blocklocal); on tuning seeds 1000-1007 at 4k (32 samples per cell)
# it scored 0.31 against the global ranking's 0.28 (results/tune_4k_static_block). The
# baselines (SnapKV, H2O) keep their global ranking; `mpcache_static:static_block=0` is
# the global one.
STATIC_BLOCK = 512
FORCED = ("auto", "slices", "clusters")
HEAD_SCORES = ("sum", "max", "norm")


def step_scores(q, cache_k):
    """The step's scores q . k / sqrt(d) [b, k, g, c]: q [b, k, g, d]; cache_k [b, k, c, d],
    or a tuple of its row segments (one matmul each: under SEMI2K a frozen segment's Beaver
    opening is reused)."""
    if isinstance(cache_k, tuple):
        return jnp.concatenate([step_scores(q, part) for part in cache_k], axis=-1)
    return jnp.einsum("bkgd,bkcd->bkgc", q, cache_k) / math.sqrt(q.shape[-1])


def _pad_rows(a, n: int):
    """a [b, k, c, ...] with zero rows appended up to n rows (as it is when c >= n)."""
    if a.shape[2] >= n:
        return a
    pad = [(0, 0)] * a.ndim
    pad[2] = (0, n - a.shape[2])
    return jnp.pad(a, pad)


@dataclasses.dataclass(frozen=True)
class MPCache(Policy):
    name = "mpcache"
    budget: float = 0.1
    static_ratio: Optional[float] = 1.0    # 1.0: no static step; None: max(0.5, 2*budget)
    window: int = 32                       # observation queries; 0 = window_fraction * T
    window_fraction: float = 0.2
    aggregate: str = "sum"
    kernel: int = 7
    alpha: float = 0.6
    ratio1: float = 0.5
    share: str = "none"                    # every layer selects ("pairs": the paper's sharing)
    s1: int = 32
    s2: int = 32                           # level-2 cluster size (16 for score2=khat)
    gather: str = "scores"    # scores | kv | mask: how attention reaches the selection
    selector: str = "lean"    # cluster top-k (eviction.topk): lean = 4-way search, 8 bits
    score1: str = "khat"      # level-1 cluster score: khat (q . khat) | bound (Quest's) | mix
    score2: str = "exact"     # level-2 cluster score: exact (max of the step's own q . k, no
                              # level-1 search) | khat (the paper's) | bound | mix (khat + bound)
    score_pool: int = 1       # score2=exact: adjacent entries summed before the cluster max
    score_heads: str = "max"  # score2=exact, GQA: the KV group's query heads' scores: their
                              # "max" (default: 1.00 vs "sum"'s 0.89 on the tuning seeds,
                              # results/tune_2k_heads), "sum", or "norm": the max of each
                              # head's score less that head's max over the cache
    refresh: Optional[int] = None  # select every `refresh` decode steps, reuse the selection
                              # between; None: AUTO_REFRESH (min with s2) where the settings
                              # allow a kept selection (see resolve_schedule), else 1
    warmup: Optional[int] = None   # refresh > 1: decode steps from the last input token that
                              # select at every step before the every-`refresh` schedule
                              # (> 0: so does every step reading input fed before it);
                              # None: AUTO_WARMUP with the automatic refresh, else 0
    kept: str = "kv"          # refresh > 1: "kv" keeps the chosen clusters' K/V rows (compact
                              # cache, gathered once per refresh), "onehot" their one-hot only
    split_kept: bool = False  # kept="kv": compact and forced rows multiplied apart (SEMI2K, set
                              # by compaction.for_protocol: the compact rows' Beaver opening)
    neighbors: int = 0        # right neighbours selected with each chosen level-2 cluster
    neighbors_left: int = 0   # left neighbours likewise (eviction.neighbors)
    neighbor_tops: int = 0    # 0: every chosen cluster gets neighbours; m: the m best only
    dense_layers: int = 0     # the first layers attend the whole cache (Quest skips 2)
    forced: str = "auto"      # "slices": the first cluster and a window of the last W entries
                              # as public slices, W filling the budget (eviction.slices);
                              # "clusters": the first and current clusters in the one-hot (the
                              # paper's); auto: slices, clusters with refresh > 1
    dynamic = True
    needs_bounds = True

    def __post_init__(self):
        super().__post_init__()
        check_gather(self.gather)
        self.resolve_schedule()
        if self.static_ratio is not None:
            check_ratio("static_ratio", self.static_ratio)
            if self.static_ratio < self.budget:
                raise ConfigError(f"static_ratio {self.static_ratio} is below the budget "
                                  f"{self.budget}: the dynamic step cannot attend more than "
                                  "the static step keeps")
        check_ratio("ratio1", self.ratio1)
        check_ratio("window_fraction", self.window_fraction)
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.aggregate not in ("sum", "max"):
            raise ConfigError(f"aggregate must be sum or max, got {self.aggregate!r}")
        if self.window < 0 or self.kernel < 1:
            raise ConfigError("window must be >= 0 and kernel >= 1")
        if self.share not in PATTERNS:
            raise ConfigError(f"unknown sharing pattern {self.share!r}; choose from {PATTERNS}")
        for field in ("score1", "score2"):
            if getattr(self, field) not in SCORES:
                raise ConfigError(f"{field} must be one of {SCORES}, got "
                                  f"{getattr(self, field)!r}")
        if self.score_heads not in HEAD_SCORES:
            raise ConfigError(f"score_heads must be one of {HEAD_SCORES}, got "
                              f"{self.score_heads!r}")
        if self.score_pool < 1 or self.s2 % self.score_pool:
            raise ConfigError(f"score_pool {self.score_pool} must be >= 1 and divide s2="
                              f"{self.s2}")
        if self.score1 == "exact":
            raise ConfigError("score1 cannot be exact: score2=exact scores level-2 clusters by "
                              "the step's own q . k and skips level 1")
        if not 1 <= self.refresh <= self.s2:
            raise ConfigError(f"refresh must be in [1, s2={self.s2}], got {self.refresh}")
        if self.warmup < 0 or (self.warmup and self.refresh == 1):
            raise ConfigError(f"warmup must be >= 0 and needs refresh > 1, got warmup="
                              f"{self.warmup} with refresh={self.refresh}")
        if self.dense_layers < 0:
            raise ConfigError(f"dense_layers must be >= 0, got {self.dense_layers}")
        if self.forced not in FORCED:
            raise ConfigError(f"forced must be one of {FORCED}, got {self.forced!r}")
        if self.forced == "slices" and self.refresh > 1:
            raise ConfigError("forced=slices needs refresh=1: a kept selection forces the "
                              "recent clusters (forced=clusters)")
        if self.kept not in ("kv", "onehot"):
            raise ConfigError(f"kept must be kv or onehot, got {self.kept!r}")
        if self.refresh > 1 and (self.compaction == "sort" or self.gather != "scores"):
            raise ConfigError("refresh > 1 keeps a one-hot selection: it needs "
                              "compaction onehot (or auto) and gather scores")
        if min(self.neighbors, self.neighbors_left, self.neighbor_tops) < 0:
            raise ConfigError("neighbors, neighbors_left and neighbor_tops must be >= 0")
        if self.s2 < 1 or self.s1 % self.s2:
            raise ConfigError(f"level-2 cluster size {self.s2} must divide the level-1 size "
                              f"{self.s1}")

    def resolve_schedule(self) -> None:
        """Fills refresh and warmup left to None (frozen: set once, here): the kept
        selection's schedule (refresh = min(AUTO_REFRESH, s2), warmup = AUTO_WARMUP) where
        nothing rules a kept selection out (forced slices, compaction sort, gather other than
        scores, dense layers, layer sharing), else every step (refresh 1, warmup 0)."""
        kept_ok = (self.forced != "slices" and self.compaction != "sort"
                   and self.gather == "scores" and self.dense_layers == 0
                   and self.share == "none")
        auto = self.refresh is None
        if auto:
            object.__setattr__(self, "refresh", min(AUTO_REFRESH, self.s2) if kept_ok else 1)
        if self.warmup is None:
            object.__setattr__(self, "warmup", AUTO_WARMUP if auto and self.refresh > 1 else 0)

    @property
    def cluster_sizes(self):
        return (self.s1, self.s2)

    @classmethod
    def published(cls, budget: float = 0.1) -> "MPCache":
        """The settings of the paper: static step keeping max(50%, 2 x budget), 20%-of-prompt
        window, summed, no pooling; the first and current clusters forced in the one-hot."""
        return cls(budget=budget, static_ratio=None, window=0, window_fraction=0.2,
                   aggregate="sum", kernel=1, share="pairs", score2="khat", selector="auto",
                   s2=16, forced="clusters", refresh=1)

    @classmethod
    def with_static(cls, budget: float = 0.1) -> "MPCache":
        """A static step (max(50%, 2 x budget), 32-query window, max-pooling 7, ranked inside
        blocks of STATIC_BLOCK entries) before the dynamic one with the paper's layer sharing:
        the first default, "mpcache_static"."""
        return cls(budget=budget, static_ratio=None, share="pairs", refresh=1,
                   static_block=STATIC_BLOCK)

    @classmethod
    def shared(cls, budget: float = 0.1) -> "MPCache":
        """No static step, the paper's layer sharing "pairs": the second default,
        "mpcache_shared" (cheaper per step, lower accuracy)."""
        return cls(budget=budget, share="pairs", refresh=1)

    # ---- static ----
    def effective_static_ratio(self) -> float:
        return self.static_ratio if self.static_ratio is not None else min(
            1.0, max(0.5, 2 * self.budget))

    def window_len(self, prompt_len: int) -> int:
        return self.window or max(1, int(self.window_fraction * prompt_len))

    def static_keep(self, prompt_len):
        keep = int(round(self.effective_static_ratio() * prompt_len))
        return max(self.n_attend(prompt_len), min(prompt_len, keep))

    def static_forced(self, prompt_len):
        pos = np.arange(prompt_len)
        w = min(self.window_len(prompt_len), self.static_keep(prompt_len) - self.s2)
        return (pos < self.s2) | (pos >= prompt_len - max(w, 0))

    def prompt_attention(self, prompt_len):
        return self.window_len(prompt_len), self.aggregate

    def static_rank(self, attn, cfg):
        return max_pool(attn, self.kernel)

    def share_source(self, layer, n_layers):
        return share_source(self.share, layer, n_layers)

    def layer_policy(self, layer, n_layers):
        """None (the whole cache) for the first `dense_layers` decode layers, else self."""
        return None if layer < self.dense_layers else self

    # ---- dynamic ----
    def k2(self, prompt_len: int) -> int:
        """Level-2 clusters attended per step, forced ones included (public)."""
        # with refresh > 1: first, previous and current forced, and at least one chosen
        return max(2 if self.refresh == 1 else 4, self.n_attend(prompt_len) // self.s2)

    @property
    def slices(self) -> bool:
        """Whether the forced entries are public slices (`forced`; eviction.slices)."""
        return self.forced == "slices" or (self.forced == "auto" and self.refresh == 1)

    def free_slots(self, prompt_len: int) -> int:
        """Clusters chosen per step (public): with slices, n_attend // s2 - 2 (the sink is
        one cluster, the window the rest of the budget: W in [s2, 2 s2)); with forced
        clusters, k2 - 1 - recent."""
        if self.slices:
            return max(0, self.n_attend(prompt_len) // self.s2 - 2)
        return self.k2(prompt_len) - 1 - self.recent

    def spans(self, prompt_len: int):
        """The forced slices (eviction.slices.Spans: sink = the first cluster, window = the
        budget left after it and the chosen clusters, at least 1 entry), or None with forced
        clusters. Sink + window + chosen clusters attend n_attend entries (once the sink is
        full)."""
        if not self.slices:
            return None
        rest = self.n_attend(prompt_len) - (self.free_slots(prompt_len) + 1) * self.s2
        return slices.Spans(self.s2, max(1, rest))

    def chooses(self, prompt_len: int) -> bool:
        return self.free_slots(prompt_len) > 0

    def k1(self, prompt_len: int, n1: int) -> int:
        """Level-1 clusters kept: ratio1 of those over the static cache, enough for k2."""
        kept1 = math.ceil(self.static_keep(prompt_len) / self.s1)
        return min(n1, max(int(self.ratio1 * kept1), math.ceil(self.k2(prompt_len) / 2) + 1))

    @property
    def bounds_alpha(self):
        return self.alpha

    @property
    def needs_scores(self) -> bool:
        """Whether the selection ranks clusters by the step's attention scores (score2 =
        "exact"): the decode step then computes q . k once for selection and attention."""
        return self.score2 == "exact"

    def exact_score(self, q, cache_k, scores=None, window=None):
        """Level-2 cluster scores [b, k, n2] by "exact": the max over each cluster of the
        query heads' summed scores q . k / sqrt(d), taken over sums of `score_pool` adjacent
        entries (1: over the entries). q: [b, k, g, d]; cache_k: [b, k, c, d]; scores: the
        step's attention scores [b, k, g, c] when the caller has them (the decode step does:
        no second matmul). One max tree per KV head: s2 / score_pool - 1 comparisons per
        cluster (the sums are local under MPC).
        window: (length, Spans) with score_pool 1: also the max over the window slice's
        valid entries [b, k, r] (r <= 2 rows of s2, maxed by the caller), from the SAME
        reduction (its rows appended to the clusters': no extra comparison round)."""
        if scores is None:
            scores = step_scores(q, cache_k)
        summed = self.head_score(scores)
        b, h, c = summed.shape
        p = self.score_pool
        pooled = summed.reshape(b, h, c // self.s2, self.s2 // p, p).sum(axis=-1)
        if window is None:
            return pooled.max(axis=-1)
        n2 = c // self.s2
        both = jnp.concatenate([pooled, slices.window_rows(summed, *window, self.s2)],
                               axis=2).max(axis=-1)
        return both[..., :n2], both[..., n2:]

    def head_score(self, scores):
        """Per-entry scores [b, k, c] from the query heads' [b, k, g, c] (`score_heads`;
        entries beyond the cache must hold -BIG for "norm"). One query head per KV head: the
        head's own scores, whatever the setting."""
        if scores.shape[2] == 1:
            return scores[:, :, 0]
        if self.score_heads == "sum":
            return scores.sum(axis=2)
        if self.score_heads == "norm":
            scores = scores - scores.max(axis=-1, keepdims=True)
        return scores.max(axis=2)

    def cluster_score(self, q, bounds, level: int):
        """Level-1 or level-2 cluster scores [b, k, c], summed over the group's query heads.

        "khat": the comparison-free similarity q . khat (khat kept in the cache);
        "bound": Quest's exact upper bound on q . k over the cluster, in its split form
        (one comparison per element of q, G*D per step, whatever the cache length);
        "mix": their sum."""
        form = self.score1 if level == 1 else self.score2
        rmax, rmin, kh = (bounds[2], bounds[3], bounds[5]) if level == 1 else (
            bounds[0], bounds[1], bounds[4])
        if form == "bound":
            return quest_bound(q, rmax, rmin, "split")
        sim = jnp.einsum("bkgd,bkcd->bkc", q, kh)
        return sim + quest_bound(q, rmax, rmin, "split") if form == "mix" else sim

    @property
    def recent(self) -> int:
        """Most recent level-2 clusters always attended: the current one, and with
        `refresh` > 1 also the one before (tokens written since the last selection lie in
        those two, as refresh <= s2)."""
        return 1 if self.refresh == 1 else 2

    def gives_max(self, group_size: int, prompt_len: int) -> bool:
        """Whether select_clusters(with_max=True) yields the softmax's row max: score2 =
        "exact" over single entries (score_pool 1) with one query head per KV head, where a
        cluster's score IS the max of its entries' attention scores, so the max over the
        selected entries is the max of the search's own max (over the candidates, the best of
        which is always chosen) and the two forced clusters' scores: 2 comparisons instead of
        the softmax's log2(k2 * s2)-level max tree. Not when nothing is chosen (short
        prompts: the selection then has no search)."""
        chosen = neighbors.tops(self.free_slots(prompt_len), self.neighbors,
                                self.neighbors_left, self.neighbor_tops)[0]
        return self.score2 == "exact" and self.score_pool == 1 and group_size == 1 and \
            self.refresh == 1 and chosen > 0

    def select_clusters(self, q, cache_k, bounds, length, prompt_len, cfg, scores=None,
                        with_max: bool = False):
        """(mask bool [b, k, n2], s2, slots): with forced clusters the mask holds them and
        slots = k2; with slices (`spans`) it holds the chosen clusters only (slots =
        free_slots) and attention adds the slices. with_max: a 4th element, the max of the
        step's scores over the attended valid entries [b, k, 1, 1] where `gives_max` (else
        None)."""
        exact = self.score2 == "exact"   # bounds: () (none kept), else the six bounds
        n2 = cache_k.shape[2] // self.s2
        slots = self.free_slots(prompt_len)
        spans = self.spans(prompt_len)
        want = with_max and self.gives_max(q.shape[2], prompt_len)
        window_max = None
        if want or (exact and self.score_heads == "norm" and q.shape[2] > 1):
            if scores is None:
                scores = step_scores(q, cache_k)
            # entries beyond the cache scored -BIG (a public mask: local under MPC), so the
            # first (or current) cluster's score is the max over its valid entries; no
            # candidate (a completely filled cluster) changes, so neither does the selection
            scores = jnp.where(jnp.arange(cache_k.shape[2]) < length, scores, -BIG)
        if exact and want and spans is not None:
            sim2, window_max = self.exact_score(q, cache_k, scores, (length, spans))
        elif exact:
            sim2 = self.exact_score(q, cache_k, scores)
        else:
            sim2 = self.cluster_score(q, bounds, 2)
        if spans is None:
            cand2, forced2 = cluster_candidates(length, n2, self.s2, self.recent)
            within = jnp.logical_or(cand2, forced2)
        else:   # neighbours stay among the candidates: a slice entry is attended once
            cand2 = within = slices.candidates(length, n2, self.s2, spans)
            forced2 = jnp.zeros((n2,), bool)
        n1 = n2 if exact else bounds[5].shape[2]
        if exact or self.k1(prompt_len, n1) >= n1:   # exact, or level 1 keeps every cluster
            eligible = cand2
        else:
            sim1 = self.cluster_score(q, bounds, 1)
            cand1, forced1 = cluster_candidates(length, n1, self.s1)
            keep1 = jnp.logical_or(topk_mask(sim1, self.k1(prompt_len, n1) - 2, cand1,
                                             self.selector), forced1)
            eligible = jnp.logical_and(cand2, expand(keep1, self.s1 // self.s2))
        # the chosen clusters and their neighbours share the free slots
        chosen = neighbors.select(sim2, slots, eligible, within, self.neighbors,
                                  self.neighbors_left, self.neighbor_tops, self.selector,
                                  with_max=want)
        if want:
            chosen, top = chosen
        keep2 = jnp.logical_or(chosen, forced2)
        total = slots if spans is not None else self.k2(prompt_len)
        if not with_max:
            return keep2, self.s2, total
        if not want:
            return keep2, self.s2, total, None
        if spans is None:
            window_max = jax.lax.dynamic_slice_in_dim(sim2, (length - 1) // self.s2, 1, axis=-1)
        # one max over the search's own max, the sink's and the window's (<= 4 values)
        row_max = jnp.concatenate([top, sim2[..., :1], window_max], axis=-1).max(
            axis=-1, keepdims=True)                                               # [b, k, 1]
        return keep2, self.s2, total, row_max[:, :, None, :]

    @property
    def keeps_bounds(self) -> bool:
        """Whether the cluster bounds live in the cache state: not with score2="exact",
        which ranks by the step's own scores (no bounds computed at prefill, none updated
        per step); the state is then () plus, with `refresh` > 1, the kept selection."""
        return self.score2 != "exact"

    @property
    def n_bounds(self) -> int:
        """Leading entries of the state that are cluster bounds (6 or 0)."""
        return 6 if self.keeps_bounds else 0

    # ---- a selection kept for `refresh` steps (the cache state's last part) ----
    def init_state(self, keys, n_keep, prompt_len):
        bounds = super().init_state(keys, n_keep, prompt_len) if self.keeps_bounds else ()
        if self.refresh == 1:
            return bounds
        b, h, c, _ = keys.shape
        m = self.k2(prompt_len) - 1 - self.recent
        kept = jnp.zeros((b, h, m, c // self.s2), keys.dtype)
        if self.kept == "onehot":
            return bounds + (kept,)
        held = (1 + self.recent) * self.s2 if self.holds_forced else 0
        rows = jnp.zeros((b, h, m * self.s2 + held, keys.shape[-1]), keys.dtype)
        return bounds + (kept, rows, rows, jnp.zeros((b, h, m * self.s2), keys.dtype))

    def update_state(self, state, key, index):
        nb = self.n_bounds
        head = super().update_state(tuple(state[:nb]), key, index) if nb else ()
        return head + tuple(state[nb:])

    def compact_kv(self, kept, ck, cv, length, segments=None, all_valid: bool = False):
        """The kept clusters' rows, gathered once per refresh: kept [b, k, m, n2] (0/1 one-hot
        of the chosen clusters); ck, cv [b, k, c, d] (or `segments`: (key parts, value parts),
        row segments of them, see model.attention_scores). Returns (keys, values [b, k,
        m*s2, d], ok [b, k, m*s2]: 1.0 where the row is a valid cache entry, or None with
        all_valid (static, public: `kept_rows_valid`), where no one reads it: a third
        gather, one-hot x validity, saved; under CHEETAH a homomorphic matmul). The chosen
        clusters are complete and older than the two most recent ones, so their rows do not
        change until the next refresh."""
        from eviction.compaction import gather_segments

        kparts, vparts = segments if segments is not None else ((ck,), (cv,))
        rows = (gather_segments(kept, self.s2, kparts), gather_segments(kept, self.s2, vparts))
        if all_valid:
            return rows + (None,)
        valid = jnp.broadcast_to((jnp.arange(ck.shape[2]) < length).astype(ck.dtype),
                                 ck.shape[:3])
        return rows + (gather_segments(kept, self.s2, (valid,)),)

    def forced_kv(self, ck, cv, length):
        """The forced clusters' rows (first, then the `recent` last, oldest first) by PUBLIC
        slices (length is public: no matmul, no communication): keys, values [b, k,
        (1+recent)*s2, d] and their validity, bool [b, k, (1+recent)*s2] (public; a recent
        row inside the first cluster, or beyond the cache, is invalid, as forced_rows
        zeroes a repeated cluster)."""
        s2, r = self.s2, self.recent
        # a cache shorter than the recent clusters: zero rows after
        ck, cv = (_pad_rows(a, r * s2) for a in (ck, cv))
        start = self._window(length) * s2
        first = (ck[:, :, :s2], cv[:, :, :s2])
        recent = [jax.lax.dynamic_slice_in_dim(a, start, r * s2, axis=2) for a in (ck, cv)]
        pos = start + jnp.arange(r * s2)
        ok = jnp.concatenate([jnp.arange(s2) < length,
                              jnp.logical_and(pos >= s2, pos < length)])
        return (jnp.concatenate([first[0], recent[0]], axis=2),
                jnp.concatenate([first[1], recent[1]], axis=2),
                jnp.broadcast_to(ok, ck.shape[:2] + ok.shape))

    # ---- the forced rows held between selections (SEMI2K's Beaver cache) ----
    @property
    def holds_forced(self) -> bool:
        """Whether a selecting step also keeps the forced clusters' rows written so far (the
        first cluster and the recent window, `hold_forced`) after the kept rows, in the same
        compact arrays, so that a step opens only the last `refresh` rows of the cache
        (`forced_from_held`) besides them: under SEMI2K (`split_kept`) the compact rows are
        Beaver-cached variables, while public slices of the cache are new buffers, opened
        again at every step (refresh <= s2, so the last refresh rows are at most a third
        of the forced ones). In the same arrays, not their own: each matmul segment costs
        its own message rounds per head. The attended rows are the same (`forced_kv`'s)."""
        return self.split_kept and self.refresh > 1 and self.kept == "kv"

    def _window(self, length):
        """The first cluster of the recent window at `length` (public): the `recent` clusters
        from it are forced (the first ones where the cache is shorter)."""
        return jnp.maximum((length - 1) // self.s2 - self.recent + 1, 0)

    def _slots(self, length):
        """int [recent] (public): the window's cluster in each slot of the held rows,
        cluster j in slot j mod recent (a later step, whose window starts a cluster later,
        finds each cluster still held where it looks)."""
        w0 = self._window(length)
        return w0 + (jnp.arange(self.recent) - w0) % self.recent

    def hold_forced(self, ck, cv, length):
        """At a selecting step (length public): keys, values [b, k, (1 + recent)*s2, d], the
        first cluster's rows, then the recent window's clusters in their `_slots` (public
        slices)."""
        s2 = self.s2
        ck, cv = (_pad_rows(a, self.recent * s2) for a in (ck, cv))
        starts = self._slots(length) * s2
        return tuple(jnp.concatenate(
            [a[:, :, :s2]] + [jax.lax.dynamic_slice_in_dim(a, starts[t], s2, axis=2)
                              for t in range(self.recent)], axis=2) for a in (ck, cv))

    def held_mask(self, length, capacity: int) -> jax.Array:
        """bool [(1 + recent)*s2 + refresh] (public): which held rows (`hold_forced`'s, as
        written at the last selection) and which of the last `refresh` rows (`live_kv`)
        a reusing step at `length` attends: every forced row (`forced_kv`'s valid ones) once,
        from the held rows if written more than `refresh` rows ago (so before the last
        selection, refresh steps apart at most), else from the live rows."""
        s2, w = self.s2, self.refresh
        cut = length - w                        # rows before it: held since the selection
        w0 = self._window(length)
        first = jnp.arange(s2) < cut
        p = (self._slots(length)[:, None] * s2 + jnp.arange(s2)).reshape(-1)
        ring = jnp.logical_and(p >= s2, p < cut)
        q = jnp.clip(cut, 0, max(capacity, w) - w) + jnp.arange(w)
        forced = jnp.logical_or(q < s2, q >= w0 * s2)
        live = jnp.logical_and(jnp.logical_and(forced, q < length), q >= cut)
        return jnp.concatenate([first, ring, live])

    def live_kv(self, ck, cv, length):
        """The last `refresh` rows of the cache (public slices: opened at every step under
        SEMI2K): keys, values [b, k, refresh, d]."""
        w = self.refresh
        ck, cv = (_pad_rows(a, w) for a in (ck, cv))
        start = jnp.clip(length - w, 0, ck.shape[2] - w)
        return tuple(jax.lax.dynamic_slice_in_dim(a, start, w, axis=2) for a in (ck, cv))

    def forced_from_held(self, ck, cv, length):
        """With the forced rows held after the compact rows (`holds_forced`): the rest of
        what `forced_kv` gives, the last `refresh` rows (`live_kv`), and the validity of the
        held rows and those, bool [b, k, (1+recent)*s2 + refresh] (`held_mask`)."""
        live = self.live_kv(ck, cv, length)
        ok = self.held_mask(length, ck.shape[2])
        return live[0], live[1], jnp.broadcast_to(ok, ck.shape[:2] + ok.shape)

    def kept_rows_valid(self, prompt_len: int) -> bool:
        """Whether every kept row is a valid cache entry at every step after a prompt_len
        prompt (public): the chosen clusters are complete, and there are always more
        candidates (at least prompt_len // s2 - 1 - recent complete clusters that are not
        forced) than the k2 - 1 - recent slots they fill; attention then needs no secret
        validity mask over them. Not with neighbours: dilations that overlap (or reach a
        forced cluster) leave slots empty."""
        if self.neighbors or self.neighbors_left:
            return False
        return prompt_len // self.s2 >= self.k2(prompt_len)

    def attend_kept(self, q, compact, forced, cfg, all_valid: bool = False):
        """Attention over the compact cache (kept rows) and the forced clusters' rows, like
        `oracle` over its budget. compact: compact_kv's triple; forced: forced_kv's.
        all_valid (static, public: kept_rows_valid): the kept rows are all valid, so their
        mask is a public constant instead of compact's secret validity.
        Returns (out [b, 1, n*d], attended counts [b, k])."""
        from mpc_llama.model import attend

        ok = jnp.ones(compact[2].shape, bool) if all_valid else compact[2] > 0.5
        mask = jnp.concatenate([ok, forced[2]], axis=-1)
        keys, values = (compact[0], forced[0]), (compact[1], forced[1])
        if not self.split_kept:   # one matmul each: fewer rounds than two segments
            keys, values = (jnp.concatenate(a, axis=2) for a in (keys, values))
        out = attend(q, keys, values, mask[:, :, None, None, :], cfg)
        return out, mask.sum(axis=-1)

    def refresh_selection(self, q, cache_k, bounds, length, prompt_len, cfg, key_parts=None):
        """The part of a selection kept across steps: the one-hot matrix [b, k, k2 - 1 -
        recent, n2] of the chosen (not forced) clusters. q: [b, k, g, d]. key_parts: row
        segments of cache_k (e.g. the frozen rows and the tail): with score2=exact the scores
        are one matmul per segment, so that under SEMI2K the frozen rows' Beaver opening is
        reused (the same scores as one matmul over cache_k)."""
        scores = None
        if key_parts is not None and self.score2 == "exact":
            scores = step_scores(q, tuple(key_parts))
        keep2, _, slots = self.select_clusters(q, cache_k, bounds, length, prompt_len, cfg,
                                               scores=scores)
        forced = cluster_candidates(length, keep2.shape[-1], self.s2, self.recent)[1]
        return compaction_matrix(jnp.logical_and(keep2, jnp.logical_not(forced)),
                                 slots - 1 - self.recent,
                                 onehot_form(self)).astype(cache_k.dtype)

    def with_forced(self, kept, length):
        """The kept one-hot rows plus the forced clusters' public rows: [b, k, k2, n2]."""
        rows = forced_rows(length, kept.shape[-1], self.s2, self.recent).astype(kept.dtype)
        return jnp.concatenate([kept, jnp.broadcast_to(rows, kept.shape[:2] + rows.shape)],
                               axis=2)

    def decode_attention(self, q, ck, cv, state, length, prompt_len, cfg, selection=None,
                         select_now=True, segments=None):
        if self.refresh == 1:
            return super().decode_attention(q, ck, cv, state, length, prompt_len, cfg,
                                            selection, select_now, segments)
        nb = self.n_bounds
        kept = state[nb]
        if selection is None and self.kept == "kv":
            compact = tuple(state[nb + 1:nb + 4])
            if select_now:
                qg = q[:, 0].reshape(q.shape[0], cfg.n_kv_heads, cfg.group_size, cfg.head_dim)
                kept = self.refresh_selection(qg, ck, state[:nb], length, prompt_len, cfg,
                                              None if segments is None else segments[0])
                new = self.compact_kv(kept, ck, cv, length, segments,
                                      self.kept_rows_valid(prompt_len))
                # all valid: the state's validity entry is left as it is (never read)
                compact = new[:2] + (compact[2] if new[2] is None else new[2],)
                if self.holds_forced:   # the forced rows so far, after the kept ones
                    held = self.hold_forced(ck, cv, length)
                    compact = tuple(jnp.concatenate([c, h], axis=2)
                                    for c, h in zip(compact[:2], held)) + compact[2:]
            forced = (self.forced_from_held(ck, cv, length) if self.holds_forced
                      else self.forced_kv(ck, cv, length))
            out, count = self.attend_kept(q, compact, forced, cfg,
                                          self.kept_rows_valid(prompt_len))
            selection = ("scores", self.with_forced(kept, length), self.s2,
                         self.k2(prompt_len), None)
            return out, selection, count, tuple(state[:nb]) + (kept,) + compact
        if selection is None:
            if select_now:
                qg = q[:, 0].reshape(q.shape[0], cfg.n_kv_heads, cfg.group_size, cfg.head_dim)
                kept = self.refresh_selection(qg, ck, state[:nb], length, prompt_len, cfg,
                                              None if segments is None else segments[0])
            selection = ("scores", self.with_forced(kept, length), self.s2,
                         self.k2(prompt_len), None)
        out, selection, count = attention.decode_attention(q, ck, cv, state, length, self,
                                                           prompt_len, cfg, selection, segments)
        return out, selection, count, tuple(state[:nb]) + (kept,) + tuple(state[nb + 1:])
