"""Greedy generation in plaintext (jit-compiled once per shape)."""

from __future__ import annotations

import functools
from typing import Callable, List, Optional, Sequence

import jax
import jax.numpy as jnp

from mpc_llama.config import LlamaConfig
from mpc_llama.errors import ConfigError
from mpc_llama.model import decode_step, prefill


def check_lengths(cfg: LlamaConfig, prompt_len: int, max_new_tokens: int) -> None:
    """Clear errors for prompts and budgets the model cannot take."""
    if prompt_len < 1:
        raise ConfigError("the prompt is empty")
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if prompt_len + max_new_tokens > cfg.max_seq_len:
        raise ConfigError(f"prompt ({prompt_len} tokens) + {max_new_tokens} new tokens exceed "
                          f"the model context of {cfg.max_seq_len}")


@functools.partial(jax.jit, static_argnums=(1, 3))
def _prefill_last(params, cfg, tokens, capacity):
    return prefill(params, cfg, tokens, capacity, last_only=True)


_decode = jax.jit(decode_step, static_argnums=(1,))


def greedy_generate(params: dict, cfg: LlamaConfig, prompt: Sequence[int], max_new_tokens: int,
                    eos_ids: Sequence[int] = (),
                    on_token: Optional[Callable[[int], None]] = None) -> List[int]:
    """Generates up to `max_new_tokens` greedy tokens after `prompt` (stops at an EOS id)."""
    check_lengths(cfg, len(prompt), max_new_tokens)
    capacity = len(prompt) + max_new_tokens
    logits, cache = _prefill_last(params, cfg, jnp.asarray([prompt], jnp.int32), capacity)
    out: List[int] = []
    for step in range(max_new_tokens):
        token = int(jnp.argmax(logits[0]))
        out.append(token)
        if on_token:
            on_token(token)
        if token in eos_ids or step == max_new_tokens - 1:
            break
        logits, cache = _decode(params, cfg, jnp.asarray([token], jnp.int32),
                                len(prompt) + step, cache)
    return out
