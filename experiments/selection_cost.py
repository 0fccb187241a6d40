"""MPC cost of one layer's dynamic selection (the "select" block of run_spu) per policy spec:
prices a change to the selection alone, without the dense blocks a whole decode step needs.

    python experiments/selection_cost.py --model smollm2 --protocol aby3 --seq 8192 \
        --policies mpcache,mpcache:neighbors=1,mpcache:neighbors=1:neighbor_tops=1 \
        --out results/select_cost_8192

Every KV head of the model is measured (no extrapolation); the block is one layer's
selection for one decode step (run_spu counts it once per selecting layer).

--parts (MPCache with score2=exact and refresh=1) also measures the block's stages on their own, where
the message rounds go: the cluster max over the step's scores, the search's min/max tree,
the whole top-k (tree included), and the one-hot compaction matrix from a cluster mask (its
input a 0/1 share compared with 0.5: one comparison more than in the block)."""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.cli import Parser, run_main, write_json_atomic  # noqa: E402


def main(argv=None):
    from eviction import policy_from_spec
    from eviction.compaction import for_protocol
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
    p.add_argument("--parts", action="store_true",
                   help="also measure the stages of MPCache's exact-ranking selection")
    p.add_argument("--out")
    args = p.parse_args(argv)
    cfg = spu_config(load_config(args.model))
    protocol = get_protocol(args.protocol)
    meter = BlockMeter(protocol, args.block_cache or None)
    rows = []
    for spec in [s for s in args.policies.split(",") if s]:
        policy = for_protocol(policy_from_spec(spec, args.budget), protocol.kind)
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
        for part in (selection_parts(cfg, policy, args.seq) if args.parts else []):
            c = meter.measure(part)
            rows.append({"policy": spec, "part": part.name, "seq": args.seq,
                         "budget": args.budget, "kv_heads": cfg.n_kv_heads,
                         "bytes": c.total_bytes, "sends": max(c.sends),
                         "simulated_s": c.seconds})
            print(f"  {part.name:<43} bytes {c.total_bytes:>14,.0f}  sends "
                  f"{max(c.sends):>6.0f}", file=sys.stderr)
    if args.out:
        write_json_atomic(os.path.join(args.out, "results.json"),
                          {"command": "python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:])),
                           "model": args.model, "protocol": args.protocol, "rows": rows})


def selection_parts(cfg, policy, seq: int):
    """The stages of MPCache's exact-ranking selection as blocks, at every KV head: inputs
    as the select block gets them (the step's scores [1, k, g, 1, cap])."""
    import jax.numpy as jnp

    from eviction.base import BIG, topk_mask
    from eviction.clusters import cluster_candidates
    from eviction.compaction import compaction_matrix, onehot_form
    from eviction.slices import candidates
    from mpc_llama.errors import ConfigError
    from protocols.blocks import _block, _spec, retained

    if getattr(policy, "score2", None) != "exact":
        raise ConfigError(f"--parts measures MPCache's exact ranking; {policy.name} has "
                          f"score2={getattr(policy, 'score2', None)!r}")
    if getattr(policy, "refresh", 1) != 1:
        raise ConfigError("--parts measures the every-step selection: give the policy "
                          "refresh=1 (e.g. mpcache:refresh=1)")
    heads, g = cfg.n_kv_heads, cfg.group_size
    length, cap = retained(policy, seq)
    n = cap // policy.s2
    spans = policy.spans(seq)
    if spans is None:
        allowed, _ = cluster_candidates(jnp.asarray(length), n, policy.s2, policy.recent)
    else:
        allowed = candidates(jnp.asarray(length), n, policy.s2, spans)
    slots = policy.free_slots(seq)
    total = policy.k2(seq) if spans is None else slots   # the one-hot's rows

    def cluster_max(s):
        return (policy.exact_score(None, None, s[:, :, :, 0]),)

    def tree(c):
        m = jnp.where(allowed, c, -BIG)
        return (jnp.max(jnp.stack([m, jnp.where(allowed, -c, -BIG)]), axis=-1),)

    def topk(c):
        return (topk_mask(c, slots, allowed, policy.selector),)

    def onehot(m):
        return (compaction_matrix(m > 0.5, total, onehot_form(policy)).astype(
            jnp.float32),)

    scores, clusters = _spec((1, heads, g, 1, cap)), _spec((1, heads, n))
    return [_block("cluster max", "selection", cluster_max, {"scores": scores}),
            _block("min/max tree", "selection", tree, {"clusters": clusters}),
            _block(f"top-k ({policy.selector}, tree included)", "selection", topk,
                   {"clusters": clusters}),
            _block("one-hot compaction", "selection", onehot, {"mask": clusters})]


if __name__ == "__main__":
    run_main(main)
