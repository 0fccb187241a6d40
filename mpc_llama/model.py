"""A pure functional LLaMA decoder in JAX: `prefill` and `decode_step` on an explicit cache.

Parameters are a dict pytree with layers stacked on a leading axis:
    embed [V, d]; final_norm [d]; lm_head [d, V] (only when embeddings are untied)
    layers: attn_norm [L, d], wq [L, d, N*D], wk [L, d, K*D], wv [L, d, K*D], wo [L, N*D, d],
            mlp_norm [L, d], w_gate [L, d, F], w_up [L, d, F], w_down [L, F, d]
    (the norm weights absent once folded into the matrices after them: `fold_norm_weights`)
Axis letters: b batch, t/s query/key positions, n query heads, k KV heads, g query heads per KV
head, d head dim.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from mpc_llama import nonlinear
from mpc_llama.cache import KVCache, init_cache, write_layer
from mpc_llama.config import LlamaConfig


def init_params(cfg: LlamaConfig, key: jax.Array, scale: float = 0.02) -> dict:
    """Random parameters (for tests and cost measurements, where values do not matter)."""
    L, d, F = cfg.n_layers, cfg.d_model, cfg.ffn_dim
    nd, kd = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = {"wq": (L, d, nd), "wk": (L, d, kd), "wv": (L, d, kd), "wo": (L, nd, d),
              "w_gate": (L, d, F), "w_up": (L, d, F), "w_down": (L, F, d)}
    keys = jax.random.split(key, len(shapes) + 4)
    layers = {name: scale * jax.random.normal(k, s) for k, (name, s) in zip(keys, shapes.items())}
    layers["attn_norm"] = 1.0 + 0.1 * jax.random.normal(keys[-4], (L, d))
    layers["mlp_norm"] = 1.0 + 0.1 * jax.random.normal(keys[-3], (L, d))
    params = {"embed": jax.random.normal(keys[-2], (cfg.vocab_size, d)), "layers": layers,
              "final_norm": jnp.ones((d,))}
    if not cfg.tie_embeddings:
        params["lm_head"] = scale * jax.random.normal(keys[-1], (d, cfg.vocab_size))
    return params


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """[D/2] inverse frequencies, with LLaMA-3.1 scaling when configured (public constants)."""
    inv = 1.0 / (cfg.rope_base ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim))
    rs = cfg.rope_scaling
    if rs is not None:
        wavelen = 2 * math.pi / inv
        low_wl = rs.original_max_position_embeddings / rs.low_freq_factor
        high_wl = rs.original_max_position_embeddings / rs.high_freq_factor
        smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
            rs.high_freq_factor - rs.low_freq_factor)
        scaled = np.where(wavelen > low_wl, inv / rs.factor, inv)
        mid = (wavelen <= low_wl) & (wavelen >= high_wl)
        inv = np.where(mid, (1 - smooth) * inv / rs.factor + smooth * inv, scaled)
    return inv.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, cfg: LlamaConfig) -> jax.Array:
    """Rotate-half RoPE. x: [b, t, h, d]; positions: [t] (public)."""
    angles = positions.astype(jnp.float32)[:, None] * rope_inv_freq(cfg)[None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)[None, :, None, :]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * jnp.cos(angles) + rotated * jnp.sin(angles)


def rms_norm(x: jax.Array, weight: Optional[jax.Array], cfg: LlamaConfig) -> jax.Array:
    """x * rsqrt(mean(x^2) + eps) * weight, with x scaled by 1/sqrt(d) BEFORE squaring:
    LLM residual streams carry outliers (SmolLM2: |x| ~ 22,500) whose square overflows the
    FM64 fixed-point product (|a*b| < 2^27 with 18 fraction bits). Same value in plaintext.
    weight [d], or None where the model owner folded it into the matrices that read the
    output (`fold_norm_weights`)."""
    xs = x * (1.0 / math.sqrt(x.shape[-1]))
    # the sum of squares as a dot product: under MPC one product per row instead of one per
    # element (ABY3 at d=4096: 0.54 MB instead of 0.79 MB per norm)
    ms = jnp.einsum("...d,...d->...", xs, xs)[..., None]
    out = x * nonlinear.RSQRT[cfg.rsqrt](ms + cfg.norm_eps)
    return out if weight is None else out * weight


# RMSNorm weight -> the matrices (per layer, [L, d, *]) that read the normed activations
NORM_FOLDS = {"attn_norm": ("wq", "wk", "wv"), "mlp_norm": ("w_gate", "w_up")}


def fold_norm_weights(params: dict) -> dict:
    """The model owner's offline step before sharing the weights for MPC: an RMSNorm weight g
    scales the rows of the matrices that read the normed x, (x * g) @ W = x @ (g[:, None] * W),
    so under MPC a norm costs one secret x secret vector product fewer. attn_norm goes into
    wq, wk, wv; mlp_norm into w_gate, w_up; final_norm into lm_head where the head is untied
    (a tied head is the embedding, which the input side reads unscaled: that norm keeps its
    weight). Folded weights leave the tree (`rms_norm` then applies none). Leaves may be
    jax.ShapeDtypeStructs (the other parties' placeholders): only the tree changes then.
    Already folded params are returned as they are."""
    layers = dict(params["layers"])
    out = {k: v for k, v in params.items() if k != "layers"}
    for norm, mats in NORM_FOLDS.items():
        g = layers.pop(norm, None)
        if g is None:
            continue
        for m in mats:
            if not isinstance(layers[m], jax.ShapeDtypeStruct):
                layers[m] = layers[m] * g[:, :, None]
    if "lm_head" in out and "final_norm" in out:
        g = out.pop("final_norm")
        if not isinstance(out["lm_head"], jax.ShapeDtypeStruct):
            out["lm_head"] = out["lm_head"] * g[:, None]
    out["layers"] = layers
    return out


ONEHOT_CHUNK = 1 << 20  # one-hot elements per piece of a long prompt's embedding


def embed(params: dict, tokens: jax.Array, cfg: LlamaConfig) -> jax.Array:
    """tokens [b, t] -> [b, t, d]; "onehot" avoids a secret-index gather under MPC. A long
    prompt's one-hot embedding runs in pieces of at most ONEHOT_CHUNK (token, vocabulary)
    pairs: the same values, but SPU holds one piece's equality tests in memory at a time
    (SmolLM2's 49,152-word vocabulary at 128 tokens under FM128 ran out of 24 GB whole)."""
    if cfg.embedding == "onehot":
        step = max(1, ONEHOT_CHUNK // (cfg.vocab_size * tokens.shape[0]))
        parts = [jax.nn.one_hot(tokens[:, i:i + step], cfg.vocab_size,
                                dtype=params["embed"].dtype) @ params["embed"]
                 for i in range(0, tokens.shape[1], step)]
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
    return params["embed"][tokens]


def lm_head(params: dict, x: jax.Array, cfg: LlamaConfig) -> jax.Array:
    x = rms_norm(x, params.get("final_norm"), cfg)
    if cfg.tie_embeddings:
        return x @ params["embed"].T
    return x @ params["lm_head"]


def mlp(lp: dict, x: jax.Array, cfg: LlamaConfig) -> jax.Array:
    return gated(x @ lp["w_gate"], x @ lp["w_up"], cfg) @ lp["w_down"]


def gated(gate: jax.Array, up: jax.Array, cfg: LlamaConfig) -> jax.Array:
    """SwiGLU's nonlinear part: silu(gate) * up."""
    return nonlinear.SILU[cfg.silu](gate) * up


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, cfg: LlamaConfig,
           defer: bool = True):
    """Grouped-query attention.

    q: [b, t, n, d]; k, v: [b, k, s, d]; mask: bool, broadcastable to [b, k, g, t, s].
    defer: the softmax normalised after p . V (nonlinear.Weights: one product per output
    instead of one per score), else before it (the prefill: a static step's tap reads the
    normalised probabilities, so the prefill with and without one costs the same but for
    the static step). Returns [b, t, n*d].
    """
    return attention_values(nonlinear.SOFTMAX[cfg.softmax](attention_scores(q, k, cfg), mask,
                                                           normalise=not defer), v, cfg)


def attention_scores(q: jax.Array, k, cfg: LlamaConfig) -> jax.Array:
    """q: [b, t, n, d]; k: [b, k, s, d] -> scaled scores [b, k, g, t, s].

    k may also be a tuple of row segments (e.g. the frozen prompt rows and the growing tail):
    one matmul per segment, so that under SEMI2K a segment that never changes is a buffer
    whose Beaver opening can be reused (protocols.session)."""
    if isinstance(k, tuple):
        return jnp.concatenate([attention_scores(q, part, cfg) for part in k], axis=-1)
    b, t = q.shape[:2]
    qg = q.reshape(b, t, cfg.n_kv_heads, cfg.group_size, cfg.head_dim)
    return jnp.einsum("btkgd,bksd->bkgts", qg, k) / math.sqrt(cfg.head_dim)


def attention_values(probs, v, cfg: LlamaConfig) -> jax.Array:
    """probs: [b, k, g, t, s], or nonlinear.Weights (p of that shape, recip [b, k, g, t, 1]:
    the output rows are normalised after the matmul); v: [b, k, s, d] (or a tuple of row
    segments, as in `attention_scores`) -> [b, t, n*d]."""
    if isinstance(probs, nonlinear.Weights):
        out = attention_values(probs.p, v, cfg)
        b, t = out.shape[:2]
        recip = jnp.transpose(probs.recip, (0, 3, 1, 2, 4))                   # [b,t,k,g,1]
        return (out.reshape(recip.shape[:4] + (cfg.head_dim,)) * recip).reshape(b, t, -1)
    if isinstance(v, tuple):
        ends = np.cumsum([part.shape[2] for part in v])
        return sum(_values_matmul(probs[..., e - part.shape[2]:e], part, cfg)
                   for e, part in zip(ends, v))
    b, t = probs.shape[0], probs.shape[3]
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v)
    return out.reshape(b, t, cfg.n_heads * cfg.head_dim)


def _values_matmul(probs: jax.Array, v: jax.Array, cfg: LlamaConfig) -> jax.Array:
    """attention_values as a batched matmul with v as it is: SPU then multiplies v's own
    buffer, whose Beaver opening can be kept (the einsum's lowering made SEMI2K open a new
    copy of v at every call: probed on 0.9.5). Same values."""
    b, k, g, t, s = probs.shape
    out = jnp.matmul(probs.reshape(b, k, g * t, s), v).reshape(b, k, g, t, -1)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, cfg.n_heads * cfg.head_dim)


