"""Model configuration: one frozen dataclass and named presets.

The MPC-friendly nonlinearities are fields chosen by name (see `mpc_llama.nonlinear`), so the
very same function runs in plaintext under `jax.jit` and secret-shared under SPU.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from mpc_llama.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """LLaMA-3.1 style frequency-dependent RoPE scaling ("rope_type": "llama3")."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shapes and numerics of a LLaMA-family decoder.

    Attributes:
      vocab_size, d_model, n_layers: usual meaning.
      n_heads: query heads N; n_kv_heads: key/value heads K (grouped-query attention, N = K*G).
      head_dim: D; ffn_dim: hidden width F of the SwiGLU MLP.
      rope_base: RoPE theta; rope_scaling: optional LLaMA-3.1 scaling.
      norm_eps: RMSNorm epsilon; tie_embeddings: LM head reuses the embedding matrix.
      max_seq_len: the model's context length (prompts + generation must fit).
      softmax, silu, rsqrt: names in `mpc_llama.nonlinear` registries.
      embedding: "gather" (index the table) or "onehot" (one-hot matmul; cheap under MPC,
        identical result).
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    rope_base: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    max_seq_len: int = 4096
    softmax: str = "exact"
    silu: str = "split"
    rsqrt: str = "exact"
    embedding: str = "gather"

    def __post_init__(self):
        from mpc_llama import nonlinear  # local import: nonlinear does not need the config

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "ffn_dim", "max_seq_len"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        for field, registry in (("softmax", nonlinear.SOFTMAX), ("silu", nonlinear.SILU),
                                ("rsqrt", nonlinear.RSQRT)):
            if getattr(self, field) not in registry:
                raise ConfigError(f"unknown {field} {getattr(self, field)!r}; "
                                  f"choose from {sorted(registry)}")
        if self.embedding not in ("gather", "onehot"):
            raise ConfigError(f"unknown embedding {self.embedding!r}; choose gather or onehot")

    @property
    def group_size(self) -> int:
        """G: query heads per key/value head."""
        return self.n_heads // self.n_kv_heads

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)


PRESETS = {
    # One block, GQA, untied: small enough for CHEETAH unit tests.
    "tiny": LlamaConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2,
                        head_dim=4, ffn_dim=32, rope_base=500.0, max_seq_len=128),
    "smollm2-135m": LlamaConfig(vocab_size=49152, d_model=576, n_layers=30, n_heads=9,
                                n_kv_heads=3, head_dim=64, ffn_dim=1536, rope_base=100000.0,
                                tie_embeddings=True, max_seq_len=8192),
    "llama-2-7b": LlamaConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32,
                              n_kv_heads=32, head_dim=128, ffn_dim=11008, rope_base=10000.0,
                              max_seq_len=4096),
    "llama-3.1-8b": LlamaConfig(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32,
                                n_kv_heads=8, head_dim=128, ffn_dim=14336, rope_base=500000.0,
                                rope_scaling=RopeScaling(), max_seq_len=131072),
}


def preset(name: str) -> LlamaConfig:
    """Returns the named preset, with a clear error for unknown names."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]
