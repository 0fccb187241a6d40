"""A policy's static step on a prefilled layer: which entries it keeps, and the compaction
that moves them to the front of the cache (once per prompt, at the end of prefill)."""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from eviction.compaction import compaction_matrix, gather_rows, onehot_form, partition
from eviction.topk import topk_mask
from mpc_llama.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """Block-local ranking's public layout of a prompt (`Policy.static_block`): the forced
    entries are a prefix of `head` and a suffix of `tail` positions (kept by public slices);
    the `n` entries between them are cut into consecutive blocks of `sizes` entries (the
    first ones one longer), of which block j keeps its `quotas[j]` best (proportional to its
    size, the first blocks taking the remainder: non-increasing). Every size and quota is a
    function of the prompt length only."""

    head: int
    tail: int
    sizes: Tuple[int, ...]
    quotas: Tuple[int, ...]

    @property
    def width(self) -> int:
        """Entries per padded block (the longest block)."""
        return max(self.sizes)

    @property
    def rows(self) -> int:
        """Slots per block's one-hot (the largest quota)."""
        return max(self.quotas)

    @property
    def runs(self) -> Tuple[Tuple[int, int, int], ...]:
        """(first block, end block, quota) of each run of blocks with the same quota."""
        out, start = [], 0
        for j in range(1, len(self.quotas) + 1):
            if j == len(self.quotas) or self.quotas[j] != self.quotas[start]:
                out.append((start, j, self.quotas[start]))
                start = j
        return tuple(out)

    def valid(self) -> np.ndarray:
        """bool [blocks, width]: which padded slots hold a prompt entry (public)."""
        return np.arange(self.width) < np.asarray(self.sizes)[:, None]


