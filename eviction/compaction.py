"""Compaction: moving a policy's selected entries (or clusters) to a fixed number of public
slots without forming a secret index.

Kernels (a policy's `compaction` field; "auto" picks one from the protocol, see `kernel_for`):
  "onehot" (the reference, any protocol): a one-hot matrix P [slots, n] from a prefix sum
      (local under MPC) and slots x n secure equalities with public slot numbers; gathers and
      scatters are matmuls with P.
  "sort" (SEMI2K, ABY3: protocols with efficient secret permutations): ONE stable radix sort
      keyed by the 1-bit selection mask over every row (heads, batch) at once moves the
      selected entries, with their payload columns, to the front in position order; a public
      slice keeps them. SPU's radix sort shuffles secretly and reveals only a shuffled
      permutation (SPU's own design, named in docs/privacy.md). Whatever must go back to
      cache order (attention probabilities) returns through two small digit one-hots of each
      slot's cluster index (slots x (A + B) equalities instead of slots x n).
CHEETAH builds secret permutations from multiplications (a Waksman network, ~1.4 KB per
element), so "sort" does not pay there; see SORT_PROTOCOLS for what "auto" picks and why.

Ordering of a 1-bit key: SPU 0.9.5 treats a boolean sort key as a signed 1-bit number and
puts True FIRST in an ascending sort, XLA puts it last. A policy compiled for SPU carries
`backend="spu"` (set by `for_protocol`); tests check both orders against each other.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

KERNELS = ("auto", "onehot", "sort")
BACKENDS = ("plain", "spu")
# "auto" picks "sort" under these protocol kinds. Empty for now: measured per head-layer at 8k
# (7B shapes), SEMI2K without its Beaver cache: sort 7.2 MB vs one-hot 11.2 MB; ABY3: sort
# 6.6 MB vs one-hot 5.9 MB (its matmuls cost only their output); SEMI2K with the Beaver cache
# (its default) not yet measured with sort. "sort" stays selectable (compaction="sort").
SORT_PROTOCOLS = ()
# The static step's kernel under "auto" (`Policy.static_compaction`): keep x T entries once per
# prompt, where the one-hot matrix costs keep x T equalities (819 x 8192 per head-layer at 8k,
# 10%) and one radix pass moves 2d + 1 columns of T entries: "sort" under these protocol kinds
# (measured at 8k, 7B shapes: docs/benchmark.md, "The static step"); CHEETAH one-hot.
STATIC_SORT_PROTOCOLS = ("SEMI2K", "ABY3")


# KV heads folded into one block-diagonal matmul by the one-hot scatter of the attention
# probabilities (`fold_heads`), per protocol kind. SPU runs a matmul with batch dimensions
# head by head, each head its own message rounds (ABY3: 3 sends per head, 89 for 32 heads;
# one 8k layer, 7B shapes); a block-diagonal matmul over f heads is one matmul: the same bytes
# under ABY3 (its matmuls cost their output), f times the local multiplications, 1/f of the
# rounds, and (a probe at 32 heads) less time, measured as a block. But in a whole decode
# program the ABY3 step cost more bytes with it (the small model of tests/test_run_spu.py,
# its composed-vs-direct check failed by 6% with 2 KV heads folded by 2), which the
# block measurement does not show (XLA compiles the folded scatter together with the
# selection that feeds it). So no protocol folds by default (`fold_heads=2` stays a setting;
# a fold must keep the cost linear in heads at the measured head counts: run_spu checks).
# Not a candidate under SEMI2K (Beaver opens the whole block-diagonal operand) nor CHEETAH
# (homomorphic matmuls cost their input sizes). The gather stays per head.
FOLD_HEADS = {}


def fold_for(n_heads: int, fold: int) -> int:
    """Heads per block-diagonal matmul for `n_heads` KV heads: the largest divisor of
    n_heads that is at most `fold` (0 or 1: none folded)."""
    return max(d for d in range(1, max(1, fold) + 1) if n_heads % d == 0)


def block_diagonal(p: jax.Array, fold: int) -> jax.Array:
    """p [b, k, s, n] -> [b, k/fold, fold*s, fold*n]: each group of `fold` heads' matrices on
    the diagonal, zeros elsewhere (a select with a public mask: local under MPC)."""
    b, k, s, n = p.shape
    eye = jnp.eye(fold, dtype=bool)[:, None, :, None]                       # [f, 1, f, 1]
    g = p.reshape(b, k // fold, fold, s, 1, n)
    return jnp.where(eye, g, jnp.zeros((), p.dtype)).reshape(b, k // fold, fold * s, fold * n)


def kernel_for(compaction: str, protocol_kind: Optional[str]) -> str:
    """The kernel a policy's `compaction` setting runs under a protocol (an SPU
    ProtocolKind name, or None for plaintext): "auto" is "sort" under SORT_PROTOCOLS and
    "onehot" elsewhere (plaintext: both give the same values)."""
    if compaction != "auto":
        return compaction
    return "sort" if protocol_kind in SORT_PROTOCOLS else "onehot"


def for_protocol(policy, protocol_kind: Optional[str]):
    """The policy as compiled for `protocol_kind` (None: plaintext): its compaction kernel
    resolved, and SPU's sort order where it runs under SPU. Policies without the fields are
    returned as they are."""
    if policy is None or not hasattr(policy, "compaction"):
        return policy
    kernel = kernel_for(policy.compaction, protocol_kind)
    static = getattr(policy, "static_compaction", "onehot")
    if static == "auto":
        static = kernel if policy.compaction != "auto" else (
            "sort" if protocol_kind in STATIC_SORT_PROTOCOLS else "onehot")
    if getattr(policy, "refresh", 1) > 1 and policy.compaction == "auto":
        kernel = "onehot"   # a selection kept across steps is a one-hot matrix
    extra = {"split_kept": protocol_kind == "SEMI2K"} if hasattr(policy, "split_kept") else {}
    if getattr(policy, "fold_heads", 1) == 0:
        extra["fold_heads"] = FOLD_HEADS.get(protocol_kind, 1)
    if getattr(policy, "onehot_form", "eq") == "auto":
        extra["onehot_form"] = ONEHOT_FORM.get(protocol_kind, "eq")
    if hasattr(policy, "static_compaction"):
        extra["static_compaction"] = static
    return dataclasses.replace(policy, compaction=kernel,
                               backend="plain" if protocol_kind is None else "spu", **extra)


def pad_to(mask: jax.Array, slots: int) -> jax.Array:
    """mask [..., n] with at most `slots` True per row -> exactly `slots` (when n >= slots),
    the earliest unselected entries added (a prefix sum and one comparison per entry), so
    every row's block has the same public size in a flattened sort."""
    count = mask.sum(axis=-1, keepdims=True, dtype=jnp.int32)
    free = jnp.logical_not(mask)
    fill = jnp.logical_and(free, jnp.cumsum(free.astype(jnp.int32), axis=-1) <= slots - count)
    return jnp.logical_or(mask, fill)