def _layer_params(params: dict, i: int) -> dict:
    """Layer i's parameters; `params["layers"]` may also be a per-layer list (see
    `split_layers`)."""
    if isinstance(params["layers"], (list, tuple)):
        return params["layers"][i]
    return {name: w[i] for name, w in params["layers"].items()}


def device_params(params: dict) -> dict:
    """The parameter tree as device arrays, for plaintext loops that call jitted functions
    many times. Loaded checkpoints hold numpy arrays (often transposed views, Fortran-ordered);
    jax converts a numpy argument on EVERY call (SmolLM2, 2 cores: a layer's MLP call took
    6.3 ms with numpy weights, 0.36 ms with these). Convert once, then pass these."""
    return jax.tree_util.tree_map(jax.device_put, params)


def split_layers(params: dict, n_layers: int) -> dict:
    """The same parameters with `layers` as a per-layer list of dicts (no slicing per step)."""
    return {**params, "layers": [_layer_params(params, i) for i in range(n_layers)]}


def _qkv(lp: dict, h: jax.Array, positions: jax.Array, cfg: LlamaConfig):
    """h: [b, t, d] normed -> q [b, t, n, d], k and v [b, k, t, d] (q and k rotated)."""
    b, t, _ = h.shape
    q = (h @ lp["wq"]).reshape(b, t, cfg.n_heads, cfg.head_dim)
    k = (h @ lp["wk"]).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
    v = (h @ lp["wv"]).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
    q, k = apply_rope(q, positions, cfg), apply_rope(k, positions, cfg)
    return q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def attend_chunked(q: jax.Array, k: jax.Array, v: jax.Array, cfg: LlamaConfig,
                   chunk: int, band: int = 512) -> jax.Array:
    """Causal attention of a whole prompt without a T x T score matrix (plaintext speed path).

    Queries go in bands of `band` (keys up to the band's end only: about half the work of a
    full matrix) and, inside a band, `chunk` queries at a time under `lax.map` (one compiled
    body per band, so compile time does not grow with T / chunk). Laid out for CPU matmuls:
    the queries of a KV group side by side, the scale folded into q, normalisation after
    p . V. Same values as `attend` with a causal mask and cfg.softmax ("clipped" zeroes
    exp(z) below nonlinear.EXP_CLIP). q: [b, t, n, d]; k, v: [b, k, t, d]. Returns [b, t, n*d].
    """
    b, t = q.shape[:2]
    kh, g, hd = cfg.n_kv_heads, cfg.group_size, cfg.head_dim
    chunk = min(chunk, t)
    band = max(chunk, band // chunk * chunk)
    padded = _round_up(t, chunk)
    qg = (q * (1.0 / math.sqrt(hd))).reshape(b, t, kh, g, hd).transpose(0, 2, 1, 3, 4)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, padded - t), (0, 0), (0, 0)))

    def one_chunk(start, end):
        """Queries [start, start + chunk) against keys [0, end)."""
        qc = jax.lax.dynamic_slice_in_dim(qg, start, chunk, axis=2)
        scores = jnp.einsum("bktgd,bksd->bktgs", qc, k[:, :, :end])
        causal = jnp.arange(end)[None, :] <= (start + jnp.arange(chunk))[:, None]   # [c, end]
        scores = jnp.where(causal[:, None, :], scores, -1e4)
        z = scores - jnp.max(scores, axis=-1, keepdims=True)
        p = jnp.exp(z)
        if cfg.softmax == "clipped":
            p = jnp.where(z > nonlinear.EXP_CLIP, p, 0.0)
        out = jnp.einsum("bktgs,bksd->btkgd", p, v[:, :, :end])
        out = out / p.sum(axis=-1).transpose(0, 2, 1, 3)[..., None]
        return out.reshape(b, chunk, -1)

    outs = []
    for lo in range(0, padded, band):
        hi = min(padded, lo + band)
        starts = jnp.arange(lo, hi, chunk)
        part = jax.lax.map(lambda s, e=min(hi, t): one_chunk(s, e), starts)   # [n, b, c, nd]
        outs.append(part.transpose(1, 0, 2, 3).reshape(b, hi - lo, -1))
    return jnp.concatenate(outs, axis=1)[:, :t]


