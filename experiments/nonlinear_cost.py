"""MPC cost and plaintext error of the nonlinearity variants, per protocol, at a model's shapes.

    python experiments/nonlinear_cost.py --model llama-2-7b --seq 8192 \
        --protocols aby3,semi2k,cheetah --out results/nonlinear_cost

Each variant is measured as the block a decode step runs (`protocols.blocks`): SiLU as the
"gated" block (silu(gate) * up over the FFN width), the softmax as the oracle's "softmax"
block (its 10% budget of a `--seq` cache, every KV head: no extrapolation), rsqrt as the
"attn_norm" block; "per step" multiplies by how often one decode step runs the block (the
same counts run_spu uses). The error column is the plaintext function's largest absolute
error against the exact one (SiLU on [-60, 60], exp on the softmax's clipped range [-14, 0],
rsqrt on [2^-10, 2^10] relative); SPU adds its fixed-point error on top (see
docs/numerics.md for greedy tokens on SmolLM2).

`--variants softmax_part=max|clip|exp|normalise` measures the clipped softmax's pieces alone
on the same block (where its bytes go); `--protocols aby3:exp_iters=6` runs SPU's exp with 6
squarings instead of 8 (parts only; their error column is then the whole softmax's with
SPU's Taylor exp, (1 + z/2^n)^(2^n), in float).
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.cli import Parser, rows_to_csv, run_main, write_outputs_atomic  # noqa: E402
from mpc_llama.errors import ConfigError  # noqa: E402

FIELDS = {"silu": "gated", "softmax": "softmax", "rsqrt": "attn_norm",
          "softmax_part": "softmax"}
DEFAULT_VARIANTS = "silu=exact|poly|split,softmax=clipped|poly,rsqrt=exact|safe"
# the clipped softmax's pieces, each alone on the oracle softmax block's scores (its mask is
# public: masking is free): where its bytes go
SOFTMAX_PARTS = ("max", "clip", "exp", "normalise")


def softmax_part(name: str):
    """fn(scores) -> (one piece of nonlinear.softmax_clipped,)."""
    import jax.numpy as jnp

    from mpc_llama import nonlinear

    return {
        "max": lambda s: (jnp.max(s, axis=-1, keepdims=True),),
        "clip": lambda s: (jnp.where(s > nonlinear.EXP_CLIP, s, nonlinear.EXP_ZERO),),
        "exp": lambda s: (jnp.exp(s),),
        "normalise": lambda s: (s * (1.0 / jnp.sum(s, axis=-1, keepdims=True)),),
    }[name]


def parse_variants(text: str) -> list:
    """'silu=exact|split,softmax=clipped' -> [("silu", "exact"), ("silu", "split"), ...]."""
    from mpc_llama import nonlinear

    registries = {"silu": nonlinear.SILU, "softmax": nonlinear.SOFTMAX,
                  "rsqrt": nonlinear.RSQRT, "softmax_part": SOFTMAX_PARTS}
    out = []
    for part in [p for p in text.split(",") if p.strip()]:
        field, _, names = part.partition("=")
        field = field.strip()
        if field not in registries:
            raise ConfigError(f"--variants: unknown field {field!r}; choose from "
                              f"{sorted(registries)}")
        for name in [n.strip() for n in names.split("|") if n.strip()]:
            if name not in registries[field]:
                raise ConfigError(f"--variants: unknown {field} {name!r}; choose from "
                                  f"{sorted(registries[field])}")
            out.append((field, name))
    if not out:
        raise ConfigError("--variants is empty")
    return out


def protocol_of(name: str):
    """'cheetah', 'cheetah:exact_mul' (CHEETAH without the last-bit multiplication error) or
    'aby3:exp_iters=6' (SPU's exp with 6 squarings instead of 8; options combine)."""
    import dataclasses

    from protocols.registry import get_protocol

    base, *options = name.split(":")
    protocol = get_protocol(base)
    for option in options:
        key, _, value = option.partition("=")
        if key == "exact_mul" and not value:
            protocol = protocol.without_mul_lsb_error()
        elif key == "exp_iters" and value.isdigit():
            protocol = dataclasses.replace(protocol, exp_iters=int(value))
        else:
            raise ConfigError(f"--protocols: unknown option {option!r} of {base} "
                              "(exact_mul, exp_iters=N)")
    return protocol


def _protocol_label(protocol) -> str:
    label = protocol.name + (" (exact mul)" if protocol.kind == "CHEETAH" and
                             not protocol.mul_lsb_error else "")
    return label + (f" (exp {protocol.exp_iters} squarings)" if protocol.exp_iters else "")


def taylor_exp(z, squarings: int):
    """SPU's Taylor exp (1 + z/2^n)^(2^n) in float, its base clamped at 0."""
    import jax.numpy as jnp

    r = jnp.maximum(1.0 + z / 2.0 ** squarings, 0.0)
    for _ in range(squarings):
        r = r * r
    return r


def plaintext_error(field: str, name: str, exp_iters: int = 0) -> float:
    """Largest absolute error of the variant against the exact function (see the module
    docstring for the ranges; rsqrt: relative). A softmax part's is that of the whole
    clipped softmax with its exp as SPU computes it, (1 + z/2^n)^(2^n), n = `exp_iters`
    (0: the float exp)."""
    import jax.numpy as jnp
    import numpy as np

    from mpc_llama import nonlinear

    if field == "softmax_part":
        z = jnp.linspace(nonlinear.EXP_CLIP, 0.0, 28001)
        x = jnp.stack([jnp.zeros_like(z), z], -1)
        exp = (lambda v: taylor_exp(v, exp_iters)) if exp_iters else jnp.exp
        got = nonlinear._softmax_clipped_with(exp, x, None, -1, None)
        return float(jnp.abs(got - nonlinear.softmax_exact(x)).max())
    if field == "silu":
        x = jnp.linspace(-60.0, 60.0, 240001)
        return float(jnp.abs(nonlinear.SILU[name](x) - nonlinear.silu_exact(x)).max())
    if field == "softmax":
        z = jnp.linspace(nonlinear.EXP_CLIP, 0.0, 28001)
        got = nonlinear.SOFTMAX[name](jnp.stack([jnp.zeros_like(z), z], -1))
        want = nonlinear.softmax_exact(jnp.stack([jnp.zeros_like(z), z], -1))
        return float(jnp.abs(got - want).max())
    x = jnp.asarray(np.geomspace(2.0 ** -10, 2.0 ** 10, 20001), jnp.float32)
    return float((jnp.abs(nonlinear.RSQRT[name](x) * jnp.sqrt(x) - 1.0)).max())


def block_for(cfg, field: str, seq: int, budget: float):
    from eviction import policy_from_spec
    from protocols.blocks import attention_blocks, dense_blocks

    if field in ("softmax", "softmax_part"):
        oracle = policy_from_spec("oracle", budget)
        blocks = attention_blocks(cfg, oracle, seq, cfg.n_kv_heads)
    else:
        blocks = dense_blocks(cfg)
    return next(b for b in blocks if b.name == FIELDS[field])


def part_block(cfg, name: str, seq: int, budget: float):
    """The oracle's softmax block running one piece of the clipped softmax instead."""
    import dataclasses

    block = block_for(cfg, "softmax_part", seq, budget)
    if block.arg_names != ("scores",):
        raise RuntimeError(f"the softmax block's arguments changed: {block.arg_names}")
    return dataclasses.replace(block, name=f"softmax_{name}", fn=softmax_part(name))


def main(argv=None) -> None:
    from mpc_llama import nonlinear
    from mpc_llama.loading import load_config
    from protocols.benchmark import BlockMeter
    from protocols.private_generation import spu_config

    p = Parser(description=__doc__)
    p.add_argument("--model", default="llama-2-7b", help="preset, .gguf file or HF directory")
    p.add_argument("--seq", type=int, default=8192, help="cache length of the softmax block")
    p.add_argument("--budget", type=float, default=0.1, help="the oracle's attended fraction")
    p.add_argument("--protocols", default="aby3,semi2k,cheetah",
                   help="comma list; cheetah:exact_mul: CHEETAH without the last-bit error")
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help="function=variant|variant,... (names in mpc_llama.nonlinear)")
    p.add_argument("--block-cache", default="runs/block_cache",
                   help="measurement cache directory ('' for none)")
    p.add_argument("--out", help="directory for results.json and results.csv")
    args = p.parse_args(argv)
    if args.seq < 64:
        raise ConfigError("--seq must be >= 64")
    if not 0.0 < args.budget <= 1.0:
        raise ConfigError(f"--budget must be in (0, 1], got {args.budget}")
    variants = parse_variants(args.variants)
    protocols = [protocol_of(n.strip()) for n in args.protocols.split(",") if n.strip()]
    if not protocols:
        raise ConfigError("--protocols is empty")
    if any(p.exp_iters for p in protocols) and any(f != "softmax_part" for f, _ in variants):
        raise ConfigError("--protocols with exp_iters measure softmax_part variants only (the "
                          "clipped softmax's dropped entries need SPU's 8 squarings)")
    base = spu_config(load_config(args.model))
    rows, jobs, t_start = [], [(pr, v) for pr in protocols for v in variants], time.time()
    for i, (protocol, (field, name)) in enumerate(jobs):
        meter = BlockMeter(protocol, args.block_cache or None)
        if field == "softmax_part":
            block, default = part_block(base, name, args.seq, args.budget), False
        else:
            block = block_for(base.replace(**{field: name}), field, args.seq, args.budget)
            default = getattr(base, field) == name and not protocol.exp_iters
        c = meter.measure(block)
        error = plaintext_error(field, name, protocol.exp_iters or nonlinear.EXP_TAYLOR_ITERS)
        rows.append({"protocol": _protocol_label(protocol), "field": field, "variant": name,
                     "default": default, "block": block.name,
                     "count_per_step": block.count, "elements": _elements(block),
                     "bytes": c.total_bytes, "sends": max(c.sends),
                     "refill_sends": max(c.refills),
                     "bytes_per_step": c.total_bytes * block.count,
                     "sends_per_step": max(c.sends) * block.count,
                     "plaintext_max_error": error})
        done = i + 1
        eta = (time.time() - t_start) / done * (len(jobs) - done)
        print(f"[{done}/{len(jobs)}] {protocol.name} {field}={name}: "
              f"{c.total_bytes / 1e6:.2f} MB, {max(c.sends):.0f} sends "
              f"(ETA {eta:.0f} s)", file=sys.stderr, flush=True)
    _add_ratios(rows)
    print(markdown(rows))
    if args.out:
        import json

        payload = {"command": "python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:])),
                   "model": args.model, "seq": args.seq, "budget": args.budget, "rows": rows}

        def fill(tmp):
            (tmp / "results.json").write_text(json.dumps(payload, indent=1))
            (tmp / "results.csv").write_text(rows_to_csv(rows))
        write_outputs_atomic(args.out, fill)
        print(f"wrote {args.out}/results.json, results.csv", file=sys.stderr)


def _elements(block) -> int:
    import math

    return math.prod(block.args[0].shape)  # gate, scores or x: the function's input


def _add_ratios(rows) -> None:
    """bytes_vs_default: this variant's bytes over the default variant's (same protocol and
    function; 2.0 = twice the default's bytes); None when the default was not measured."""
    ref = {(r["protocol"], r["field"]): r["bytes"] for r in rows if r["default"]}
    for r in rows:
        d = ref.get((r["protocol"], r["field"]))
        r["bytes_vs_default"] = r["bytes"] / d if d else None


def markdown(rows) -> str:
    lines = ["| protocol | function | variant | MB per block | sends (of them refill) | "
             "GB per step | bytes vs default | plaintext max error |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "-" if r["bytes_vs_default"] is None else f"{r['bytes_vs_default']:.2f}x"
        name = r["variant"] + (" (default)" if r["default"] else "")
        lines.append(f"| {r['protocol']} | {r['field']} | {name} | {r['bytes'] / 1e6:.2f} | "
                     f"{r['sends']:.0f} ({r['refill_sends']:.0f}) | "
                     f"{r['bytes_per_step'] / 1e9:.3f} | {ratio} | "
                     f"{r['plaintext_max_error']:.1e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    run_main(main)
