"""A private decode step cut into the blocks it is made of, each compilable on its own.

The whole-model benchmark cannot run a 7B decode step at 8k tokens whole on 2 cores, so it
measures each distinct block once under SPU and multiplies by how often a step runs it. Every
block below calls the very functions `mpc_llama.model.decode_step` (and, for the one-time static
step, `prefill`) calls, in the same order, on inputs of the same shapes; tests check that the
composed counters equal a directly measured decode step.

Blocks of one decode step, per layer unless noted (category in brackets):
    embed (once) [linear]              one-hot token x embedding
    attn_norm [other]  qkv [linear]    RMSNorm; Q/K/V projections + RoPE
    bounds [selection]                 incremental cluster bounds (policies with clusters)
    select [selection]                 the policy's query-aware selection (selecting layers)
    scores [attention]                 q . K over the retained cache
    gather [gather]                    the selected clusters' scores packed (one-hot matmul)
    softmax [softmax]
    scatter [gather]                   probabilities back to cache order
    values [attention]                 p . V, then each row times 1 / row sum (the softmax's
                                       normalisation, deferred: nonlinear.Weights)
    o_proj [linear]  mlp_norm [other]  gate_up [linear]  gated [other: SiLU]  down [linear]
    final_norm (once) [other]  lm_head (once) [linear]  argmax (once) [other]
One-time static step at prefill (phase "static"): static_select [selection] on layers whose
selection others share, compact [gather] and init_bounds [selection] on every layer.

Attention blocks may be measured on a sample of KV heads (`heads`); the caller extrapolates.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from mpc_llama import nonlinear
from mpc_llama.config import LlamaConfig
from mpc_llama.errors import ConfigError

CATEGORIES = ("linear", "attention", "softmax", "selection", "gather", "other")
MODEL, USER, SHARED = "model", "user", "shared"  # who inputs a block argument


@dataclasses.dataclass(frozen=True)
class Block:
    """One compilable piece of a decode step (or of the static step at prefill).

    fn(*args) -> tuple; args: ShapeDtypeStruct pytrees; owners[i]: MODEL (weights, shared by
    the model owner), USER (the token, by the user) or SHARED (an activation: secret shares
    nobody owns); count: how many times one step runs the block; heads: KV heads the block was
    built for (None: full-size dense block); phase: "decode" or "static" (once per prompt).
    """

    name: str
    category: str
    phase: str
    fn: Callable = dataclasses.field(compare=False, repr=False)
    args: Tuple[Any, ...] = dataclasses.field(compare=False, repr=False)
    arg_names: Tuple[str, ...] = ()
    owners: Tuple[str, ...] = ()
    count: int = 1
    heads: Optional[int] = None
    # (cfg, policy, builder, name, seq, heads): how to build it again, e.g. at another party
    recipe: Optional[tuple] = dataclasses.field(default=None, compare=False, repr=False)
    # attention blocks: rows of their "k"/"v" argument written before this step (fixed from
    # now on; the rest is the growing tail): what SEMI2K's Beaver cache keeps (benchmark)
    frozen_rows: Optional[int] = dataclasses.field(default=None, compare=False)
    # a block run once every `every` decode steps (a kept selection): count is per step
    # (amortised, divided by `every`); a step that runs it pays `every` x its share
    every: int = dataclasses.field(default=1, compare=False)
    # Beaver cache: its frozen operand is replaced every `reopened_every` steps (a kept
    # selection's compact rows), so its opening, measured as one-time, recurs: twice per
    # replacement (the selecting step, the next), counted 2/reopened_every per step (0: truly
    # fixed, opened once)
    reopened_every: int = dataclasses.field(default=0, compare=False)

    @property
    def fixed(self) -> Tuple[str, ...]:
        """Arguments that are the same at every step: the model owner's weights."""
        return tuple(n for n, o in zip(self.arg_names, self.owners) if o == MODEL)


def _recorded(builder: str):
    """Marks a block builder's blocks with their recipe (see Block.recipe)."""
    def deco(fn):
        @functools.wraps(fn)
        def inner(cfg, *args):
            policy, seq, heads = (tuple(args) + (None, None, None))[:3]
            return [dataclasses.replace(b, recipe=(cfg, policy, builder, b.name, seq, heads))
                    for b in fn(cfg, *args)]
        return inner
    return deco


