"""What one secret x secret matmul costs under a protocol, over a grid of shapes; or, with
--onehot, what building a compaction one-hot and gathering with it costs, per one-hot form.

    python experiments/gather_shapes.py --protocol cheetah \
        --shapes 22x257x4096,8x257x4096,44x257x4096,22x64x4096,22x1024x4096,22x257x1024 \
        --out results/gather_shapes_cheetah
    python experiments/gather_shapes.py --protocol cheetah --onehot eq,digits \
        --shapes 128x1024x128,22x257x128 --out results/onehot_forms_cheetah

A shape MxNxZ is the one-hot gather of a kept selection for one KV head: (M slots x N
clusters) times (N clusters x Z = cluster size x head dim), both operands secret shares that
no party owns (as in a decode step). Each shape runs `--repeats` times on one persistent
session; the row keeps the fastest run's seconds (the least loaded) and its counters.
Under CHEETAH this is a homomorphic matmul: how its cost grows with M, N and Z says which
reshaping of the compact gather can pay (docs/benchmark.md).
With --onehot FORMS, a shape MxNxZ is a secret selection mask over N entries with M of them
set (random), compacted to M slots: the one-hot [M, N] built by each form
(`eviction.compaction.compaction_matrix`: eq, ge, digits) and the gather of N x Z secret rows
with it, each measured alone ("onehot") and together ("gather"), checked against the
equality one-hot in plaintext.
With --sort, a shape MxNxZ is the same mask compacted instead by ONE stable 1-bit sort
(`eviction.compaction.partition`, the static step's SEMI2K/ABY3 kernel) carrying Z payload
columns of N entries (the static step carries 2 x head_dim + 1): what the sort costs per
payload column, checked against the plaintext partition.
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


def fastest(session, fn, inputs: dict, repeats: int):
    """(the counters of the fastest of `repeats` runs of fn over the named secret inputs,
    its revealed first output as numpy)."""
    import numpy as np

    prog = session.compile(fn, list(inputs.values()), list(inputs))
    refs = [session.put(name, value) for name, value in inputs.items()]
    best, got = None, None
    for _ in range(repeats):
        outs, cost = session.run(prog, ["o"])
        got = np.asarray(session.reveal(outs[0]))
        for o in outs:
            session.delete(o)
        best = cost if best is None or cost.seconds < best.seconds else best
    for r in refs:
        session.delete(r)
    return best, got


def measure(session, shape, repeats: int) -> dict:
    """The fastest of `repeats` runs of p @ k, p [M, N], k [N, Z], both secret (no owner)."""
    import numpy as np

    m, n, z = shape
    rng = np.random.default_rng(0)
    p = rng.normal(size=(m, n)).astype(np.float32)
    k = rng.normal(size=(n, z)).astype(np.float32)
    best, got = fastest(session, lambda a, b: (a @ b,), {"p": p, "k": k}, repeats)
    err = float(np.abs(got - p @ k).max())
    return {"m": m, "n": n, "z": z, "macs": m * n * z, "bytes": sum(best.bytes_sent),
            "sends": max(best.sends), "seconds": best.seconds, "max_abs_error": err}


def measure_onehot(session, shape, form: str, repeats: int) -> list:
    """Two rows for one form: the one-hot alone and the one-hot with its gather (fastest of
    `repeats` runs each), each checked against the plaintext equality one-hot."""
    import jax.numpy as jnp
    import numpy as np

    from eviction.compaction import compaction_matrix

    m, n, z = shape
    rng = np.random.default_rng(0)
    mask = np.zeros((1, 1, n), np.float32)
    mask[0, 0, rng.choice(n, min(m, n), replace=False)] = 1.0
    k = rng.normal(size=(1, 1, n, z)).astype(np.float32)
    onehot = np.asarray(compaction_matrix(jnp.asarray(mask > 0.5), m, "eq"), np.float32)
    wants = {"onehot": onehot, "gather": np.einsum("bknt,bktd->bknd", onehot, k)}
    fns = {"onehot": lambda a, b: (compaction_matrix(a > 0.5, m, form).astype(jnp.float32),),
           "gather": lambda a, b: (jnp.einsum("bknt,bktd->bknd", compaction_matrix(
               a > 0.5, m, form).astype(jnp.float32), b),)}
    rows = []
    for what, fn in fns.items():
        best, got = fastest(session, fn, {"mask": mask, "k": k}, repeats)
        rows.append({"form": form, "what": what, "m": m, "n": n, "z": z,
                     "bytes": sum(best.bytes_sent), "sends": max(best.sends),
                     "seconds": best.seconds,
                     "max_abs_error": float(np.abs(got - wants[what]).max())})
    return rows


def measure_sort(session, shape, repeats: int) -> list:
    """One row: the fastest of `repeats` runs of the 1-bit sort compacting the M entries of
    a secret mask over N (made by a comparison inside the program, as in a policy) with Z
    payload columns, checked against the plaintext partition."""
    import jax.numpy as jnp
    import numpy as np

    from eviction.compaction import partition

    m, n, z = shape
    rng = np.random.default_rng(0)
    mask = np.zeros((1, 1, n), np.float32)
    mask[0, 0, rng.choice(n, min(m, n), replace=False)] = 1.0
    cols = rng.normal(size=(z, 1, 1, n)).astype(np.float32)
    want = np.stack(partition(jnp.asarray(mask > 0.5), m, list(cols), "plain"))

    def fn(a, c):
        return (jnp.stack(partition(a > 0.5, m, [c[i] for i in range(z)], "spu")),)
    best, got = fastest(session, fn, {"mask": mask, "cols": cols}, repeats)
    return [{"form": "sort", "what": "sort", "m": m, "n": n, "z": z,
             "bytes": sum(best.bytes_sent), "sends": max(best.sends), "seconds": best.seconds,
             "bytes_per_payload_element": sum(best.bytes_sent) / (n * z),
             "max_abs_error": float(np.abs(got - want).max())}]


def onehot_markdown(rows) -> str:
    lines = ["| M x N x Z | form | measured | MB (all parties) | sends (busiest) | seconds | "
             "max abs error vs plaintext |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        what = {"onehot": "one-hot", "gather": "one-hot + gather",
                "sort": "1-bit sort, Z payload columns"}[r["what"]]
        lines.append(f"| {r['m']} x {r['n']} x {r['z']} | {r['form']} | {what} | "
                     f"{r['bytes'] / 1e6:.2f} | {r['sends']} | {r['seconds']:.2f} | "
                     f"{r['max_abs_error']:.1e} |")
    return "\n".join(lines)


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
    p.add_argument("--onehot", default="", help="one-hot forms (comma list of eq, ge, "
                   "digits): measure compaction one-hots of M slots over N entries and their "
                   "gather of N x Z rows instead of a plain matmul")
    p.add_argument("--sort", action="store_true", help="measure the 1-bit sort compacting "
                   "M of N entries with Z payload columns instead of a plain matmul")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from protocols.registry import get_protocol
    from protocols.session import SpuSession

    from eviction.compaction import ONEHOT_FORMS

    shapes = parse_shapes(args.shapes)
    if args.repeats < 1:
        raise ConfigError("--repeats must be >= 1")
    forms = [f for f in (x.strip() for x in args.onehot.split(",")) if f]
    bad = [f for f in forms if f not in ONEHOT_FORMS or f == "auto"]
    if bad:
        raise ConfigError(f"--onehot: unknown form {bad[0]!r}; choose from eq, ge, digits")
    protocol = get_protocol(args.protocol)
    session = SpuSession(protocol)
    session.warm_up()  # CHEETAH's one-time setup stays out of the rows
    if forms and args.sort:
        raise ConfigError("--sort and --onehot measure different things: give one")
    if args.sort:
        rows = [r for s in tqdm(shapes, desc="sorts", unit="shape", file=sys.stderr)
                for r in measure_sort(session, s, args.repeats)]
    elif forms:
        jobs = [(s, f) for s in shapes for f in forms]
        rows = [r for s, f in tqdm(jobs, desc="one-hots", unit="form", file=sys.stderr)
                for r in measure_onehot(session, s, f, args.repeats)]
    else:
        rows = [measure(session, s, args.repeats)
                for s in tqdm(shapes, desc="shapes", unit="shape", file=sys.stderr)]
    for r in rows:
        r["protocol"] = protocol.name
    print(onehot_markdown(rows) if forms or args.sort else markdown(rows))
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
