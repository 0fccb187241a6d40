"""Where fixed-point error enters: per-layer hidden states under SPU vs plaintext.

    python experiments/spu_precision.py --model smollm2 --field FM64
    python experiments/spu_precision.py --model smollm2 --field FM128 --fxp-bits 30

Runs the prompt through the model on SPU (ABY3 by default: cheapest matmuls), reveals the
residual stream after every layer and prints the max |activation|, the max absolute error and
the relative L2 error per layer. Useful for models with massive activations (SmolLM2 carries
~2.2e4 in one channel from layer 11 on).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.cli import Parser, run_main, write_json_atomic  # noqa: E402


def main() -> None:
    p = Parser(description=__doc__)
    p.add_argument("--model", default="smollm2", help="'smollm2', a .gguf file or HF directory")
    p.add_argument("--protocol", default="aby3", help="cheetah | semi2k | aby3")
    p.add_argument("--field", default="FM64", help="SPU ring: FM64 or FM128")
    p.add_argument("--fxp-bits", type=int, default=0,
                   help="fixed-point fraction bits (0: SPU default)")
    p.add_argument("--prompt-ids", default="504,3575,282,4649,314",
                   help="prompt token ids (comma list)")
    for field in ("silu", "softmax", "rsqrt"):
        p.add_argument(f"--{field}", help=f"{field} variant (mpc_llama.nonlinear; default: "
                                          "the model config's)")
    p.add_argument("--json", help="write per-layer errors here")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from experiments.generate import parse_ids
    from mpc_llama import model as M
    from mpc_llama.loading import load_model
    from protocols.private_generation import spu_config
    from protocols.registry import get_protocol
    from protocols.session import SpuSession

    protocol = get_protocol(args.protocol).with_numerics(args.field, args.fxp_bits)
    ids = parse_ids(args.prompt_ids)
    loaded = load_model(args.model, with_tokenizer=False)
    cfg = spu_config(loaded.cfg).replace(**{f: getattr(args, f) for f in
                                            ("silu", "softmax", "rsqrt") if getattr(args, f)})

    def hidden(params, tokens):
        t = tokens.shape[1]
        positions, causal = jnp.arange(t), jnp.tril(jnp.ones((t, t), bool))
        x, xs = M.embed(params, tokens, cfg), []
        for i in range(cfg.n_layers):
            lp = M._layer_params(params, i)
            q, k, v = M._qkv(lp, M.rms_norm(x, lp["attn_norm"], cfg), positions, cfg)
            x = x + M.attend(q, k, v, causal, cfg) @ lp["wo"]
            x = x + M.mlp(lp, M.rms_norm(x, lp["mlp_norm"], cfg), cfg)
            xs.append(x)
        return (jnp.stack(xs),)

    tokens = np.asarray([ids], np.int32)
    ref = np.asarray(jax.jit(hidden)(jax.tree_util.tree_map(jnp.asarray, loaded.params),
                                     tokens)[0])
    print(f"running {cfg.n_layers} layers on SPU {protocol.name} {protocol.field} "
          f"fxp_bits={protocol.fxp_fraction_bits or 'default'} ...", file=sys.stderr)
    session = SpuSession(protocol)
    prog = session.compile(hidden, (loaded.params, tokens), ("params", "tokens"))
    session.put("params", loaded.params, owner=0)
    session.put("tokens", tokens, owner=1)
    (out,), _ = session.run(prog, ("hidden",))
    got = np.asarray(session.reveal(out))
    rows = []
    print(f"{'layer':>5} {'max|x|':>10} {'max err':>10} {'rel L2 err':>10}")
    for i in range(cfg.n_layers):
        row = {"layer": i, "max_abs": float(np.abs(ref[i]).max()),
               "max_err": float(np.abs(got[i] - ref[i]).max()),
               "rel_err": float(np.linalg.norm(got[i] - ref[i]) / np.linalg.norm(ref[i]))}
        rows.append(row)
        print(f"{i:>5} {row['max_abs']:>10.1f} {row['max_err']:>10.4f} {row['rel_err']:>10.4f}")
    if args.json:
        write_json_atomic(args.json, {"protocol": protocol.name, "field": protocol.field,
                                      "silu": cfg.silu, "softmax": cfg.softmax,
                                      "rsqrt": cfg.rsqrt,
                                      "fxp_fraction_bits": protocol.fxp_fraction_bits,
                                      "prompt_ids": ids, "rows": rows})


if __name__ == "__main__":
    run_main(main)