def run_prompt(params: dict, cfg: LlamaConfig, tokens: jax.Array, chunk: int = 0,
               band: int = 512, tap: Optional[Callable] = None):
    """The prompt through every layer with causal attention.

    tokens: [b, t] int32 at positions 0..t-1; chunk > 0 computes attention `chunk` queries at
    a time (plaintext speed; 0 = one masked T x T matrix, as compiled for SPU).
    tap (chunk = 0 only): a function of each layer's attention probabilities [b, k, g, t, t]
    (e.g. a static eviction step's window aggregate, `Policy.prefill_tap`), so a step that
    ranks by them reads the prefill's own probabilities instead of computing them again.
    Returns the final hidden states [b, t, d] and, per layer, (q [b, t, n, d] rotated,
    k [b, k, t, d] rotated, v [b, k, t, d]), plus tap(probs) as a fourth element when tapped:
    everything a static eviction step reads, so one prompt pass can feed every policy
    (`build_cache`).
    """
    if tap is not None and chunk:
        raise ValueError("a tap reads the probabilities of the unchunked prefill (chunk=0)")
    t = tokens.shape[1]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool)) if not chunk else None
    x = embed(params, tokens, cfg)
    layers = []
    for i in range(cfg.n_layers):
        x, out = prompt_layer(_layer_params(params, i), x, cfg, chunk, band, tap, causal)
        layers.append(out)
    return x, layers


