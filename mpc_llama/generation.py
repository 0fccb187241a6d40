"""Greedy generation in plaintext (jit-compiled once per shape), with an optional policy."""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mpc_llama.config import LlamaConfig
from mpc_llama.errors import ConfigError
from mpc_llama.model import decode_step, device_params, prefill


def check_lengths(cfg: LlamaConfig, prompt_len: int, max_new_tokens: int) -> None:
    """Clear errors for prompts and budgets the model cannot take."""
    if prompt_len < 1:
        raise ConfigError("the prompt is empty")
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if prompt_len + max_new_tokens > cfg.max_seq_len:
        raise ConfigError(f"prompt ({prompt_len} tokens) + {max_new_tokens} new tokens exceed "
                          f"the model context of {cfg.max_seq_len}")


@functools.partial(jax.jit, static_argnums=(1, 3, 4))
def _prefill_last(params, cfg, tokens, capacity, policy):
    return prefill(params, cfg, tokens, capacity, last_only=True, policy=policy)


@functools.partial(jax.jit, static_argnums=(1, 5, 6, 7))
def _decode(params, cfg, token, position, cache, policy, prompt_len, select_now):
    return decode_step(params, cfg, token, position, cache, policy, prompt_len,
                       return_attended=True, select_now=select_now)


@dataclasses.dataclass(frozen=True)
class Generation:
    """tokens: generated ids; attended_fraction: mean over decode steps, layers, KV heads of
    the entries attended divided by the tokens seen so far (None without a decode step)."""

    tokens: List[int]
    attended_fraction: Optional[float]


def greedy_generate(params: dict, cfg: LlamaConfig, prompt: Sequence[int], max_new_tokens: int,
                    eos_ids: Sequence[int] = (),
                    on_token: Optional[Callable[[int], None]] = None,
                    policy=None) -> Generation:
    """Generates up to `max_new_tokens` greedy tokens after `prompt` (stops at an EOS id)."""
    check_lengths(cfg, len(prompt), max_new_tokens)
    params = device_params(params)  # once, not per jitted call
    capacity = len(prompt) + max_new_tokens
    logits, cache = _prefill_last(params, cfg, jnp.asarray([prompt], jnp.int32), capacity,
                                  policy)
    out: List[int] = []
    fractions = []
    for step in range(max_new_tokens):
        token = int(jnp.argmax(logits[0]))
        out.append(token)
        if on_token:
            on_token(token)
        if token in eos_ids or step == max_new_tokens - 1:
            break
        position = len(prompt) + step
        logits, cache, counts = _decode(params, cfg, jnp.asarray([token], jnp.int32), position,
                                        cache, policy, len(prompt),
                                        policy is None or policy.selects_at(step))
        fractions.append(float(np.mean(np.asarray(counts))) / (position + 1))
    return Generation(out, float(np.mean(fractions)) if fractions else None)
