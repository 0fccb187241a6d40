"""SnapKV (Li et al. 2024): observation-window attention, max-pooled, per-head top-k."""

from __future__ import annotations

import dataclasses

import numpy as np

from eviction.base import Policy
from eviction.static_scores import max_pool
from mpc_llama.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class SnapKV(Policy):
    name = "snapkv"
    budget: float = 0.1
    window: int = 32
    kernel: int = 7

    def __post_init__(self):
        super().__post_init__()
        if self.window < 1 or self.kernel < 1:
            raise ConfigError("window and kernel must be >= 1")

    def static_keep(self, prompt_len):
        return self.n_attend(prompt_len)

    def static_forced(self, prompt_len):
        w = min(self.window, self.static_keep(prompt_len))
        return np.arange(prompt_len) >= prompt_len - w

    def prompt_attention(self, prompt_len):
        return self.window, "sum"

    def static_rank(self, attn, cfg):
        return max_pool(attn, self.kernel)
