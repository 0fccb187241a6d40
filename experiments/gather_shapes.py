"""What one secret x secret matmul costs under a protocol, over a grid of shapes.

    python experiments/gather_shapes.py --protocol cheetah \
        --shapes 22x257x4096,8x257x4096,44x257x4096,22x64x4096,22x1024x4096,22x257x1024 \
        --out results/gather_shapes_cheetah

A shape MxNxZ is the one-hot gather of a kept selection for one KV head: (M slots x N
clusters) times (N clusters x Z = cluster size x head dim), both operands secret shares that
no party owns (as in a decode step). Each shape runs `--repeats` times on one persistent
session; the row keeps the fastest run's seconds (the least loaded) and its counters.
Under CHEETAH this is a homomorphic matmul: how its cost grows with M, N and Z says which
reshaping of the compact gather can pay (docs/benchmark.md).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.cli import Parser, rows_to_csv, run_main, write_outputs_atomic  # noqa: E402
from mpc_llama.errors import ConfigError  # noqa: E402


def parse_shapes(text: str):
    """'22x257x4096,8x257x4096' -> [(22, 257, 4096), (8, 257, 4096)]."""
    shapes = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            dims = tuple(int(x) for x in part.lower().split("x"))
        except ValueError:
            dims = ()
        if len(dims) != 3 or min(dims) < 1:
            raise ConfigError(f"shape {part!r} is not MxNxZ with positive integers")
        shapes.append(dims)
    if not shapes:
        raise ConfigError("--shapes is empty")
    return shapes


def measure(session, shape, repeats: int) -> dict:
    """The fastest of `repeats` runs of p @ k, p [M, N], k [N, Z], both secret (no owner)."""
    import numpy as np

    m, n, z = shape
    rng = np.random.default_rng(0)
    p = rng.normal(size=(m, n)).astype(np.float32)
    k = rng.normal(size=(n, z)).astype(np.float32)
    prog = session.compile(lambda a, b: (a @ b,), [p, k], ["p", "k"])
    refs = [session.put("p", p), session.put("k", k)]
    best = None
    for _ in range(repeats):
        outs, cost = session.run(prog, ["o"])
        got = session.reveal(outs[0])
        for o in outs:
            session.delete(o)
        best = cost if best is None or cost.seconds < best.seconds else best
    for r in refs:
        session.delete(r)
    err = float(np.abs(np.asarray(got[0] if isinstance(got, (tuple, list)) else got)
                       - p @ k).max())
    return {"m": m, "n": n, "z": z, "macs": m * n * z, "bytes": sum(best.bytes_sent),
            "sends": max(best.sends), "seconds": best.seconds, "max_abs_error": err}


def markdown(rows) -> str:
    lines = ["| M x N x Z | MACs (M) | MB (all parties) | sends (busiest) | seconds | "
             "max abs error vs plaintext |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['m']} x {r['n']} x {r['z']} | {r['macs'] / 1e6:.1f} | "
                     f"{r['bytes'] / 1e6:.2f} | {r['sends']} | {r['seconds']:.2f} | "
                     f"{r['max_abs_error']:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    import json

    from tqdm import tqdm

    p = Parser(description=__doc__)
    p.add_argument("--protocol", default="cheetah")
    p.add_argument("--shapes", default="22x257x4096,8x257x4096,44x257x4096,22x64x4096,"
                                       "22x1024x4096,22x257x1024")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from protocols.registry import get_protocol
    from protocols.session import SpuSession

    shapes = parse_shapes(args.shapes)
    if args.repeats < 1:
        raise ConfigError("--repeats must be >= 1")
    protocol = get_protocol(args.protocol)
    session = SpuSession(protocol)
    session.warm_up()  # CHEETAH's one-time setup stays out of the rows
    rows = [measure(session, s, args.repeats)
            for s in tqdm(shapes, desc="shapes", unit="shape", file=sys.stderr)]
    for r in rows:
        r["protocol"] = protocol.name
    print(markdown(rows))
    if args.out:
        command = "python experiments/gather_shapes.py " + " ".join(sys.argv[1:] if argv is None
                                                                     else argv)

        def fill(tmp):
            (tmp / "results.json").write_text(json.dumps(
                {"command": command, "protocol": protocol.name, "rows": rows}, indent=1))
            (tmp / "results.csv").write_text(rows_to_csv(rows))

        write_outputs_atomic(args.out, fill)
        print(f"wrote {args.out}/results.json, results.csv", file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