def _spec(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(tuple(shape), dtype)


def _specs(tree):
    return jax.tree_util.tree_map(lambda a: _spec(a.shape, a.dtype), tree)


def _block(name, category, fn, args: dict, owners: dict = None, count=1, heads=None,
           phase="decode") -> Block:
    owners = owners or {}
    return Block(name, category, phase, fn, tuple(args.values()), tuple(args),
                 tuple(owners.get(n, SHARED) for n in args), count, heads)


def _weights(cfg: LlamaConfig, names):
    d, F, nd = cfg.d_model, cfg.ffn_dim, cfg.n_heads * cfg.head_dim
    kd = cfg.n_kv_heads * cfg.head_dim
    shapes = {"wq": (d, nd), "wk": (d, kd), "wv": (d, kd), "wo": (nd, d), "norm": (d,),
              "w_gate": (d, F), "w_up": (d, F), "w_down": (F, d), "embed": (cfg.vocab_size, d),
              "lm_head": (d, cfg.vocab_size)}
    return {n: _spec(shapes[n]) for n in names}


@_recorded("dense")
def dense_blocks(cfg: LlamaConfig) -> List[Block]:
    """Blocks outside attention, at the model's real dimensions (cfg as compiled for SPU);
    they do not depend on the cache length (the token position is a public input). The
    norms are those of the weights as shared (`mpc_llama.model.fold_norm_weights`): no
    weight product, but for the final norm of a tied head."""
    from mpc_llama.model import _qkv, embed, gated, rms_norm

    L, d = cfg.n_layers, cfg.d_model
    x = _spec((1, 1, d))
    w = _weights(cfg, ("wq", "wk", "wv", "wo", "norm", "w_gate", "w_up", "w_down", "embed",
                       "lm_head"))
    h_out = _spec((1, 1, cfg.n_heads * cfg.head_dim))
    g = _spec((1, 1, cfg.ffn_dim))
    head_w = "embed" if cfg.tie_embeddings else "lm_head"
    slices = head_slices(cfg.vocab_size, d)
    m = {n: MODEL for n in w}
    return [
        _block("embed", "linear", lambda t, e: (embed({"embed": e}, t, cfg),),
               {"token": _spec((1, 1), jnp.int32), "embed": w["embed"]},
               {"token": USER, **m}),
        _block("attn_norm", "other", lambda x: (rms_norm(x, None, cfg),), {"x": x}, m, L),
        _block("qkv", "linear",
               lambda h, p, wq, wk, wv: _qkv({"wq": wq, "wk": wk, "wv": wv}, h,
                                             jnp.reshape(p, (1,)), cfg),
               {"h": x, "position": _spec((), jnp.int32), "wq": w["wq"], "wk": w["wk"],
                "wv": w["wv"]}, m, L),
        _block("o_proj", "linear", lambda x, o, wo: (x + o @ wo,),
               {"x": x, "out": h_out, "wo": w["wo"]}, m, L),
        _block("mlp_norm", "other", lambda x: (rms_norm(x, None, cfg),), {"x": x}, m, L),
        _block("gate_up", "linear", lambda h, wg, wu: (h @ wg, h @ wu),
               {"h": x, "w_gate": w["w_gate"], "w_up": w["w_up"]}, m, L),
        _block("gated", "other", lambda a, b: (gated(a, b, cfg),), {"gate": g, "up": g}, m, L),
        _block("down", "linear", lambda x, a, wd: (x + a @ wd,),
               {"x": x, "act": g, "w_down": w["w_down"]}, m, L),
        _block("final_norm", "other", lambda x, n: (rms_norm(x, n, cfg),),
               {"x": _spec((1, d)), "norm": w["norm"]}, m) if cfg.tie_embeddings else
        _block("final_norm", "other", lambda x: (rms_norm(x, None, cfg),), {"x": _spec((1, d))},
               m),
        _block("lm_head", "linear",
               (lambda h, e: (h @ e.T,)) if cfg.tie_embeddings else (lambda h, e: (h @ e,)),
               {"h": _spec((1, d)), head_w: _spec(_head_slice(w[head_w].shape, slices,
                                                              cfg.tie_embeddings))},
               m, slices),
        _block("argmax", "other", lambda z: (jnp.argmax(z, axis=-1).astype(jnp.int32),),
               {"logits": _spec((1, cfg.vocab_size))}),
    ]


HEAD_MAX_ELEMENTS = 40_000_000  # above this the LM head is measured in vocabulary slices


def head_slices(vocab: int, d: int) -> int:
    """Vocabulary slices the LM head block is measured in (its count): the fewest that divide
    the vocabulary with at most HEAD_MAX_ELEMENTS weights each. A 7B head (32000 x 4096)
    needs ~11 GB in the simulator whole; a matmul's cost is additive over output columns."""
    return next(c for c in range(1, vocab + 1)
                if vocab % c == 0 and vocab // c * d <= HEAD_MAX_ELEMENTS)


def _head_slice(shape, slices: int, tied: bool):
    return (shape[0] // slices, shape[1]) if tied else (shape[0], shape[1] // slices)


def sampled(cfg: LlamaConfig, heads: int) -> LlamaConfig:
    """The layer with `heads` KV heads (and their query heads) of the real ones."""
    return cfg.replace(n_kv_heads=heads, n_heads=heads * cfg.group_size)


def retained(policy, seq: int) -> Tuple[int, int]:
    """(entries valid in the cache at the decode step, cache capacity) after a prompt of `seq`
    tokens: the static step's keep count (or seq) plus the current token; capacity rounded up
    to whole clusters for policies that keep cluster bounds."""
    keep = seq if policy is None or policy.static_keep(seq) is None else policy.static_keep(seq)
    cap = keep + 1
    if policy is not None and policy.needs_bounds:
        s1 = policy.cluster_sizes[0]
        cap = -(-cap // s1) * s1
    return keep + 1, cap


def n_dense(policy, n_layers: int) -> int:
    """Decode layers the policy leaves the whole cache (`layer_policy` None)."""
    return sum(policy.layer_policy(i, n_layers) is None for i in range(n_layers))


def n_selecting(policy, n_layers: int) -> int:
    """Layers that run their own selection (the others reuse a source layer's; a layer whose
    source attends the whole cache selects itself, as decode_step runs it)."""
    dense = lambda i: policy.layer_policy(i, n_layers) is None   # noqa: E731
    return len({i if dense(policy.share_source(i, n_layers)) else
                policy.share_source(i, n_layers) for i in range(n_layers) if not dense(i)})


@_recorded("attention")
def attention_blocks(cfg: LlamaConfig, policy, seq: int, heads: int) -> List[Block]:
    """One decode step's attention blocks for `heads` KV heads, as decode_attention runs them.

    policy None: the full cache. `oracle`: attention over exactly its budget, selection left
    out (free selection: the cost floor of any selection at that budget).
    """
    from eviction.clusters import update_bounds
    from mpc_llama.model import attention_scores, attention_values
    from eviction.attention import (_select, gather_packed, partition_scores,
                                    scatter_packed, scatter_partitioned, scatter_spans,
                                    with_spans)

    c = sampled(cfg, heads)
    L, d, g = cfg.n_layers, cfg.head_dim, cfg.group_size
    if policy is not None and policy.name == "oracle":
        length, cap, policy = policy.n_attend(seq) + 1, policy.n_attend(seq) + 1, None
    else:
        length, cap = retained(policy, seq)
    softmax = _deferred(nonlinear.SOFTMAX[cfg.softmax])
    valid = jnp.arange(cap) < length
    q, kv = _spec((1, 1, heads * g, d)), _spec((1, heads, cap, d))
    scores = _spec((1, heads, g, 1, cap))
    frozen = dict(frozen_rows=length - 1)  # every entry but the current token's
    blocks = [dataclasses.replace(
        _block("scores", "attention", lambda q, k: (attention_scores(q, k, c),),
               {"q": q, "k": kv}, count=L, heads=heads), **frozen)]
    recip = _spec((1, heads, g, 1, 1))   # the softmax's 1 / row sum, applied after p . V
    values = dataclasses.replace(
        _block("values", "attention",
               lambda p, r, v: (attention_values(nonlinear.Weights(p, r), v, c),),
               {"probs": scores, "recip": recip, "v": kv}, count=L, heads=heads), **frozen)
    if policy is None or not policy.dynamic:
        mask = valid[None, None, None, None, :]
        return blocks + [
            _block("softmax", "softmax", lambda s: softmax(s, mask), {"scores": scores},
                   count=L, heads=heads), values]

    # layers the policy leaves the whole cache (`layer_policy`): the full softmax there; the
    # scores and values blocks above count every layer, the policy's own blocks the others
    dense = n_dense(policy, L)
    if dense:
        if getattr(policy, "refresh", 1) > 1:
            raise ConfigError("cost blocks for dense layers are built for refresh=1 only")
        full_mask = valid[None, None, None, None, :]
        blocks.append(_block("softmax_dense", "softmax", lambda s: softmax(s, full_mask),
                             {"scores": scores}, count=dense, heads=heads))
    L = L - dense

    # policies that keep no bounds (MPCache's exact ranking) have no bounds block, and their
    # selection blocks no bounds input: `bnd` is the input, `split` finds it in the args
    keeps = policy.keeps_bounds
    bounds_spec = _specs(jax.eval_shape(lambda k: _init_bounds(policy, k, length - 1), kv)) \
        if keeps else ()
    bnd = {"bounds": bounds_spec} if keeps else {}
    out = [_block("bounds", "selection",
                  lambda b, k: (update_bounds(b, k, length - 1, *policy.cluster_sizes,
                                              policy.bounds_alpha),),
                  {"bounds": bounds_spec, "key": _spec((1, heads, d))}, count=L,
                  heads=heads)] if keeps else []

    def split(rest):   # a block's args after q and k -> (bounds, the others)
        return (rest[0], rest[1:]) if keeps else ((), rest)

    # the selecting layers' softmax gets its row max from the selection where the policy
    # yields one (MPCache's exact ranking with one query head per KV head): a `row_max`
    # output of the select block and an input of their softmax block
    gives_max = getattr(policy, "gives_max", lambda g, t: False)(g, seq)

    def select(q, k, *rest):
        # rest: the bounds (if kept), then optionally the step's scores [1, heads, g, 1, cap]
        # (an input of policies that rank by them). Returns ((kind, sel, size, slots),
        # row_max or None)
        b, others = split(rest)
        s = others[0] if others else None
        qg = q[:, 0].reshape(1, heads, g, d)
        return _select(policy, qg, k, b, jnp.asarray(length), seq, c,
                       None if s is None else s[:, :, :, 0], with_max=True)

    def softmax_blocks(packed: dict, mask_of):
        """The softmax over the packed scores: with the selection's row max for the
        selecting layers (when it gives one) and the plain one for the others."""
        plain = _block("softmax", "softmax", lambda s, ok: softmax(s, mask_of(ok)), packed,
                       count=L if not gives_max else L - n_sel, heads=heads)
        if not gives_max:
            return [plain]
        out = [_block("softmax", "softmax",
                      lambda s, ok, m: softmax(s, mask_of(ok), row_max=m),
                      {**packed, "row_max": _spec((1, heads, 1, 1))}, count=n_sel,
                      heads=heads)]
        return out + ([dataclasses.replace(plain, name="softmax_shared")] if n_sel < L else [])

    probe = policy.select_clusters(*_probe_select_args(c, policy, seq, length, cap))
    kind = "mask" if probe is None else getattr(policy, "gather", "mask")
    n_sel = n_selecting(policy, cfg.n_layers)
    # the forced slices (public, next to the chosen clusters) or None
    spans = getattr(policy, "spans", lambda t: None)(seq)
    forced = 0 if spans is None else spans.width
    n_len = jnp.asarray(length)
    if kind == "scores" and policy.compaction == "sort":
        # the cluster mask is a comparison result (a one-bit key of the sort) only inside the
        # program that computes it, so the selecting layers' block selects AND packs; the
        # sharing layers' block gets the mask as 0/1 and compares it again (an upper bound:
        # one comparison per cluster that the whole-step program does not run)
        size, slots = probe[1], probe[2]
        n, sl = cap // size, slots * size
        packed = {"picked": _spec((1, heads, g, sl + forced)),
                  "ok": _spec((1, heads, 1, sl + forced), jnp.bool_)}
        digits = {"hi": _spec((1, heads, slots), jnp.int32),
                  "lo": _spec((1, heads, slots), jnp.int32)}
        def pack(m, s):   # the chosen clusters' scores by the sort, then the slices'
            hi, lo, picked, ok = partition_scores(m, s[:, :, :, 0], size, slots, n_len,
                                                  policy.backend)
            return (hi, lo) + with_spans(picked, ok, s[:, :, :, 0], n_len, spans)
        def select_pack(q, k, *rest):   # rest: (bounds if kept, scores)
            ranked = rest if policy.needs_scores else rest[:-1]
            selection, row_max = select(q, k, *ranked)
            return pack(selection[1], rest[-1]) + ((row_max,) if gives_max else ())

        out.append(_block("select", "selection", select_pack,
                          {"q": q, "k": kv, **bnd, "scores": scores},
                          count=n_sel, heads=heads))
        if n_sel < L:
            out.append(_block("gather", "gather", lambda m, s: pack(m > 0.5, s),
                              {"mask": _spec((1, heads, n)), "scores": scores},
                              count=L - n_sel, heads=heads))
        return out + blocks + softmax_blocks(packed, lambda ok: ok) + [
            _block("scatter", "gather",
                   lambda hi, lo, pr: (scatter_spans(
                       lambda p: scatter_partitioned(hi, lo, p, size, n), pr, sl, n_len,
                       spans, cap)[:, :, :, None],),
                   {**digits, "probs": packed["picked"]}, count=L, heads=heads),
            values]

    refresh = getattr(policy, "refresh", 1)
    if refresh > 1 and getattr(policy, "kept", "onehot") == "kv":
        return out + _kept_kv_blocks(policy, c, q, kv, bnd, length, seq, n_sel)
    if refresh > 1:
        # the selection is made every `refresh` steps and kept: its block counts 1/refresh
        # per step (amortised: run_spu.py says so); the forced clusters' rows are public
        def select_kept(q, k, *rest):
            qg = q[:, 0].reshape(1, heads, g, d)
            return (policy.refresh_selection(qg, k, split(rest)[0], jnp.asarray(length), seq,
                                             c),)

        kept = jax.eval_shape(select_kept, q, kv, *bnd.values())[0]
        sel_spec = jax.eval_shape(lambda p: policy.with_forced(p, jnp.asarray(length)), kept)
        out.append(dataclasses.replace(
            _block("select", "selection", select_kept, {"q": q, "k": kv, **bnd},
                   count=n_sel / refresh, heads=heads), every=refresh))
    else:
        sel_in = {"q": q, "k": kv, **bnd}
        if policy.needs_scores:   # ranks by the scores block's output: no second q . k
            sel_in["scores"] = scores

        def select_out(*a):   # the one-hot matrix, and the row max where there is one
            selection, row_max = select(*a)
            return (selection[1],) + ((row_max,) if gives_max else ())

        sel_spec = jax.eval_shape(select_out, *sel_in.values())[0]
        out.append(_block("select", "selection", select_out, sel_in, count=n_sel,
                          heads=heads))
    if kind == "scores":
        size, fold = probe[1], max(1, getattr(policy, "fold_heads", 1))
        packed = _spec((1, heads, g, sel_spec.shape[2] * size + forced))
        return out + blocks + [
            _block("gather", "gather",
                   lambda p, s: gather_packed(p, s[:, :, :, 0], valid, size, spans, n_len),
                   {"onehot": sel_spec, "scores": scores}, count=L, heads=heads),
            ] + softmax_blocks({"picked": packed, "ok": _spec((1, heads, 1, packed.shape[3]))},
                               lambda ok: ok > 0.5) + [
            _block("scatter", "gather",
                   lambda p, pr: (scatter_packed(p, pr, size, fold, spans, n_len,
                                                 cap)[:, :, :, None],),
                   {"onehot": sel_spec, "probs": packed}, count=L, heads=heads),
            values]
    raise ConfigError(f"cost blocks are built for gather='scores' only; {policy.name} has "
                      f"gather={kind!r} (a boolean selection crossing a block boundary would "
                      "be costed as an arithmetic share)")


def _kept_kv_blocks(policy, c, q, kv, bnd, length, seq, n_sel) -> List[Block]:
    """MPCache with refresh > 1 and kept="kv": every `refresh` steps the selection (its
    one-hot) and the gather of the chosen clusters' K/V rows into a compact cache (both
    counted 1/refresh per step: amortised); every step the forced clusters' rows by public
    slices, then attention over compact + forced rows like `oracle`. Under SEMI2K's Beaver
    cache the compact rows (fixed between refreshes, "*_frozen") are marked cached, with the
    forced rows written before the selection held after them (MPCache.holds_forced): the
    step then slices only the last `refresh` rows."""
    from mpc_llama.model import attention_scores, attention_values

    heads, g, d = c.n_kv_heads, c.group_size, c.head_dim
    L, r, n = c.n_layers, policy.refresh, jnp.asarray(length)
    frozen = length - 1

    def cat(a):
        return jnp.concatenate(a, axis=2) if isinstance(a, tuple) else a

    def join(kept_rows, forced_rows):   # as MPCache.attend_kept
        return (kept_rows, forced_rows) if policy.split_kept else cat((kept_rows, forced_rows))

    def select_kept(q, k, *b):   # b: (bounds,) when the policy keeps them, else ()
        qg = q[:, 0].reshape(1, heads, g, d)
        parts = k if isinstance(k, tuple) else None   # frozen rows apart (SEMI2K)
        return (policy.refresh_selection(qg, cat(k), b[0] if b else (), n, seq, c, parts),)

    kept = jax.eval_shape(select_kept, q, kv, *bnd.values())[0]

    def compact(p, k, v):
        segs = (k, v) if isinstance(k, tuple) else None
        out = policy.compact_kv(p, cat(k), cat(v), n, segs, policy.kept_rows_valid(seq))
        return tuple(a for a in out if a is not None)

    # the forced rows: public slices of the cache at every step; or, held after the compact
    # rows (MPCache.holds_forced, SEMI2K: Beaver-cached with them), the last `refresh` rows
    held = policy.holds_forced
    get_forced = policy.forced_from_held if held else policy.forced_kv

    def forced(k, v):
        return get_forced(cat(k), cat(v), n)[:2]

    rows = kept.shape[2] * policy.s2
    hr = (1 + policy.recent) * policy.s2 if held else 0    # held after the compact rows
    fr = policy.refresh if held else (1 + policy.recent) * policy.s2
    ck, fk = _spec((1, heads, rows + hr, d)), _spec((1, heads, fr, d))
    zeros = jnp.zeros((1, heads, kv.shape[2], 1))
    ok_forced = lambda: get_forced(zeros, zeros, n)[2]  # noqa: E731
    softmax = _deferred(nonlinear.SOFTMAX[c.softmax])
    scores = _spec((1, heads, g, 1, rows + hr + fr))

    def soft(s, ok=None):   # ok: the kept rows' secret validity, where it is not public
        kept_ok = jnp.ones((1, heads, rows), bool) if ok is None else ok > 0.5
        mask = jnp.concatenate([kept_ok, ok_forced()], axis=-1)
        return softmax(s, mask[:, :, None, None, :])

    soft_in = {"scores": scores}
    if not policy.kept_rows_valid(seq):
        soft_in["ok"] = _spec((1, heads, rows))

    # compact (and held) rows: Beaver-cached between refreshes, opened anew after each
    mark = dict(frozen_rows=rows + hr, reopened_every=r)
    return [
        dataclasses.replace(
            _block("select", "selection", select_kept, {"q": q, "k": kv, **bnd},
                   count=n_sel / r, heads=heads), frozen_rows=frozen, every=r),
        dataclasses.replace(
            _block("compact", "gather", compact, {"onehot": kept, "k": kv, "v": kv},
                   count=L / r, heads=heads), frozen_rows=frozen, every=r),
        _block("forced", "gather", forced, {"k": kv, "v": kv}, count=L, heads=heads),
        dataclasses.replace(
            _block("scores", "attention",
                   lambda q, k, f: (attention_scores(q, join(k, f), c),),
                   {"q": q, "kc_frozen": ck, "forced_k": fk}, count=L, heads=heads), **mark),
        _block("softmax", "softmax", soft, soft_in, count=L, heads=heads),
        dataclasses.replace(
            _block("values", "attention",
                   lambda p, r, v, f: (attention_values(nonlinear.Weights(p, r), join(v, f), c),),
                   {"probs": scores, "recip": _spec((1, heads, g, 1, 1)), "vc_frozen": ck,
                    "forced_v": fk}, count=L, heads=heads),
            **mark)]


def _deferred(softmax):
    """The softmax block's function: the unnormalised weights and the row reciprocal
    (nonlinear.Weights, as a tuple of block outputs); the values block normalises after
    p . V, as model.attention_values does."""
    return lambda *a, **kw: tuple(softmax(*a, normalise=False, **kw))


def _init_bounds(policy, k, length):
    from eviction.clusters import init_bounds

    return init_bounds(k, length, *policy.cluster_sizes, policy.bounds_alpha)


def _probe_select_args(cfg, policy, seq, length, cap):
    """Arguments for a shape-only call of select_clusters (to learn whether it is
    cluster-level)."""
    heads, g, d = cfg.n_kv_heads, cfg.group_size, cfg.head_dim
    k = jnp.zeros((1, heads, cap, d))
    bounds = (_init_bounds(policy, k, length - 1) if policy.keeps_bounds else ()) \
        if policy.needs_bounds else None
    return jnp.zeros((1, heads, g, d)), k, bounds, jnp.asarray(length), seq, cfg


@_recorded("static")
def static_blocks(cfg: LlamaConfig, policy, seq: int, heads: int) -> List[Block]:
    """The one-time static step at the end of prefill, for `heads` KV heads: what `prefill`
    adds to a plain prefill (the prefill itself is the same for every policy and not here).
    A step ranked by attention reads the prefill's own probabilities (`Policy.prefill_tap`):
    its "sum" over the window's rows and a group's heads is additions of shares (local, no
    message), so the block starts from that aggregate; a "max" aggregate starts from the
    window's probabilities and pays its comparisons here."""
    from eviction.static_step import block_plan, static_selection

    if policy is None or policy.static_keep(seq) is None:
        return []
    c = sampled(cfg, heads)
    L, d = cfg.n_layers, cfg.head_dim
    keep = policy.static_keep(seq)
    kv = _spec((1, heads, seq, d))
    attn_args, attn_of = _static_attention(policy, c, seq, heads)
    plan = block_plan(policy, seq)
    # the move: one one-hot [keep, T] per head, or with block-local ranking one [rows,
    # width] per block
    move_shape = (1, heads, keep, seq) if plan is None else (
        1, heads, len(plan.sizes), plan.rows, plan.width)

    def gather(m, k, v, p):
        return policy.apply_static_move(m, "policy", k, v, p)
    if keep < seq and policy.static_sorts:
        out = _static_sort_blocks(policy, c, seq, heads, keep)
    else:
        out = [] if keep >= seq else [  # keeping everything: no selection, no compaction
            _block("static_select", "selection",
                   lambda a, k: (static_selection(policy, None, k, c, attn_of(a)),),
                   {**attn_args, "k": kv},
                   count=n_selecting(policy, L), heads=heads, phase="static"),
            _block("compact", "gather", gather,
                   {"move": _spec(move_shape), "k": kv, "v": kv,
                    "pos": _spec((1, heads, seq), jnp.int32)},
                   count=L, heads=heads, phase="static")]
    if policy.keeps_bounds:
        _, cap = retained(policy, seq)
        out.append(_block("init_bounds", "selection", lambda k: (_init_bounds(policy, k, keep),),
                          {"k": _spec((1, heads, cap, d))}, count=L, heads=heads,
                          phase="static"))
    return out


def _static_attention(policy, c, seq: int, heads: int):
    """The static select block's first input and how it becomes the aggregate [b, k, t] the
    step ranks by: ({name: spec}, fn). From the prefill's probabilities (`prefill_tap`): the
    aggregate itself for "sum" (local additions); the window's rows [1, k, g, rows, t] for
    "max" (its comparisons are the step's). Without a tap (a ranking by something else than
    attention): all prompt queries q [1, t, k, g, d], scored inside the block."""
    from eviction.static_scores import aggregate_rows

    spec = policy.prompt_attention(seq)
    if spec is None:
        return {"q": _spec((1, seq, heads, c.group_size, c.head_dim))}, lambda q: None
    rows, aggregate = spec
    if aggregate == "sum":
        return {"attn": _spec((1, heads, seq))}, lambda a: a
    rows = min(rows, seq)
    return ({"probs": _spec((1, heads, c.group_size, rows, seq))},
            lambda p: aggregate_rows(p, rows, aggregate))


def _static_sort_blocks(policy, c, seq: int, heads: int, keep: int) -> List[Block]:
    """The static step with the "sort" kernel: a source layer selects its keep mask and
    compacts K, V and positions by one stable 1-bit sort (static_step.partition_rows) in one
    block (the mask is a one-bit key only inside the program computing it); a sharing layer
    gets the mask as 0/1, compares it again and sorts."""
    from eviction.static_step import static_mask

    L, d = c.n_layers, c.head_dim
    kv, pos = _spec((1, heads, seq, d)), _spec((1, heads, seq), jnp.int32)

    attn_args, attn_of = _static_attention(policy, c, seq, heads)

    def select(a, k, v, p):
        return policy.apply_static_move(static_mask(policy, None, k, c, attn_of(a)), "policy",
                                        k, v, p)

    n_sel = n_selecting(policy, L)
    out = [_block("static_select", "selection", select,
                  {**attn_args, "k": kv, "v": kv, "pos": pos},
                  count=n_sel, heads=heads, phase="static")]
    if n_sel < L:
        out.append(_block("compact", "gather",
                          lambda m, k, v, p: policy.apply_static_move(m > 0.5, "policy",
                                                                      k, v, p),
                          {"mask": _spec((1, heads, seq)), "k": kv, "v": kv, "pos": pos},
                          count=L - n_sel, heads=heads, phase="static"))
    return out


def with_frozen_rows(block: Block) -> Block:
    """The block with its "k"/"v" argument given as two: "<name>_frozen" (the first
    `frozen_rows` rows, fixed since written) and the tail, multiplied apart as
    `mpc_llama.model.decode_layer` does under SEMI2K's Beaver cache. Blocks without
    frozen rows are returned as they are."""
    split = [i for i, n in enumerate(block.arg_names) if n in ("k", "v")]
    if block.frozen_rows is None or not split:
        return block
    n, fn = block.frozen_rows, block.fn
    args, names = list(block.args), list(block.arg_names)
    for i in split:
        a = args[i]
        args[i] = _spec(a.shape[:2] + (a.shape[2] - n,) + a.shape[3:], a.dtype)
        args.append(_spec(a.shape[:2] + (n,) + a.shape[3:], a.dtype))
        names.append(names[i] + "_frozen")
    m = len(block.args)

    def joined(*xs):
        xs = list(xs)
        for j, i in enumerate(split):
            xs[i] = (xs[m + j], xs[i])
        return fn(*xs[:m])

    return dataclasses.replace(block, fn=joined, args=tuple(args), arg_names=tuple(names),
                               owners=block.owners + (SHARED,) * len(split))


def random_inputs(block: Block, seed: int = 0) -> tuple:
    """Values for a block's arguments (costs do not depend on them): normal floats, random
    bools, zero integers."""
    rng = np.random.default_rng(seed)

    def fill(s):
        if s.dtype == jnp.bool_:
            return rng.random(s.shape) < 0.5
        if jnp.issubdtype(s.dtype, jnp.integer):
            return np.zeros(s.shape, s.dtype)
        return rng.normal(size=s.shape).astype(np.float32)

    return tuple(jax.tree_util.tree_map(fill, a) for a in block.args)
