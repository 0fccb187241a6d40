"""Greedy generation with every prefill and decode step run under MPC.

Who holds what: the model owner secret-shares the weights once; the user secret-shares the
prompt and each fed-back token. The KV cache is produced and consumed inside SPU and never
reconstructed. Each step reveals only the next token id (to the user, who asked for it).
Public: the architecture, the prompt length, the step counter (hence cache length and
position), as in any fixed-shape MPC inference.

Under SEMI2K's Beaver cache (`Protocol.beaver_cache`) the weights are marked in every program,
so they are opened once per session (at the first prefill) and never again; and the KV
entries left by prefill (and its static eviction step), which never change while the prompt
generates, are kept apart from the growing tail as their own variables ("frozen"): each layer's
frozen rows are opened once, at the first decode step, and every later step only opens its
query, its probabilities and the tail (at most max_new_tokens rows). The frozen rows are
released (their openings dropped) when the next prompt's prefill replaces them. A kept
selection's compact K/V rows (MPCache's default) are likewise their own variables ("kept"),
written by the selecting steps and read, marked, by the steps between.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mpc_llama.cache import KVCache
from mpc_llama.config import LlamaConfig
from mpc_llama.generation import check_lengths
from mpc_llama.model import decode_step, fold_norm_weights, prefill
from protocols.cost import Cost
from protocols.session import PUBLIC, SECRET, SpuSession

MODEL_OWNER, DATA_OWNER = 0, 1


def spu_config(cfg: LlamaConfig) -> LlamaConfig:
    """The same model, with the embedding lookup as a one-hot matmul (a secret-index gather
    costs one equality + matmul per token under MPC; the result is identical)."""
    return cfg.replace(embedding="onehot")


def _secret_part(cache: KVCache):
    """Everything but the public length: (k, v, pos, bounds)."""
    return (cache.k, cache.v, cache.pos, cache.bounds)


def kept_parts(policy) -> tuple:
    """Indices, in a layer's policy state (cache.bounds), of the kept selection's compact K
    and V rows (MPCache with refresh > 1, kept="kv"): fixed between refreshes, so under the
    Beaver cache they travel as their own variables ("kept"): the first step that reuses
    them opens them, the later ones reuse that opening until the next selection replaces
    them (and releases it); the forced rows a selection holds after them
    (`MPCache.holds_forced`) with them. () for other policies."""
    if getattr(policy, "refresh", 1) > 1 and getattr(policy, "kept", None) == "kv":
        return (policy.n_bounds + 1, policy.n_bounds + 2)
    return ()


def _split(cache: KVCache, n: int, kept: tuple = ()):
    """(frozen, rest) or, with `kept` (kept_parts), (frozen, kept rows, rest): per layer,
    the first n entries of k and v, as their own arrays (one buffer each, so a Beaver-cached
    opening stays valid); per kept part, its per-layer arrays likewise; and the cache with
    k, v after them (and, with `kept`, its bounds without those parts)."""
    layers = range(cache.k.shape[0])
    frozen = (tuple(cache.k[i, :, :, :n] for i in layers),
              tuple(cache.v[i, :, :, :n] for i in layers))
    rest = (cache.k[:, :, :, n:], cache.v[:, :, :, n:], cache.pos, cache.bounds)
    if not kept:
        return frozen, rest
    rows = tuple(tuple(cache.bounds[j][i] for i in layers) for j in kept)
    bounds = tuple(b for j, b in enumerate(cache.bounds) if j not in kept)
    return frozen, rows, rest[:3] + (bounds,)


def _with_rows(bounds: tuple, rows: tuple, kept: tuple) -> tuple:
    """The bounds tuple with the kept parts (per-layer tuples, as _split gives them) back in
    their places."""
    out, it = list(bounds), iter(rows)
    for j in kept:
        out.insert(j, next(it))
    return tuple(out)


def _greedy(logits):
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def _prefill_fn(cfg: LlamaConfig, capacity: int, policy, frozen: int = None, head=_greedy):
    def fn(params, tokens):
        logits, cache = prefill(params, cfg, tokens, capacity, last_only=True, policy=policy)
        token = head(logits)
        if frozen is None:
            return token, _secret_part(cache)
        return (token,) + _split(cache, frozen, kept_parts(policy))
    return fn


def _decode_fn(cfg: LlamaConfig, policy, prompt_len: int, split: bool = False, head=_greedy,
               select_now: bool = True):
    def step(params, token, position, length, cache, frozen=None):
        k, v, pos, bounds = cache
        logits, cache = decode_step(params, cfg, token, position,
                                    KVCache(k, v, pos, length, bounds), policy, prompt_len,
                                    frozen=frozen, select_now=select_now)
        return head(logits), _secret_part(cache)

    kept = kept_parts(policy) if split else ()
    if kept:   # the kept rows apart: written by a selecting step, read (cached) by the others
        def kept_step(params, token, position, length, frozen, rows, cache):
            k, v, pos, bounds = cache
            logits, new = decode_step(params, cfg, token, position,
                                      KVCache(k, v, pos, length, _with_rows(bounds, rows, kept)),
                                      policy, prompt_len, frozen=frozen, select_now=select_now)
            layers = range(new.k.shape[0])
            out = tuple(tuple(new.bounds[j][i] for i in layers) for j in kept)
            rest = tuple(b for j, b in enumerate(new.bounds) if j not in kept)
            cache = (new.k, new.v, new.pos, rest)
            return (head(logits), out, cache) if select_now else (head(logits), cache)
        return kept_step
    if split:
        return lambda params, token, position, length, frozen, cache: step(
            params, token, position, length, cache, frozen)
    return step


@dataclasses.dataclass(frozen=True)
class PrivateResult:
    tokens: List[int]
    prefill_cost: Cost
    decode_costs: List[Cost]
    logits: Optional[List[np.ndarray]] = None  # per step [V], with reveal="logits"

    @property
    def total(self) -> Cost:
        total = self.prefill_cost
        for c in self.decode_costs:
            total = total + c
        return total


class PrivateGenerator:
    """Holds a session with the model weights shared once; generates for many prompts."""

    def __init__(self, session: SpuSession, cfg: LlamaConfig, params: dict,
                 model_owner: int = MODEL_OWNER, data_owner: int = DATA_OWNER, policy=None,
                 reveal: str = "token"):
        """reveal: what the user receives at each step, "token" (the greedy token, computed
        under MPC) or "logits" (all of them; the user takes the greedy token itself)."""
        from eviction.compaction import for_protocol

        if reveal not in ("token", "logits"):
            raise ValueError(f"reveal must be 'token' or 'logits', got {reveal!r}")
        self.session, self.cfg = session, spu_config(cfg)
        self.policy = for_protocol(policy, session.protocol.kind)
        self.head = _greedy if reveal == "token" else (lambda z: z[0])
        self.data_owner = data_owner
        # parties other than the model owner pass ShapeDtypeStructs (placeholder_params); the
        # owner folds the norm weights into the next matrices before sharing (a norm is then
        # one secret product fewer), the others fold their placeholders' tree alike
        self.params = fold_norm_weights(jax.tree_util.tree_map(
            lambda a: a if isinstance(a, jax.ShapeDtypeStruct) else np.asarray(a, np.float32),
            params))
        session.put("params", self.params, owner=model_owner)
        self._programs = {}

    @property
    def split(self) -> bool:
        """Whether prefill's entries are kept apart (frozen) for the Beaver cache."""
        return self.session.beaver_cache

    def _program(self, key, fn, args, names, vis):
        if key not in self._programs:
            self._programs[key] = self.session.compile(fn, args, names, vis,
                                                       cached=("params", "frozen", "kept"))
        return self._programs[key]

    def prefill_program(self, prompt_len: int, capacity: int):
        """Writes "next" and "cache" (and, split, "frozen": the entries left by prefill)."""
        tokens = np.zeros((1, prompt_len), np.int32)
        frozen = self._cache_length(prompt_len) if self.split else None
        return self._program(("prefill", prompt_len, capacity),
                             _prefill_fn(self.cfg, capacity, self.policy, frozen, self.head),
                             (self.params, tokens), ("params", "tokens"), (SECRET, SECRET))

    def decode_program(self, prompt_len: int, capacity: int, select_now: bool = True):
        """Reads the secret cache variables "cache:*" written by prefill and overwrites them
        (split: also reads "frozen:*", which it leaves as they are). select_now: see
        mpc_llama.model.decode_step (a policy with `refresh` compiles two programs, selecting
        and reusing the kept selection; which one runs is public)."""
        specs = jax.eval_shape(
            lambda p, t: prefill(p, self.cfg, t, capacity, policy=self.policy)[1],
            self.params, jax.ShapeDtypeStruct((1, prompt_len), jnp.int32))
        head = (self.params, np.zeros((1,), np.int32), np.int32(0), np.int32(0))
        names = ("params", "token", "position", "length")
        vis = (SECRET, SECRET, PUBLIC, PUBLIC)
        kept = kept_parts(self.policy) if self.split else ()
        if kept:
            frozen, rows, rest = jax.eval_shape(
                lambda c: _split(c, self._cache_length(prompt_len), kept), specs)
            args, names, vis = head + (frozen, rows, rest), \
                names + ("frozen", "kept", "cache"), vis + (SECRET,) * 3
        elif self.split:
            frozen, rest = jax.eval_shape(
                lambda c: _split(c, self._cache_length(prompt_len)), specs)
            args, names, vis = head + (frozen, rest), names + ("frozen", "cache"), \
                vis + (SECRET, SECRET)
        else:
            args, names, vis = head + (_secret_part(specs),), names + ("cache",), vis + (SECRET,)
        return self._program(("decode", prompt_len, capacity, select_now),
                             _decode_fn(self.cfg, self.policy, prompt_len, self.split,
                                        self.head, select_now), args,
                             names, vis)

    def _cache_length(self, prompt_len: int) -> int:
        """Entries after prefill: the static keep count (public), or the prompt length."""
        keep = self.policy.static_keep(prompt_len) if self.policy is not None else None
        return prompt_len if keep is None else keep

    def generate(self, prompt: Sequence[int], max_new_tokens: int, eos_ids: Sequence[int] = (),
                 on_token: Optional[Callable[[int, Cost], None]] = None) -> PrivateResult:
        check_lengths(self.cfg, len(prompt), max_new_tokens)
        s, capacity = self.session, len(prompt) + max_new_tokens
        s.put("tokens", np.asarray([prompt], np.int32), owner=self.data_owner)
        kept = bool(kept_parts(self.policy)) and self.split
        outs = ("next", "frozen") + (("kept",) if kept else ()) + ("cache",) \
            if self.split else ("next", "cache")
        refs, prefill_cost = s.run(self.prefill_program(len(prompt), capacity), outs)
        tok_ref = refs[0]
        programs = {}
        length = self._cache_length(len(prompt))
        tokens, costs, logits = [], [], []
        for step in range(max_new_tokens):
            # only the user learns the token; the others learn whether generation goes on
            token = s.reveal_to(tok_ref, self.data_owner)
            if token is not None and self.head is not _greedy:
                logits.append(np.asarray(token))
                token = np.argmax(token)
            token = None if token is None else int(np.asarray(token).reshape(-1)[0])
            tokens.append(token)
            if on_token and token is not None:
                on_token(token, costs[-1] if costs else prefill_cost)
            if s.agree(token in eos_ids or step == max_new_tokens - 1, self.data_owner):
                break
            s.put("token", np.asarray([token or 0], np.int32), owner=self.data_owner)
            s.put("position", np.int32(len(prompt) + step), public=True)
            s.put("length", np.int32(length + step), public=True)
            now = self.policy is None or self.policy.selects_at(step)
            if now not in programs:
                programs[now] = self.decode_program(len(prompt), capacity, now)
            # frozen: unchanged; kept rows: rewritten by a selecting step only (the old ones'
            # Beaver openings released as the new ones replace them)
            outs = ("next", "kept", "cache") if kept and now else ("next", "cache")
            refs, cost = s.run(programs[now], outs)
            tok_ref = refs[0]
            costs.append(cost)
        return PrivateResult(tokens, prefill_cost, costs, logits if logits else None)


def placeholder_params(cfg: LlamaConfig) -> dict:
    """The weights' shapes without values: what parties other than the model owner pass."""
    from mpc_llama.model import init_params

    return jax.eval_shape(lambda k: init_params(cfg, k), jax.random.PRNGKey(0))


def generate_all_parties(protocol, cfg: LlamaConfig, params: dict, prompt: Sequence[int],
                         max_new_tokens: int, eos_ids: Sequence[int] = (), policy=None,
                         on_token: Optional[Callable[[int, Cost], None]] = None):
    """Private generation with every party's counters measured (one session: in 2PC the
    other party's counters follow the profiled party's exactly; with three parties every party
    prints its own, see protocols.session.SpuSession).
    Returns (PrivateResult with all parties' counters, setup Cost of the session).
    """
    session = SpuSession(protocol)
    setup = session.warm_up()
    gen = PrivateGenerator(session, cfg, params, policy=policy)
    result = gen.generate(prompt, max_new_tokens, eos_ids, on_token=on_token)
    return result, setup
