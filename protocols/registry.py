"""SPU protocols as data: each converts itself to a `libspu.RuntimeConfig`."""

from __future__ import annotations

import dataclasses

from mpc_llama.errors import ConfigError

_WORLD_SIZES = {"SEMI2K": (2, 3, 4), "CHEETAH": (2,), "ABY3": (3,)}
_FIELDS = ("FM64", "FM128")


@dataclasses.dataclass(frozen=True)
class Protocol:
    """An SPU protocol setting.

    kind: SPU ProtocolKind name; world_size: parties; field: ring; fxp_fraction_bits: fixed
    point precision (0 = SPU's default for the field, 18 for FM64); colocated: SPU's
    colocation optimisation, which keeps an owner's input private to it and computes on it
    locally (cheaper secret x private matmuls under CHEETAH); beaver_cache: SEMI2K's Beaver
    cache for fixed operands (the model owner's weights, KV rows once written): their masked
    opening is kept by the party runtimes and reused by every later multiplication, so they
    are opened once per session (weights) or once per prompt (cache rows) instead of at every
    use (see protocols.session); mul_lsb_error: CHEETAH's multiplication with an error in the
    last bit (`cheetah_2pc_config.enable_mul_lsb_error`, one ulp, 2^-18 on FM64): a product
    of 4,096 secret-shared elements sends ~20% fewer bytes (steady runs, tests/test_spu.py);
    exp_iters: SPU's `fxp_exp_iters`, the squarings of its Taylor exp (1 + x/2^n)^(2^n)
    (0 = SPU's default, 8). A measured setting (experiments/nonlinear_cost.py), not a default:
    fewer squarings change the function, and the clipped softmax sends its dropped entries
    to exp at -2^8 (`nonlinear.EXP_ZERO`), which is 0 only with 8.
    """

    name: str
    kind: str
    world_size: int
    field: str = "FM64"
    fxp_fraction_bits: int = 0
    description: str = ""
    colocated: bool = True
    beaver_cache: bool = False
    mul_lsb_error: bool = False
    exp_iters: int = 0

    def __post_init__(self):
        if self.kind not in _WORLD_SIZES:
            raise ConfigError(f"unknown SPU protocol kind {self.kind!r}")
        if self.world_size not in _WORLD_SIZES[self.kind]:
            raise ConfigError(f"{self.kind} cannot run with {self.world_size} parties "
                              f"(allowed: {_WORLD_SIZES[self.kind]})")
        if self.field not in _FIELDS:
            raise ConfigError(f"unknown field {self.field!r}; choose from {_FIELDS}")
        if self.beaver_cache and self.kind != "SEMI2K":
            raise ConfigError(f"the Beaver cache is SEMI2K's; {self.kind} has none")
        if self.mul_lsb_error and self.kind != "CHEETAH":
            raise ConfigError(f"mul_lsb_error is a CHEETAH setting; {self.kind} has none")
        if not 0 <= self.exp_iters <= 31:
            raise ConfigError(f"exp_iters must be in [0, 31] (0: SPU's default), "
                              f"got {self.exp_iters}")
        max_bits = 62 if self.field == "FM128" else 30
        if not 0 <= self.fxp_fraction_bits <= max_bits:
            raise ConfigError(f"fxp_fraction_bits must be in [0, {max_bits}] for {self.field}, "
                              f"got {self.fxp_fraction_bits}")

    def with_numerics(self, field: str = None, fxp_fraction_bits: int = None) -> "Protocol":
        """The same protocol on another ring / fixed-point precision (validated)."""
        return dataclasses.replace(
            self, field=field or self.field,
            fxp_fraction_bits=self.fxp_fraction_bits if fxp_fraction_bits is None
            else fxp_fraction_bits)

    def without_beaver_cache(self) -> "Protocol":
        """The same protocol with every operand opened at every use."""
        return dataclasses.replace(self, beaver_cache=False)

    def without_mul_lsb_error(self) -> "Protocol":
        """The same protocol with exact multiplications (CHEETAH)."""
        return dataclasses.replace(self, mul_lsb_error=False)

    def cache_key(self) -> dict:
        """The setting as a dict for measurement caches: a field at its default is left out,
        so measurements taken before the field existed keep their key (and meaning)."""
        d = dataclasses.asdict(self)
        for flag in ("beaver_cache", "mul_lsb_error", "exp_iters"):
            if not d[flag]:
                del d[flag]
        return d

    def runtime_config(self, profile: bool = False):
        """The SPU RuntimeConfig; `profile` turns on the per-op and link counters."""
        from spu import libspu

        cfg = libspu.RuntimeConfig(protocol=getattr(libspu.ProtocolKind, self.kind),
                                   field=getattr(libspu.FieldType, self.field))
        if self.fxp_fraction_bits:
            cfg.fxp_fraction_bits = self.fxp_fraction_bits
        # Weights shared by their owner let CHEETAH use secret x private matmuls.
        cfg.experimental_enable_colocated_optimization = self.colocated
        cfg.enable_pphlo_profile = profile
        if self.mul_lsb_error:
            cfg.cheetah_2pc_config.enable_mul_lsb_error = True
        if self.exp_iters:
            cfg.fxp_exp_iters = self.exp_iters
        return cfg


PROTOCOLS = {
    # Colocation only where it pays: measured on SmolLM2 (2-token prompt, 2 tokens), ABY3's
    # model owner sent 5.34 GB with it and 0.16 GB without (it re-shares private weights at
    # every use); SEMI2K's bytes did not change (2.75 vs 2.76 GB per party).
    # The Beaver cache on by default: weights are fixed for the whole session and a prompt's
    # KV rows for its whole generation (measured at 8192 tokens, 7B shapes: see README).
    "semi2k": Protocol("semi2k", "SEMI2K", 2, colocated=False, beaver_cache=True,
                       description="2PC additive shares, Beaver triples from a trusted dealer "
                                   "(offline cost not counted)"),
    # The last-bit multiplication error on by default: one ulp per product, 20-25% of the
    # bytes of SiLU and softmax blocks (measured at 7B shapes: docs/numerics.md).
    "cheetah": Protocol("cheetah", "CHEETAH", 2, mul_lsb_error=True,
                        description="2PC, HE matmuls + silent OT, no dealer"),
    "aby3": Protocol("aby3", "ABY3", 3, colocated=False,
                     description="3PC replicated secret sharing, honest majority"),
}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {name!r}; choose from {sorted(PROTOCOLS)}")
    return PROTOCOLS[name]
