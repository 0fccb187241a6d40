"""The policy interface and the pieces every policy shares.

A policy is a frozen dataclass passed to `mpc_llama.model.prefill` / `decode_step` as a
static argument, so every size it derives (kept counts, k1, k2) is a Python int computed from
public lengths: shapes stay static under SPU and nothing about them depends on secrets.

Two hooks (kvpress style: a subclass writes only what differs):
  * static step, once at the end of prefill: `static_keep(T)` entries per layer and KV head are
    kept, chosen by `static_scores` (higher = keep) with `static_forced(T)` positions always
    kept; the cache is compacted to them in position order.
  * dynamic step, every decode step: `select(...)` returns a bool mask over cache entries
    (per KV head, shared by its query heads); attention runs over those entries only.
Axis letters: b batch, k KV heads, g query heads per KV head, t/s query/key positions,
c cache entries or clusters, d head dim.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, ClassVar, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from eviction import attention, compaction as compact, slices, static_step
from eviction.static_scores import aggregate_rows, group_probs, window_attention  # noqa: F401
from eviction.clusters import expand, init_bounds, update_bounds
from eviction.topk import BIG, SELECTORS, topk_mask  # noqa: F401 (re-exported)
from mpc_llama.errors import ConfigError


def check_ratio(name: str, value: float) -> None:
    if not 0.0 < float(value) <= 1.0:
        raise ConfigError(f"{name} must be in (0, 1], got {value}")


GATHER_MODES = ("scores", "kv", "mask")


def check_gather(mode: str) -> None:
    """How a cluster policy's selection reaches attention:
    "scores": score the whole cache, gather only the selected clusters' scores, softmax over
              them, scatter the probabilities back, p . V (cheapest under ABY3);
    "kv":     gather the selected clusters' keys and values (one-hot matmul), attend to them;
    "mask":   attend to the whole cache under the selection mask (reference).
    All three give the same output."""
    if mode not in GATHER_MODES:
        raise ConfigError(f"gather must be one of {GATHER_MODES}, got {mode!r}")


@dataclasses.dataclass(frozen=True)
class Policy:
    """Base policy: the full cache. `budget` is the fraction of the prompt attended per KV
    head per decode step, sinks and windows included."""

    name: ClassVar[str] = "full"
    budget: float = 1.0
    selector: str = "search"        # decode-step top-k: "search" (batched, opens nothing)
    static_selector: str = "topk"   # prefill top-k (once per prompt): exact lax.top_k
    compaction: str = "auto"        # auto | onehot | sort (eviction.compaction; auto: per protocol)
    static_compaction: str = "auto"  # the static step's kernel when compaction is "auto":
                                     # auto | onehot | sort (per protocol: STATIC_SORT_PROTOCOLS)
    static_block: int = 0           # static step ranked inside blocks of about this many
                                    # entries, each keeping its share (0: one ranking over the
                                    # prompt; static_step.block_plan)
    backend: str = "plain"          # plain | spu: set by compaction.for_protocol when compiling
    fold_heads: int = 0             # KV heads per one-hot scatter matmul (block-diagonal;
                                    # 0: per protocol, compaction.for_protocol; 1: one per head)
    onehot_form: str = "auto"       # one-hot compaction from equalities ("eq"), threshold
                                    # comparisons ("ge") or binary digits ("digits");
                                    # auto: per protocol (compaction.ONEHOT_FORM)

    def __post_init__(self):
        check_ratio("budget", self.budget)
        if self.compaction not in compact.KERNELS:
            raise ConfigError(f"compaction must be one of {compact.KERNELS}, "
                              f"got {self.compaction!r}")
        if self.static_compaction not in compact.KERNELS:
            raise ConfigError(f"static_compaction must be one of {compact.KERNELS}, "
                              f"got {self.static_compaction!r}")
        if self.onehot_form not in compact.ONEHOT_FORMS:
            raise ConfigError(f"onehot_form must be one of {compact.ONEHOT_FORMS}, got "
                              f"{self.onehot_form!r}")
        if self.static_block < 0:
            raise ConfigError(f"static_block must be >= 0, got {self.static_block}")
        if self.fold_heads < 0:
            raise ConfigError(f"fold_heads must be >= 0, got {self.fold_heads}")
        if self.backend not in compact.BACKENDS:
            raise ConfigError(f"backend must be one of {compact.BACKENDS}, got {self.backend!r}")
        for field in ("selector", "static_selector"):
            if getattr(self, field) not in SELECTORS:
                raise ConfigError(f"{field} must be one of {SELECTORS}, "
                                  f"got {getattr(self, field)!r}")

    def n_attend(self, prompt_len: int) -> int:
        """Prompt entries attended per KV head per step (public)."""
        return max(1, min(prompt_len, int(round(self.budget * prompt_len))))

    # ---- static step ----
    def static_keep(self, prompt_len: int) -> Optional[int]:
        return None

    def static_forced(self, prompt_len: int) -> np.ndarray:
        return np.zeros(prompt_len, bool)

    def prompt_attention(self, prompt_len: int) -> Optional[Tuple[int, str]]:
        """What the static step reads of the prefill's attention: (rows, aggregate), the
        causal probabilities of the last `rows` prompt queries, summed over each KV group's
        query heads and aggregated over the rows ("sum" | "max"); None: no attention read."""
        return None

    def static_rank(self, attn: jax.Array, cfg) -> jax.Array:
        """Static-step scores [b, k, t] (higher = keep) from `prompt_attention`'s aggregate
        attn [b, k, t]."""
        return attn

    def static_attention(self, q: jax.Array, k: jax.Array, cfg) -> jax.Array:
        """`prompt_attention`'s aggregate [b, k, t] recomputed from q [b, t, k, g, d] (all
        prompt queries) and k [b, k, t, d]: the plaintext path, same values as the tap."""
        rows, aggregate = self.prompt_attention(k.shape[2])
        return window_attention(q, k, rows, aggregate, cfg)

    def static_scores(self, q: Optional[jax.Array], k: jax.Array, cfg,
                      attn: Optional[jax.Array] = None) -> jax.Array:
        """q: [b, t, k, g, d] all prompt queries; k: [b, k, t, d]; attn: the aggregate
        [b, k, t] taken from the prefill's own probabilities (`prefill_tap`; q unused), or
        None to recompute it from q and k. Returns [b, k, t]."""
        if self.static_keep(k.shape[2]) is None or self.prompt_attention(k.shape[2]) is None:
            raise TypeError(f"{self.name} has no static step ranked by attention")
        return self.static_rank(self.static_attention(q, k, cfg) if attn is None else attn,
                                cfg)

    def prefill_tap(self, prompt_len: int) -> Optional[Callable]:
        """For the model's prefill: a function of a layer's attention probabilities
        [b, k, g, t, s] returning the aggregate [b, k, s] the static step ranks by (so the
        window attention is the prefill's own, not computed twice), or None."""
        keep = self.static_keep(prompt_len)
        spec = None if keep is None or keep >= prompt_len else self.prompt_attention(prompt_len)
        if spec is None:
            return None
        return functools.partial(aggregate_rows, rows=spec[0], aggregate=spec[1])

    def share_source(self, layer: int, n_layers: int) -> int:
        """The layer whose selection this layer reuses (itself: no sharing)."""
        return layer

    def layer_policy(self, layer: int, n_layers: int):
        """The policy decode layer `layer` runs: this one, or None (the whole cache)."""
        return self

    # ---- what the model calls (by duck typing: mpc_llama never imports eviction) ----
    @property
    def static_sorts(self) -> bool:
        """Whether the static step compacts by the 1-bit sort (`compaction` "sort", or
        `static_compaction` resolved to it per protocol) instead of the one-hot matrix."""
        return "sort" in (self.compaction, self.static_compaction)

    def static_move(self, q, k, cfg, compaction: str = "policy", attn=None):
        """The static step's move for one sharing source: q [b, t, k, g, d] (all prompt
        queries), k [b, k, t, d], attn: the prefill's tapped aggregate (`prefill_tap`) or
        None. compaction "policy" (what SPU runs): the policy's kernel's move, the float
        one-hot matrix [b, k, keep, t] (with `static_block`, the per-block one-hots [b, k,
        blocks, rows, width]: static_step.block_selection) or the bool keep mask [b, k, t]
        (`static_sorts`);
        "index": int positions [b, k, keep] (the same entries; a plaintext shortcut)."""
        if compaction == "index":
            return static_step.kept_indices(self, q, k, cfg, attn)
        if self.static_sorts:
            return static_step.static_mask(self, q, k, cfg, attn)
        return static_step.static_selection(self, q, k, cfg, attn)

    def apply_static_move(self, move, compaction: str, k, v, pos):
        """k, v [b, k, t, d] and positions [b, k, t] compacted by `static_move`'s result."""
        if compaction == "index":
            k, v = (jnp.take_along_axis(a, move[..., None], axis=2) for a in (k, v))
            return k, v, jnp.take_along_axis(pos, move, axis=2)
        if self.static_sorts:
            t = k.shape[2]
            forced = self.static_forced(t)
            if self.static_keep(t) <= int(forced.sum()):
                # nothing ranked: the first static_keep forced entries, a public selection,
                # taken by public slices (SPU sorts a public key unstably)
                idx = np.nonzero(forced)[0][:self.static_keep(t)]
                return tuple(static_step.take_public(a, idx) for a in (k, v, pos))
            return static_step.partition_rows(move, self.static_keep(t), k, v, pos,
                                              self.backend)
        k, v, pos = static_step.gather_onehot(move, static_step.block_plan(self, k.shape[2]),
                                              k, v, pos)
        return k, v, jnp.round(pos).astype(jnp.int32)

    def init_state(self, keys, n_keep: int, prompt_len: int):
        """Per-layer summaries kept with the cache (cluster bounds), or None.
        keys: [b, k, C, d] after the static step, n_keep valid, of a prompt_len prompt."""
        if not self.needs_bounds:
            return None
        return init_bounds(keys, n_keep, *self.cluster_sizes, self.bounds_alpha)

    def update_state(self, state, key, index):
        """Folds the key [b, k, d] written at cache `index` (public) into the summaries."""
        if state is None:
            return None
        return update_bounds(state, key, index, *self.cluster_sizes, self.bounds_alpha)

    def decode_attention(self, q, ck, cv, state, length, prompt_len: int, cfg, selection=None,
                         select_now: bool = True, segments=None):
        """One layer's attention for the current token with this policy's selection (see
        eviction.attention.decode_attention). select_now (static, public): whether this step
        selects afresh or reuses the selection kept in `state` (policies with `refresh`).
        segments: row segments of ck / cv for the attention matmuls (SEMI2K's Beaver cache,
        see mpc_llama.model.decode_layer). Returns (out, selection, attended counts, state)."""
        out, selection, count = attention.decode_attention(q, ck, cv, state, length, self,
                                                           prompt_len, cfg, selection, segments)
        return out, selection, count, state

    def selects_at(self, step: int, last_input: int = 0) -> bool:
        """Whether decode step `step` (0 = the first after prefill) selects afresh (a public
        schedule). last_input: the step that reads the last input token (0 when the prefill
        holds all input; input fed token by token after a compressed context, e.g. a
        question after it, makes it later). Policies with `refresh` select at the first step,
        at every step of the `warmup` steps from last_input on, and every `refresh` steps
        after it (so the step that reads the last input token selects, and the warm-up's
        last selection is kept `refresh` steps). Before last_input (input being fed): with a
        warm-up, every step selects (a fed token's keys and values are written with the
        selection its own query makes: at 8k tokens a question fed under a selection kept
        from its first token lost the needle, docs/accuracy.md); without one, every
        `refresh` steps counted back from last_input."""
        r, warm = getattr(self, "refresh", 1), getattr(self, "warmup", 0)
        if step == 0 or (warm and step < last_input + warm):
            return True
        if step < last_input:
            return (last_input - step) % r == 0
        return (step - last_input - max(warm - 1, 0)) % r == 0

    def attended_mask(self, selection, valid, shape):
        """bool [b, k, c]: the entries a layer attended (plaintext diagnostics)."""
        return attention.attended_mask(selection, valid, shape)

    # ---- dynamic step ----
    dynamic: ClassVar[bool] = False
    needs_bounds: ClassVar[bool] = False

    @property
    def keeps_bounds(self) -> bool:
        """Whether the per-layer state holds cluster bounds (computed at prefill, updated
        with every key); a policy may keep a state without them (MPCache's exact ranking)."""
        return self.needs_bounds

    @property
    def cluster_sizes(self):
        """(s1, s2): level-1 and level-2 cluster sizes of the bounds kept in the cache."""
        return (32, 16)

    @property
    def bounds_alpha(self) -> float:
        """alpha of the khat summaries kept with the bounds."""
        return 0.6

    needs_scores: ClassVar[bool] = False   # select_clusters ranks by the step's q . k scores

    def select_clusters(self, q, cache_k, bounds, length, prompt_len: int, cfg, scores=None):
        """Cluster-level selection: (mask [b, k, n] over clusters, cluster size, slots = the
        public number of clusters attended), or None for token-level policies. With
        `gather`, the model gathers the selected clusters and attends to those only.
        scores: the step's attention scores [b, k, g, c] for policies with `needs_scores`
        (computed once by the decode step for selection and attention), else None."""
        return None

    def chooses(self, prompt_len: int) -> bool:
        """Whether select_clusters ranks anything at this prompt length (False: its mask is
        the forced clusters only, a public value; see compaction.partition)."""
        return True

    def select(self, q, cache_k, bounds, length, prompt_len: int, cfg) -> jax.Array:
        """q: [b, k, g, d] current query; cache_k: [b, k, c, d]; length: [] entries valid
        (current token included). Returns bool [b, k, c], the forced slices included (for
        policies with `spans`)."""
        picked = self.select_clusters(q, cache_k, bounds, length, prompt_len, cfg)
        if picked is None:
            raise TypeError(f"{self.name} has no dynamic step")
        mask, size, _ = picked
        spans = getattr(self, "spans", lambda t: None)(prompt_len)
        if spans is None:
            return expand(mask, size)
        return jnp.logical_or(expand(mask, size),
                              slices.entry_mask(length, cache_k.shape[2], spans))