def block_plan(policy, t: int) -> Optional[BlockPlan]:
    """The policy's block-local layout at prompt length t, or None where it ranks globally
    (`static_block` 0, nothing ranked, or a single block)."""
    block = getattr(policy, "static_block", 0)
    keep = policy.static_keep(t)
    if not block or keep is None or keep >= t:
        return None
    forced = policy.static_forced(t)
    ranked = keep - int(forced.sum())
    if ranked <= 0:
        return None
    head = int(np.argmin(forced)) if not forced.all() else t
    tail = int(np.argmin(forced[::-1]))
    if head + tail != int(forced.sum()):
        raise ConfigError(f"{policy.name}: static_block needs the forced entries at the ends "
                          "of the prompt")
    n = t - head - tail
    blocks = -(-n // block)
    if blocks <= 1:
        return None
    sizes = np.full(blocks, n // blocks) + (np.arange(blocks) < n % blocks)
    quotas = ranked * sizes // n
    quotas[:ranked - int(quotas.sum())] += 1
    return BlockPlan(head, tail, tuple(int(x) for x in sizes), tuple(int(x) for x in quotas))


def to_blocks(a: jax.Array, plan: BlockPlan, fill=0) -> jax.Array:
    """The interior entries of a [b, k, t, ...] as padded blocks [b, k, blocks, width, ...]
    (public slices and a public pad: local under MPC)."""
    inner = a[:, :, plan.head:a.shape[2] - plan.tail]
    w, long = plan.width, sum(1 for s in plan.sizes if s == plan.width)
    lead, rest = a.shape[:2], a.shape[3:]
    parts = [inner[:, :, :long * w].reshape(*lead, long, w, *rest)]
    if long < len(plan.sizes):
        short = inner[:, :, long * w:].reshape(*lead, len(plan.sizes) - long, w - 1, *rest)
        pad = [(0, 0)] * short.ndim
        pad[3] = (0, 1)
        parts.append(jnp.pad(short, pad, constant_values=fill))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=2)


def from_blocks(x: jax.Array, plan: BlockPlan) -> jax.Array:
    """Inverse of `to_blocks` for the interior: [b, k, blocks, width, ...] -> [b, k, n, ...]."""
    lead, rest = x.shape[:2], x.shape[4:]
    parts = [x[:, :, j, :s] for j, s in enumerate(plan.sizes)]
    return jnp.concatenate(parts, axis=2).reshape(*lead, -1, *rest)


def _block_mask(policy, scores: jax.Array, plan: BlockPlan) -> jax.Array:
    """bool [b, k, t]: each block's quota of the best interior `scores` [b, k, t] (one top-k
    per run of blocks with the same quota, every block of a run a row), plus the forced
    ends."""
    blocked = to_blocks(scores, plan)                                   # [b, k, B, W]
    valid = jnp.asarray(plan.valid())
    runs = [topk_mask(blocked[:, :, s:e], q, valid[s:e], policy.static_selector, ways=16,
                      bits=24) for s, e, q in plan.runs]
    inner = from_blocks(jnp.concatenate(runs, axis=2), plan)
    b, k = scores.shape[:2]
    return jnp.concatenate([jnp.ones((b, k, plan.head), bool), inner,
                            jnp.ones((b, k, plan.tail), bool)], axis=2)


def block_selection(mask: jax.Array, plan: BlockPlan, dtype) -> jax.Array:
    """The block-local one-hot [b, k, blocks, rows, width] (float): in each block, its kept
    entries moved to the front (`compaction_matrix` per block: rows x width equalities per
    block instead of keep x t in all)."""
    blocked = to_blocks(mask, plan, fill=False)                         # [b, k, B, W]
    b, k, nb, w = blocked.shape
    p = compaction_matrix(blocked.reshape(b, k * nb, w), plan.rows)
    return p.reshape(b, k, nb, plan.rows, w).astype(dtype)


def gather_blocks(p: jax.Array, a: jax.Array, plan: BlockPlan) -> jax.Array:
    """a [b, k, t, ...] compacted by `block_selection`'s p: the head, each block's quota of
    rows in order, the tail; [b, k, keep, ...] (one batched matmul over the blocks, then
    public slices)."""
    blocked = to_blocks(a, plan)                                        # [b, k, B, W, ...]
    got = jnp.einsum("bkjsw,bkjw...->bkjs...", p.astype(a.dtype), blocked)
    lead, rest = a.shape[:2], a.shape[3:]
    parts = [a[:, :, :plan.head]]
    parts += [got[:, :, s:e, :q].reshape(*lead, (e - s) * q, *rest) for s, e, q in plan.runs]
    parts.append(a[:, :, a.shape[2] - plan.tail:])
    return jnp.concatenate(parts, axis=2)


def static_mask(policy, q, k, cfg, attn=None) -> jax.Array:
    """bool [b, k, t]: the entries this layer keeps (forced ones plus top-scored).

    q: [b, t, k, g, d]; k: [b, k, t, d]; attn: the prefill's tapped attention aggregate
    [b, k, t] (`Policy.prefill_tap`; then q is not read), or None (recomputed from q, k).
    """
    t = k.shape[2]
    forced = policy.static_forced(t)  # public
    keep = policy.static_keep(t) - int(forced.sum())
    if keep <= 0:
        # nothing ranked: the first static_keep forced entries, a PUBLIC mask (a mask that
        # passed through the top-k would be a secret one, which SPU sorts in another order)
        first = forced & (np.cumsum(forced) <= policy.static_keep(t))
        return jnp.broadcast_to(jnp.asarray(first), k.shape[:3])
    plan = block_plan(policy, t)
    if plan is not None:
        return _block_mask(policy, policy.static_scores(q, k, cfg, attn), plan)
    # once per prompt, so rounds matter less than exact ranking: by default SPU's top-k (with
    # "search", a finer search than the per-step one); forced entries stay out of the ranking
    chosen = topk_mask(policy.static_scores(q, k, cfg, attn), keep, jnp.asarray(~forced),
                       policy.static_selector, ways=16, bits=24)
    return jnp.logical_or(chosen, jnp.asarray(forced))


def static_selection(policy, q, k, cfg, attn=None) -> jax.Array:
    """The static step's result as the float one-hot matrix [b, k, keep, t] that compacts a
    layer (computed once per source layer; layers sharing its selection reuse the matrix);
    with block-local ranking (`block_plan`), the per-block one-hots [b, k, blocks, rows,
    width] (`block_selection`). Float, not bool: under MPC a boolean share would be converted
    at every use."""
    mask = static_mask(policy, q, k, cfg, attn)
    plan = block_plan(policy, k.shape[2])
    if plan is not None:
        return block_selection(mask, plan, k.dtype)
    return compaction_matrix(mask, policy.static_keep(k.shape[2]),
                             onehot_form(policy)).astype(k.dtype)


def gather_onehot(move: jax.Array, plan: Optional[BlockPlan], k: jax.Array, v: jax.Array,
                  pos: jax.Array):
    """k, v [b, k, t, d] and positions [b, k, t] compacted by the one-hot `move` (the global
    [b, k, keep, t] or, with a block plan, `block_selection`'s), as ONE matmul over the
    columns [k | v | pos]: under CHEETAH a secret x secret matmul pays for both operands,
    so the one-hot is encrypted once instead of three times (a one-hot of 50 x 510 with K
    and V of 128 columns: 2.5 MB as one matmul, 4.0 MB as two). Returns (k, v, pos as
    float) [b, k, keep, ...]."""
    d = k.shape[-1]
    cols = jnp.concatenate([k, v, pos.astype(k.dtype)[..., None]], axis=-1)
    out = gather_rows(move, cols) if plan is None else gather_blocks(move, cols, plan)
    return out[..., :d], out[..., d:2 * d], out[..., 2 * d]


def kept_indices(policy, q, k, cfg, attn=None) -> jax.Array:
    """Plaintext twin of `static_selection`: int [b, k, keep], the kept positions in order
    (an index gather with them moves exactly the entries the one-hot matrix moves). Not for
    SPU: it forms secret indices."""
    mask = static_mask(policy, q, k, cfg, attn)
    order = jnp.argsort(jnp.logical_not(mask), axis=-1, stable=True)
    return order[..., :policy.static_keep(k.shape[2])]


def take_public(a: jax.Array, idx: np.ndarray) -> jax.Array:
    """a[:, :, idx] for PUBLIC increasing indices idx, as static slices of its contiguous runs
    (no gather op: under SPU a slice of a secret is local). a: [b, k, t, ...]."""
    breaks = np.nonzero(np.diff(idx) != 1)[0] + 1
    runs = [(int(r[0]), int(r[-1]) + 1) for r in np.split(idx, breaks)]
    parts = [a[:, :, s:e] for s, e in runs]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=2)


def partition_rows(mask: jax.Array, keep: int, k: jax.Array, v: jax.Array, pos: jax.Array,
                   backend: str):
    """The "sort" kernel's static compaction: the `keep` entries of a SECRET `mask` [b, k, t]
    (exactly `keep` per row, as static_mask returns when it ranks) of k, v [b, k, t, d] and
    pos [b, k, t], in position order, by one stable 1-bit sort over all heads
    (eviction.compaction.partition): one radix pass moving 2d + 1 columns, instead of keep x t
    equalities. A public mask (nothing ranked) is taken by `take_public` instead."""
    d = k.shape[-1]
    cols = [k[..., i] for i in range(d)] + [v[..., i] for i in range(d)] + [pos]
    out = partition(mask, keep, cols, backend)
    return jnp.stack(out[:d], -1), jnp.stack(out[d:2 * d], -1), out[2 * d]
