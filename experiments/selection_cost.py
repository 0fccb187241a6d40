"""MPC cost of one layer's dynamic selection (the "select" block of run_spu) per policy spec:
prices a change to the selection alone, without the dense blocks a whole decode step needs.

    python experiments/selection_cost.py --model smollm2 --protocol aby3 --seq 8192 \
        --policies mpcache,mpcache:neighbors=1,mpcache:neighbors=1:neighbor_tops=1 \
        --out results/select_cost_8192

Every KV head of the model is measured (no extrapolation); the block is one layer's
selection for one decode step (run_spu counts it once per selecting layer)."""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.cli import Parser, run_main, write_json_atomic  # noqa: E402


def main(argv=None):
    from eviction import policy_from_spec
    from mpc_llama.loading import load_config
    from protocols.benchmark import BlockMeter
    from protocols.blocks import attention_blocks
    from protocols.private_generation import spu_config
    from protocols.registry import get_protocol

    p = Parser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--protocol", default="aby3")
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--policies", default="mpcache,mpcache:neighbors=1")
    p.add_argument("--block-cache", default="runs/block_cache")
    p.add_argument("--out")
    args = p.parse_args(argv)
    cfg = spu_config(load_config(args.model))
    meter = BlockMeter(get_protocol(args.protocol), args.block_cache or None)
    rows = []
    for spec in [s for s in args.policies.split(",") if s]:
        policy = policy_from_spec(spec, args.budget)
        block = next(b for b in attention_blocks(cfg, policy, args.seq, cfg.n_kv_heads)
                     if b.name == "select")
        t0 = time.perf_counter()
        c = meter.measure(block)
        rows.append({"policy": spec, "seq": args.seq, "budget": args.budget,
                     "kv_heads": cfg.n_kv_heads, "bytes": c.total_bytes,
                     "sends": max(c.sends), "simulated_s": c.seconds,
                     "wall_s": time.perf_counter() - t0})
        print(f"{spec:<45} bytes {c.total_bytes:>14,.0f}  sends {max(c.sends):>6.0f}",
              file=sys.stderr)
    if args.out:
        write_json_atomic(os.path.join(args.out, "results.json"),
                          {"command": "python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:])),
                           "model": args.model, "protocol": args.protocol, "rows": rows})


if __name__ == "__main__":
    run_main(main)