def prompt_layer(lp: dict, x: jax.Array, cfg: LlamaConfig, chunk: int = 0, band: int = 512,
                 tap: Optional[Callable] = None, causal: Optional[jax.Array] = None):
    """One layer of `run_prompt` (lp: the layer's parameters; x: [b, t, d] residual stream;
    chunk, band, tap: as there; causal: the [t, t] mask when chunk = 0, built if None).
    Returns (x, (q, k, v) or (q, k, v, tap(probs)))."""
    t = x.shape[1]
    positions = jnp.arange(t, dtype=jnp.int32)
    if not chunk and causal is None:
        causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    q, k, v = _qkv(lp, rms_norm(x, lp.get("attn_norm"), cfg), positions, cfg)
    if tap is not None:
        probs = nonlinear.SOFTMAX[cfg.softmax](attention_scores(q, k, cfg), causal)
        att, extra = attention_values(probs, v, cfg), (tap(probs),)   # as attend(defer=False)
    else:
        att, extra = (attend_chunked(q, k, v, cfg, chunk, band) if chunk
                      else attend(q, k, v, causal, cfg, defer=False)), ()
    x = x + att @ lp["wo"]
    x = x + mlp(lp, rms_norm(x, lp.get("mlp_norm"), cfg), cfg)
    return x, (q, k, v) + extra


