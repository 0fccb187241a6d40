"""Layer-wise index sharing patterns: which layer's selection each layer reuses."""

from __future__ import annotations

from mpc_llama.errors import ConfigError

PATTERNS = ("none", "pairs")


def share_source(pattern: str, layer: int, n_layers: int, own_first: int = 2,
                 own_last: int = 2) -> int:
    """"pairs": layers [0, own_first) and the last `own_last` select for themselves; between
    them each even layer selects and the next odd layer reuses it. "none": every layer selects.
    """
    if pattern not in PATTERNS:
        raise ConfigError(f"unknown sharing pattern {pattern!r}; choose from {PATTERNS}")
    if pattern == "none" or layer < own_first or layer >= n_layers - own_last:
        return layer
    if layer % 2 == 1 and layer - 1 >= own_first:
        return layer - 1
    return layer
