"""Greedy generation with every prefill and decode step run under MPC.

Who holds what: the model owner secret-shares the weights once; the user secret-shares the
prompt and each fed-back token. The KV cache is produced and consumed inside SPU and never
reconstructed. Each step reveals only the next token id (to the user, who asked for it).
Public: the architecture, the prompt length, the step counter (hence cache length and
position), as in any fixed-shape MPC inference.
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
from mpc_llama.model import decode_step, prefill
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


def _prefill_fn(cfg: LlamaConfig, capacity: int, policy):
    def fn(params, tokens):
        logits, cache = prefill(params, cfg, tokens, capacity, last_only=True, policy=policy)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), _secret_part(cache)
    return fn


def _decode_fn(cfg: LlamaConfig, policy, prompt_len: int, select_now: bool = True):
    def fn(params, token, position, length, cache):
        k, v, pos, bounds = cache
        logits, cache = decode_step(params, cfg, token, position,
                                    KVCache(k, v, pos, length, bounds), policy, prompt_len,
                                    select_now=select_now)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), _secret_part(cache)
    return fn


@dataclasses.dataclass(frozen=True)
class PrivateResult:
    tokens: List[int]
    prefill_cost: Cost
    decode_costs: List[Cost]

    @property
    def total(self) -> Cost:
        total = self.prefill_cost
        for c in self.decode_costs:
            total = total + c
        return total


class PrivateGenerator:
    """Holds a session with the model weights shared once; generates for many prompts."""

    def __init__(self, session: SpuSession, cfg: LlamaConfig, params: dict,
                 model_owner: int = MODEL_OWNER, data_owner: int = DATA_OWNER, policy=None):
        from eviction.compaction import for_protocol

        self.session, self.cfg = session, spu_config(cfg)
        self.policy = for_protocol(policy, session.protocol.kind)
        self.data_owner = data_owner
        # parties other than the model owner pass ShapeDtypeStructs (placeholder_params)
        self.params = jax.tree_util.tree_map(
            lambda a: a if isinstance(a, jax.ShapeDtypeStruct) else np.asarray(a, np.float32),
            params)
        session.put("params", self.params, owner=model_owner)
        self._programs = {}

    def _program(self, key, fn, args, names, vis):
        if key not in self._programs:
            self._programs[key] = self.session.compile(fn, args, names, vis)
        return self._programs[key]

    def prefill_program(self, prompt_len: int, capacity: int):
        tokens = np.zeros((1, prompt_len), np.int32)
        return self._program(("prefill", prompt_len, capacity),
                             _prefill_fn(self.cfg, capacity, self.policy), (self.params, tokens),
                             ("params", "tokens"), (SECRET, SECRET))

    def decode_program(self, prompt_len: int, capacity: int, select_now: bool = True):
        """Reads the secret cache variables "cache:*" written by prefill and overwrites them.
        select_now: see mpc_llama.model.decode_step (a policy with `refresh` compiles two
        programs: selecting, and reusing the kept selection; which runs is public)."""
        specs = jax.eval_shape(
            lambda p, t: prefill(p, self.cfg, t, capacity, policy=self.policy)[1],
            self.params, jax.ShapeDtypeStruct((1, prompt_len), jnp.int32))
        args = (self.params, np.zeros((1,), np.int32), np.int32(0), np.int32(0),
                _secret_part(specs))
        return self._program(("decode", prompt_len, capacity, select_now),
                             _decode_fn(self.cfg, self.policy, prompt_len, select_now), args,
                             ("params", "token", "position", "length", "cache"),
                             (SECRET, SECRET, PUBLIC, PUBLIC, SECRET))

    def _cache_length(self, prompt_len: int) -> int:
        """Entries after prefill: the static keep count (public), or the prompt length."""
        keep = self.policy.static_keep(prompt_len) if self.policy is not None else None
        return prompt_len if keep is None else keep

    def generate(self, prompt: Sequence[int], max_new_tokens: int, eos_ids: Sequence[int] = (),
                 on_token: Optional[Callable[[int, Cost], None]] = None) -> PrivateResult:
        check_lengths(self.cfg, len(prompt), max_new_tokens)
        s, capacity = self.session, len(prompt) + max_new_tokens
        s.put("tokens", np.asarray([prompt], np.int32), owner=self.data_owner)
        (tok_ref, _), prefill_cost = s.run(self.prefill_program(len(prompt), capacity),
                                                   ("next", "cache"))
        programs = {}
        length = self._cache_length(len(prompt))
        tokens, costs = [], []
        for step in range(max_new_tokens):
            # only the user learns the token; the others learn whether generation goes on
            token = s.reveal_to(tok_ref, self.data_owner)
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
            (tok_ref, _), cost = s.run(programs[now], ("next", "cache"))
            costs.append(cost)
        return PrivateResult(tokens, prefill_cost, costs)


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
