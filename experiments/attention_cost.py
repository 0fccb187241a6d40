"""Measured cost of ONE decode-step attention block (one layer) per policy under SPU.

    python experiments/attention_cost.py --protocol aby3 --seq 1024 --policies full,mpcache,oracle
    python experiments/attention_cost.py --protocol semi2k --seq 1024,2048 --heads 4 --json runs/attn.json

The block is `eviction.attention.decode_attention` (selection + attention, the
code every decode step runs) on a cache of --seq retained entries, for --heads KV heads of
dimension --head-dim (sampled heads: multiply by n_heads / heads for a whole layer; printed).
Policies with a static step are measured at their retained size (static_keep(seq)); `oracle`
is measured as attention over exactly its budget with selection left out (free selection,
the cost floor). Latency is PROJECTED from the measured counters with protocols.network.
This is the measured building block of the whole-model benchmark (run_spu.py, open issue).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.cli import Parser, run_main, write_json_atomic  # noqa: E402
from mpc_llama.errors import ConfigError  # noqa: E402


def block_inputs(policy, seq: int, heads: int, dim: int, seed: int = 0):
    """(fn, args, names): the attention block compiled for SPU, with random inputs (cost does
    not depend on values)."""
    import jax.numpy as jnp
    import numpy as np

    from eviction.clusters import init_bounds
    from mpc_llama.config import LlamaConfig
    from eviction.attention import decode_attention

    cfg = LlamaConfig(vocab_size=8, d_model=heads * dim, n_layers=1, n_heads=heads,
                      n_kv_heads=heads, head_dim=dim, ffn_dim=8, max_seq_len=1 << 20)
    rng = np.random.default_rng(seed)
    static = policy.static_keep(seq) if policy is not None else None
    entries = static if static is not None else seq
    if policy is not None and policy.name == "oracle":
        entries, policy = policy.n_attend(seq), None  # free selection: attend its budget only
    cap = entries
    if policy is not None and policy.needs_bounds:
        cap = -(-entries // policy.cluster_sizes[0]) * policy.cluster_sizes[0]
    q = rng.normal(size=(1, 1, heads, dim)).astype(np.float32)
    k = rng.normal(size=(1, heads, cap, dim)).astype(np.float32)
    v = rng.normal(size=(1, heads, cap, dim)).astype(np.float32)
    bounds = None
    if policy is not None and policy.needs_bounds:
        bounds = tuple(np.asarray(b) for b in init_bounds(jnp.asarray(k), entries,
                                                          *policy.cluster_sizes,
                                                          policy.bounds_alpha))

    def fn(q, k, v, bounds):
        out, _, _ = decode_attention(q, k, v, bounds, jnp.asarray(entries), policy, seq, cfg)
        return (out,)

    return fn, (q, k, v, bounds), ("q", "k", "v", "bounds"), entries


def measure(protocol, policy, seq, heads, dim):
    """Cost with every party's counters (one run; see protocols.session.SpuSession)."""
    from protocols.session import SpuSession

    fn, args, names, entries = block_inputs(policy, seq, heads, dim)
    session = SpuSession(protocol)
    if protocol.kind == "CHEETAH":
        session.warm_up()
    prog = session.compile(fn, args, names)
    for n, a in zip(names, args):
        if a is not None:
            session.put(n, a)
    (_,), cost = session.run(prog, ("out",))
    return cost, entries


def main() -> None:
    p = Parser(description=__doc__)
    p.add_argument("--protocol", default="aby3", help="cheetah | semi2k | aby3")
    p.add_argument("--seq", default="1024", help="comma list of retained cache lengths")
    p.add_argument("--policies", default="full,mpcache,oracle",
                   help="comma list; settings as name:field=value, e.g. mpcache:s2=16")
    p.add_argument("--budget", type=float, default=0.1, help="attended fraction of the cache")
    p.add_argument("--selector", help="top-k method for every policy: search or topk "
                   "(default: each policy's own)")
    p.add_argument("--heads", type=int, default=4, help="KV heads measured (sampled)")
    p.add_argument("--head-dim", type=int, default=128, help="dimension of one head")
    p.add_argument("--model-heads", type=int, default=32, help="heads of the real layer")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()

    from tqdm import tqdm

    from eviction import policy_from_spec
    from protocols.network import PROFILES, projected_seconds
    from protocols.registry import get_protocol

    protocol = get_protocol(args.protocol)
    try:
        seqs = [int(s) for s in args.seq.split(",")]
    except ValueError:
        raise ConfigError(f"--seq must be comma-separated integers, got {args.seq!r}") from None
    if any(s < 64 for s in seqs):
        raise ConfigError("--seq values must be >= 64")
    names = [n.strip() for n in args.policies.split(",") if n.strip()]
    extra = f":selector={args.selector}" if args.selector else ""
    policies = {n: (None if n == "full" else policy_from_spec(n + extra, args.budget))
                for n in names}
    rows = []
    jobs = [(s, n) for s in seqs for n in names]
    for seq, name in tqdm(jobs, desc="measuring blocks", unit="block", file=sys.stderr):
        cost, entries = measure(protocol, policies[name], seq, args.heads, args.head_dim)
        scale = args.model_heads / args.heads
        row = {"policy": name, "protocol": protocol.name, "seq": seq, "entries": entries,
               "selector": None if policies[name] is None else policies[name].selector,
               "heads_measured": args.heads, "head_dim": args.head_dim,
               "bytes_sent": cost.bytes_sent, "sends": cost.sends, "compute_s": cost.seconds,
               "latency_s_projected": {
                   net: projected_seconds(cost.seconds, cost.bytes_sent, cost.sends,
                                          PROFILES[net], protocol.kind)
                   for net in ("lan", "wan")},
               "layer_bytes_extrapolated": int(sum(cost.bytes_sent) * scale),
               "extrapolation": f"bytes x {scale:g} ({args.model_heads} heads / "
                                f"{args.heads} measured); sends are per block, not scaled"}
        rows.append(row)
    full = {r["seq"]: r for r in rows if r["policy"] == "full"}
    print(f"{'policy':<12}{'seq':>7}{'entries':>8}{'MB sent (all)':>14}{'max sends':>10}"
          f"{'compute s':>10}{'LAN s*':>8}{'WAN s*':>8}{'bytes vs full':>14}")
    for r in rows:
        total = sum(r["bytes_sent"])
        ref = full.get(r["seq"])
        red = f"{sum(ref['bytes_sent']) / total:.2f}x" if ref else "-"
        print(f"{r['policy']:<12}{r['seq']:>7}{r['entries']:>8}{total / 1e6:>14.2f}"
              f"{max(r['sends']):>10}{r['compute_s']:>10.2f}"
              f"{r['latency_s_projected']['lan']:>8.2f}{r['latency_s_projected']['wan']:>8.2f}"
              f"{red:>14}")
    print(f"* projected from measured counters (protocols.network); {args.heads} of "
          f"{args.model_heads} heads measured, one layer; oracle = free selection")
    if args.json:
        write_json_atomic(args.json, {"rows": rows, "budget": args.budget,
                                      "protocol": protocol.name})


if __name__ == "__main__":
    run_main(main)