def build_cache(cfg: LlamaConfig, layers, capacity: int, policy=None,
                compaction: str = "policy") -> KVCache:
    """A fresh cache from a prompt's per-layer (q, k, v) (see `run_prompt`), after the
    policy's static step. capacity: static cache size C >= t (prompt plus room for generated
    tokens). With a policy that has a static step, each layer keeps policy.static_keep(t)
    entries (compacted, original positions kept), so the cache holds that many plus
    capacity - t free slots; policies with a dynamic step also get per-cluster key bounds and
    a capacity rounded up to whole clusters. compaction: "policy" moves the kept entries with
    the policy's own kernel (what SPU runs: no secret index), "index" with an index gather
    (the same entries, bit for bit: a plaintext shortcut for the accuracy harness)."""
    if compaction not in ("policy", "index"):
        raise ValueError(f"compaction must be policy or index, got {compaction!r}")

    b, _, t, _ = layers[0][1].shape
    if capacity < t:
        raise ValueError(f"cache capacity {capacity} is smaller than the prompt ({t})")
    n_keep = t if policy is None or policy.static_keep(t) is None else policy.static_keep(t)
    new_cap = n_keep + capacity - t
    if policy is not None and policy.needs_bounds:
        new_cap = _round_up(new_cap, policy.cluster_sizes[0])
    positions = jnp.arange(t, dtype=jnp.int32)
    empty = init_cache(cfg, b, new_cap)
    ks, vs, ps, bounds, moves = [], [], [], [], {}
    for i, (q, k, v, *_) in enumerate(layers):
        pos = jnp.broadcast_to(positions, k.shape[:3])
        if n_keep < t:
            src = policy.share_source(i, cfg.n_layers)
            if src not in moves:  # a sharing layer reuses its source's compaction matrix
                qs = layers[src][0]
                qg = qs.reshape(b, t, cfg.n_kv_heads, cfg.group_size, cfg.head_dim)
                tapped = layers[src][3] if len(layers[src]) > 3 else None
                moves[src] = policy.static_move(qg, layers[src][1], cfg, compaction,
                                                attn=tapped)
            k, v, pos = policy.apply_static_move(moves[src], compaction, k, v, pos)
        ck, cv, cp = write_layer(empty.k[i], empty.v[i], empty.pos[i], 0, k, v, pos)
        ks.append(ck), vs.append(cv), ps.append(cp)
        if policy is not None and policy.needs_bounds:
            bounds.append(policy.init_state(ck, n_keep, t))
    stacked = tuple(jnp.stack(parts) for parts in zip(*bounds)) if bounds else None
    return KVCache(jnp.stack(ks), jnp.stack(vs), jnp.stack(ps), jnp.asarray(n_keep, jnp.int32),
                   stacked)