def partition(mask: jax.Array, slots: int, columns: Sequence[jax.Array],
              backend: str = "plain") -> list:
    """The entries selected by `mask` [..., n] (exactly `slots` True per row, see `pad_to`),
    of each column [..., n] (any dtype), in position order: [..., slots] per column.

    One stable sort of all rows flattened, keyed by the mask (one bit: a single radix pass in
    SPU), then a public slice. `backend` gives the key's order (module docstring); the mask
    must be SECRET under SPU: SPU sorts a public key unstably, so a public selection is taken
    by static slices instead (`static_step.take_public`, or the one-hot route when nothing is
    chosen). slots == n: the partition is the identity (pad_to keeps every entry) and no sort
    runs."""
    if slots >= mask.shape[-1]:
        return [jnp.broadcast_to(c, mask.shape) for c in columns]
    lead = mask.shape[:-1]
    rows = math.prod(lead)
    key = mask if backend == "spu" else jnp.logical_not(mask)
    flat = [key.reshape(-1)] + [jnp.broadcast_to(c, mask.shape).reshape(-1) for c in columns]
    out = jax.lax.sort(flat, dimension=0, is_stable=True, num_keys=1)[1:]
    return [o[:rows * slots].reshape(*lead, slots) for o in out]


def digits(n: int) -> tuple:
    """(A, B): cluster index c = B*hi + lo with hi < A, lo < B; B = 8 keeps the scatter's
    multiplications at slots * 8 per payload entry, A = ceil(n / B)."""
    b = min(8, n)
    return -(-n // b), b


def scatter_by_digits(hi: jax.Array, lo: jax.Array, values: jax.Array, n: int) -> jax.Array:
    """Inverse of a partition for per-slot values: hi, lo [r, slots] (int, the digits of
    each slot's original index), values [r, g, slots, z] -> [r, g, n, z], zero where no slot
    points. Slot one-hots by slots x (A + B) equalities, then one elementwise product over the
    low digit and one matmul over the high digit (no slots x n matrix is formed)."""
    a, b = digits(n)
    e_hi = (hi[..., None] == jnp.arange(a)).astype(values.dtype)                # [r, s, A]
    e_lo = (lo[..., None] == jnp.arange(b)).astype(values.dtype)                # [r, s, B]
    x = jnp.einsum("rsb,rgsz->rgsbz", e_lo, values)
    out = jnp.einsum("rsa,rgsbz->rgabz", e_hi, x)                                # [r,g,A,B,z]
    r, g = values.shape[:2]
    return out.reshape(r, g, a * b, values.shape[-1])[:, :, :n]


# How the one-hot compaction matrix compares each entry's destination with the public slot
# numbers (`onehot_form`), per protocol kind: "eq", n equalities per entry; "ge", n + 1
# threshold comparisons (slot i: dest >= i and not dest >= i + 1); "digits", the destination's
# high and low binary digits (a shift and a mask of the secret integer) compared with
# ceil(n / B) and B values, then one AND per (slot, entry) of the two boolean one-hots.
# SEMI2K's equalities cost about twice its comparisons, ABY3's are cheap (one 8k layer, 7B
# shapes, measured by `experiments/selection_cost.py --parts`:
# results/select_parts_8192_{semi2k,aby3}). "digits" is a setting: under CHEETAH it took a
# third less time than the equalities but 30-40% more bytes (a one-hot of 128 slots over
# 1,024 entries: 11.0 vs 7.9 MB; of 256 over 2,048: 35.0 vs 27.0 MB;
# results/onehot_forms_cheetah), so CHEETAH keeps "eq".
ONEHOT_FORMS = ("auto", "eq", "ge", "digits")
ONEHOT_FORM = {"SEMI2K": "ge"}


def low_digit_base(n: int) -> int:
    """B for the "digits" one-hot of n slots: the power of two nearest above sqrt(n) (B + n/B
    comparisons per entry)."""
    return 1 << max(1, math.ceil(math.log2(max(n, 2)) / 2))


def onehot_form(policy) -> str:
    """A policy's one-hot compaction form ("auto" is resolved per protocol by for_protocol;
    unresolved, as in plaintext, "eq": the same matrix)."""
    form = getattr(policy, "onehot_form", "eq")
    return "eq" if form == "auto" else form


def compaction_matrix(mask: jax.Array, n: int, form: str = "eq") -> jax.Array:
    """One-hot matrix P [b, k, n, t] moving the kept entries of `mask` [b, k, t] to the front
    in position order: P[i, j] = mask[j] and (rank of j among kept == i). Built from a prefix
    sum (local under MPC) and comparisons with public slot numbers: no secret index is formed.
    Rows beyond the number kept are zero. form: "eq" (equalities with the slot numbers), "ge"
    (threshold comparisons) or "digits" (see ONEHOT_FORM); the same matrix."""
    dest = jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1                    # [b, k, t]
    if form == "digits":
        base = low_digit_base(n)
        a = -(-n // base)
        hi = jnp.right_shift(dest, base.bit_length() - 1)[:, :, None, :]       # [b, k, 1, t]
        lo = jnp.bitwise_and(dest, base - 1)[:, :, None, :]
        e_hi = jnp.logical_and(hi == jnp.arange(a)[:, None], mask[:, :, None, :])  # [b,k,A,t]
        e_lo = lo == jnp.arange(base)[:, None]                                  # [b, k, B, t]
        hit = jnp.logical_and(e_hi[:, :, :, None, :], e_lo[:, :, None, :, :])
        b, k, t = mask.shape
        return hit.reshape(b, k, a * base, t)[:, :, :n]                         # [b, k, n, t]
    if form == "ge":
        ge = dest[:, :, None, :] >= jnp.arange(n + 1)[:, None]                  # [b, k, n+1, t]
        hit = jnp.logical_and(ge[:, :, :-1], jnp.logical_not(ge[:, :, 1:]))
    else:
        hit = dest[:, :, None, :] == jnp.arange(n)[:, None]
    return jnp.logical_and(mask[:, :, None, :], hit)                            # [b, k, n, t]


def gather_rows(p: jax.Array, a: jax.Array) -> jax.Array:
    """p [b, k, n, t] (bool or 0/1 float) applied to a [b, k, t, ...] -> [b, k, n, ...] as
    one matmul."""
    return jnp.einsum("bknt,bkt...->bkn...", p.astype(a.dtype), a)


def gather_clusters(p: jax.Array, size: int, *arrays):
    """Gathers whole clusters: p [b, k, slots, n] over clusters of `size` consecutive entries;
    arrays [b, k, n*size, ...] -> [b, k, slots*size, ...]."""
    out = []
    for a in arrays:
        b, h, c = a.shape[:3]
        g = gather_rows(p, a.reshape(b, h, c // size, size, *a.shape[3:]))
        out.append(g.reshape(b, h, -1, *a.shape[3:]))
    return out


def gather_segments(p: jax.Array, size: int, parts) -> jax.Array:
    """gather_clusters of one array given as row segments: p [b, k, slots, n] over clusters
    of `size`; parts: arrays [b, k, c_i, ...] whose rows, concatenated, are the n*size rows.
    One matmul per segment when every segment holds whole clusters (under SEMI2K a fixed
    segment keeps its Beaver opening), else one over the concatenation.
    Returns [b, k, slots*size, ...]."""
    if len(parts) == 1 or any(a.shape[2] % size for a in parts):
        whole = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=2)
        return gather_clusters(p, size, whole)[0]
    out, start = 0, 0
    for a in parts:
        n = a.shape[2] // size
        out = out + gather_clusters(p[..., start:start + n], size, a)[0]
        start += n
    return out
