"""The explicit, fixed-capacity KV cache pytree.

Shapes (L layers, B batch, K key/value heads, C capacity, D head dim):
    k, v:  [L, B, K, C, D]  keys after RoPE, values
    pos:   [L, B, K, C]     int32 original token position of each entry, -1 where empty
    length: []              int32, entries filled (the same for every layer and head)
    bounds: None, or (rmax2, rmin2, rmax1, rmin1, khat2, khat1), each [L, B, K, C/s, D]:
            per-cluster key bounds for query-aware selection (see eviction.clusters)

Entries [0, length) are valid. Keys are stored post-RoPE, so an entry keeps its meaning when
eviction compacts the cache; `pos` records where it came from. Under SPU `k`, `v` and `pos`
are secret (they reveal which tokens were kept), while `length` is public: it depends only
on public lengths and settings.
"""

from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from mpc_llama.config import LlamaConfig


@flax.struct.dataclass
class KVCache:
    k: jax.Array
    v: jax.Array
    pos: jax.Array
    length: jax.Array
    bounds: Optional[tuple] = None

    @property
    def capacity(self) -> int:
        return self.k.shape[3]


def init_cache(cfg: LlamaConfig, batch: int, capacity: int, dtype=jnp.float32) -> KVCache:
    """An empty cache of `capacity` entries per layer and KV head."""
    shape = (cfg.n_layers, batch, cfg.n_kv_heads, capacity, cfg.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   pos=jnp.full(shape[:-1], -1, jnp.int32), length=jnp.zeros((), jnp.int32))


def write_layer(cache_k: jax.Array, cache_v: jax.Array, cache_pos: jax.Array, start,
                k: jax.Array, v: jax.Array, positions: jax.Array):
    """Writes T new entries of one layer at index `start` (public).

    cache_k/v: [B, K, C, D]; cache_pos: [B, K, C]; k/v: [B, K, T, D];
    positions: [T] or [B, K, T] int32.
    """
    b, kh, t, _ = k.shape
    cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, 0, start, 0))
    cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, 0, start, 0))
    pos = jnp.broadcast_to(positions.astype(jnp.int32), (b, kh, t))
    cache_pos = jax.lax.dynamic_update_slice(cache_pos, pos, (0, 0, start))
    return cache_k, cache_v, cache_pos