def prefill(params: dict, cfg: LlamaConfig, tokens: jax.Array, capacity: int,
            last_only: bool = False, policy=None, chunk: int = 0) -> Tuple[jax.Array, KVCache]:
    """Runs the prompt with causal attention and fills a fresh cache (`run_prompt`, then
    `build_cache` with the policy's static step).

    tokens: [b, t] int32, positions 0..t-1; capacity, policy: see `build_cache`; chunk: see
    `run_prompt`. Returns logits [b, t, V] (or [b, V] for the last position when `last_only`)
    and the cache.
    """
    if capacity < tokens.shape[1]:
        raise ValueError(f"cache capacity {capacity} is smaller than the prompt "
                         f"({tokens.shape[1]})")
    # the static step ranks by the prefill's own attention probabilities where it can
    tap = None if chunk or policy is None else policy.prefill_tap(tokens.shape[1])
    x, layers = run_prompt(params, cfg, tokens, chunk, tap=tap)
    cache = build_cache(cfg, layers, capacity, policy)
    if last_only:
        x = x[:, -1]
    return lm_head(params, x, cfg), cache


def decode_layer(lp: dict, x: jax.Array, layer_cache: tuple, cache_length, positions,
                 policy, prompt_len: int, cfg: LlamaConfig, selection=None,
                 diagnostics: bool = False, select_now: bool = True, frozen=None):
    """One layer of a decode step (what `decode_step` runs per layer).

    lp: this layer's parameters; x: [b, 1, d] residual stream; layer_cache: (k [b, k, c, d],
    v, pos [b, k, c], bounds tuple or None) of this layer; cache_length: [] entries before this
    token; positions: [1] int32 (public); selection: a sharing source's selection to reuse, or
    None to select here; select_now: see `decode_step`; frozen: None, or (k, v) [b, k, P, d],
    this layer's first P entries kept apart from the cache (they never change), layer_cache
    then holding only the entries after them (its k/v [b, k, c - P, d], pos and bounds still
    over all c). The attention matmuls then run on the two segments separately (see
    `attention_scores`). Returns (x, new layer_cache, selection, attended counts [b, k],
    diagnostics dict or None).
    """
    ck, cv, cp, layer_bounds = layer_cache
    if frozen is not None:
        ck, cv = (jnp.concatenate([f, c], axis=2) for f, c in zip(frozen, (ck, cv)))
    length = cache_length + 1  # entries valid after writing the current one
    q, k, v = _qkv(lp, rms_norm(x, lp.get("attn_norm"), cfg), positions, cfg)
    ck, cv, cp = write_layer(ck, cv, cp, cache_length, k, v, positions)
    segments = None
    if frozen is not None:
        n = frozen[0].shape[2]
        segments = ((frozen[0], ck[:, :, n:]), (frozen[1], cv[:, :, n:]))
    valid = jnp.arange(ck.shape[2]) < length
    if policy is not None and policy.dynamic:
        layer_bounds = policy.update_state(layer_bounds, k[:, :, 0], cache_length)
        out, selection, count, layer_bounds = policy.decode_attention(
            q, ck, cv, layer_bounds, length, prompt_len, cfg, selection, select_now, segments)
        attended = policy.attended_mask(selection, valid, ck.shape[:3]) if diagnostics else None
    else:
        mask = jnp.broadcast_to(valid, ck.shape[:3])  # [b, k, c]
        mk, mv = (ck, cv) if segments is None else segments
        out = attend(q, mk, mv, mask[:, :, None, None, :], cfg)
        selection, count, attended = None, mask.sum(axis=-1), mask
    diag = None
    if diagnostics:
        diag = {"attn_out": out[:, 0], "attended_pos": jnp.where(attended, cp, -1)}
    x = x + out @ lp["wo"]
    x = x + mlp(lp, rms_norm(x, lp.get("mlp_norm"), cfg), cfg)
    if frozen is not None:
        ck, cv = ck[:, :, frozen[0].shape[2]:], cv[:, :, frozen[1].shape[2]:]
    return x, (ck, cv, cp, layer_bounds), selection, count, diag


