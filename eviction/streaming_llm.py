"""StreamingLLM (Xiao et al. 2023): attention sinks plus a recent window; no scores at all."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from eviction.base import Policy
from mpc_llama.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class StreamingLLM(Policy):
    name = "streaming_llm"
    budget: float = 0.1
    sink: int = 4

    def __post_init__(self):
        super().__post_init__()
        if self.sink < 0:
            raise ConfigError(f"sink must be >= 0, got {self.sink}")

    def static_keep(self, prompt_len):
        return self.n_attend(prompt_len)

    def static_forced(self, prompt_len):
        keep = self.static_keep(prompt_len)
        sink = min(self.sink, keep)
        pos = np.arange(prompt_len)
        return (pos < sink) | (pos >= prompt_len - (keep - sink))

    def static_scores(self, q, k, cfg, attn=None):
        return jnp.zeros(k.shape[:3], k.dtype)  # everything kept is forced