def decode_step(params: dict, cfg: LlamaConfig, token: jax.Array, position, cache: KVCache,
                policy=None, prompt_len: int = 0, return_attended: bool = False,
                diagnostics: bool = False, layer_fn=None, select_now: bool = True,
                frozen=None):
    """One token through the model, appending its key/value at index `cache.length`.

    token: [b] int32; position: [] int32 original position of the token (public; differs from
    cache.length once entries were evicted). With a dynamic `policy`, each layer (or the
    layer it shares with) selects entries per KV head and attends to those only; prompt_len
    (static, public) sets the policy's sizes. Returns logits [b, V] and the new cache, plus,
    with `return_attended`, the attended entry counts [L, b, K] (plaintext diagnostics); with
    `diagnostics`, a dict instead: counts, attn_out [L, b, N*D] (each layer's attention output)
    and attended_pos [L, b, K, C] (original positions of the attended entries, -1 elsewhere).
    layer_fn: replaces `decode_layer` (same signature), e.g. a per-layer jit for fast
    plaintext runs. select_now (static, public: a function of the step number): whether a
    policy that keeps its selection for several steps (`refresh`) selects afresh now
    (`policy.selects_at(step)`); other policies select at every step. A cache whose k/v/pos
    (and bounds parts) are per-layer tuples instead of stacked arrays is returned in the same
    per-layer form (no whole-cache copy per step), as are
    `params["layers"]` given as a per-layer list. frozen: None, or (ks, vs), per layer the first
    P entries [b, K, P, D] kept apart; cache.k/v then hold the entries after them (see
    `decode_layer`; private generation under SEMI2K's Beaver cache).
    """
    run_layer = layer_fn or decode_layer
    positions = jnp.reshape(jnp.asarray(position, jnp.int32), (1,))
    dynamic = policy is not None and policy.dynamic
    x = embed(params, token[:, None], cfg)
    layered = isinstance(cache.k, (list, tuple))
    parts, selections, counts, diags = [], {}, [], []
    for i in range(cfg.n_layers):
        layer_bounds = None if cache.bounds is None else tuple(bb[i] for bb in cache.bounds)
        src = policy.share_source(i, cfg.n_layers) if dynamic else i
        # the policy this layer runs (a policy may leave some layers the whole cache)
        layer_policy = policy.layer_policy(i, cfg.n_layers) if dynamic else policy
        extra = {} if frozen is None else {"frozen": (frozen[0][i], frozen[1][i])}
        x, layer_cache, selections[src], count, diag = run_layer(
            _layer_params(params, i), x, (cache.k[i], cache.v[i], cache.pos[i], layer_bounds),
            cache.length, positions, layer_policy, prompt_len, cfg,
            selections.get(src), diagnostics,  # a sharing layer reuses its source's pick
            select_now, **extra)
        parts.append(layer_cache)
        counts.append(count)
        diags.append(diag)
    collect = tuple if layered else jnp.stack
    ks, vs, ps, bounds = zip(*parts)
    stacked = None if cache.bounds is None else tuple(collect(b) for b in zip(*bounds))
    cache = KVCache(collect(ks), collect(vs), collect(ps), cache.length + 1, stacked)
    logits = lm_head(params, x[:, 0], cfg)
    if diagnostics:
        return logits, cache, {"counts": jnp.stack(counts),
                               "attn_out": jnp.stack([d["attn_out"] for d in diags]),
                               "attended_pos": jnp.stack([d["attended_pos"] for d in diags])}
    if return_attended:
        return logits, cache, jnp.stack(counts)
    return logits, cache
