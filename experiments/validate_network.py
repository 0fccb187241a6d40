"""Real two-party runs under shaped networks, against the cost model's projection.

    sudo python experiments/validate_network.py --out results/netval
    sudo python experiments/validate_network.py --protocols cheetah --profiles 100/10 --out DIR
    python experiments/validate_network.py --reproject results/netval/results.json --out DIR

Builds two network namespaces joined by a veth pair (10.213.0.1 <-> 10.213.0.2, created and
removed by this script; no other address is touched), rate-limits each end with `tc tbf` and
adds one-way delay with a TCP proxy in front of each party (protocols/delay_proxy.py: the
kernel has no netem). Party 0 (model owner) runs in one namespace, party 1 (data owner,
driving) in the other, each its own process on SPU's brpc link. For every protocol, block and
profile it measures the wall-clock of the block and compares it with

    projected = T_comp + k * max_i(sends_i - R_i) * RTT / 2 + rho * max_i(R_i) * RTT / 2
                + max_i(bytes_i) / BW

(protocols.network.projected_seconds), R_i being party i's CHEETAH refill sends
(protocols.refill: a run's excess over the least sends any run of the block had), T_comp the
same block's time on the unshaped link (no rate limit, no delay) between the same
namespaces, plus the unshaped compute of each refill. Every run is kept (`raw`); runs of a
block and profile are grouped by refill count, one row per group. Writes results.json and
results.csv (all or none) and prints a table; target: every row within 30%.
Needs root (namespaces, tc) and Linux `ip`/`tc`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.cli import (Parser, rows_to_csv, run_main, write_json_atomic,  # noqa: E402
                             write_outputs_atomic)
from mpc_llama.errors import ConfigError  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NET = "10.213.0"
# (builder, name, policy, seq, heads) on SmolLM2's shapes as compiled for SPU
BLOCKS = {
    "gate_up": ("dense", "gate_up", None, None, None),
    "gated": ("dense", "gated", None, None, None),
    "softmax_1k": ("attention", "softmax", None, 1024, 3),
    "select_1k": ("attention", "select", "mpcache", 1024, 3),
    "softmax_4k": ("attention", "softmax", None, 4096, 3),  # ~50 MB under CHEETAH: refills
}
DEFAULT_BLOCKS = {"SEMI2K": "gate_up,gated,softmax_1k,select_1k",
                  "CHEETAH": "gate_up,gated,softmax_1k,select_1k,softmax_4k"}


def parse_args(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("--protocols", default="semi2k,cheetah", help="two-party protocols")
    p.add_argument("--profiles", default="1000/1,100/10,50/40",
                   help="shaped networks as MBIT/RTT_MS (comma list)")
    p.add_argument("--blocks", help=f"from {list(BLOCKS)} (default: {DEFAULT_BLOCKS})")
    p.add_argument("--reproject", metavar="RESULTS_JSON",
                   help="no runs: re-project the raw runs of an earlier results.json with "
                        "today's model (and --fit), writing --out")
    p.add_argument("--fit", action="store_true",
                   help="fit CHEETAH's refill flights per send (rho) on these runs and use it")
    p.add_argument("--out", help="directory for results.json and results.csv")
    p.add_argument("--inner", help=argparse.SUPPRESS)      # the driver inside a namespace
    p.add_argument("--protocol", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _profiles(text):
    out = []
    for item in text.split(","):
        try:
            mbit, rtt = (float(v) for v in item.split("/"))
        except ValueError:
            raise ConfigError(f"--profiles: {item!r} is not MBIT/RTT_MS") from None
        if mbit <= 0 or rtt < 0:
            raise ConfigError(f"--profiles: {item!r} needs MBIT > 0 and RTT_MS >= 0")
        out.append((mbit, rtt))
    return out


# ---- inside the data owner's namespace ----

def inner(args) -> None:
    """Measures the blocks as the data owner (party 1) against a running party 0."""
    from eviction import make_policy
    from mpc_llama.loading import load_config
    from protocols.party import Cluster
    from protocols.private_generation import spu_config
    from protocols.registry import get_protocol

    protocol = get_protocol(args.protocol)
    cfg = spu_config(load_config("smollm2"))
    rows = []
    with Cluster(args.inner, start_local=False) as cluster:
        if protocol.kind == "CHEETAH":
            cluster.warm_up(protocol)
        for name in args.blocks.split(","):
            builder, block, policy, seq, heads = BLOCKS[name]
            pol = make_policy(policy, 0.1) if policy else None
            # every run apart: CHEETAH refills land in some runs of a block and not others;
            # measured twice over (a block slower than 10 s runs once per measurement, and
            # its refill-free time is wanted as well as the refill's)
            costs = [c for _ in range(2)
                     for c in cluster.measure(protocol, cfg, pol, builder, block, seq, heads)]
            rows.append({"block": name, "runs": [
                {"seconds": c.seconds, "bytes_sent": [p.bytes_sent for p in c.parties],
                 "sends": [p.sends for p in c.parties]} for c in costs]})
    print("RESULT " + json.dumps(rows), flush=True)


# ---- the namespaces ----

class Netns:
    """Two namespaces and a veth pair; removed on exit."""

    def __init__(self):
        tag = f"{os.getpid() % 100000}"
        self.ns = (f"mpcv0_{tag}", f"mpcv1_{tag}")
        self.dev = (f"mv0_{tag}", f"mv1_{tag}")
        self.ip = (f"{NET}.1", f"{NET}.2")

    def __enter__(self):
        try:
            for ns in self.ns:
                _sh("ip", "netns", "add", ns)
            _sh("ip", "link", "add", self.dev[0], "type", "veth", "peer", "name", self.dev[1])
            for i in range(2):
                _sh("ip", "link", "set", self.dev[i], "netns", self.ns[i])
                _sh("ip", "-n", self.ns[i], "addr", "add", f"{self.ip[i]}/24", "dev", self.dev[i])
                _sh("ip", "-n", self.ns[i], "link", "set", self.dev[i], "up")
                _sh("ip", "-n", self.ns[i], "link", "set", "lo", "up")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def shape(self, mbit):
        """tbf rate limit on both ends (None: remove)."""
        for i in range(2):
            subprocess.run(["ip", "netns", "exec", self.ns[i], "tc", "qdisc", "del", "dev",
                            self.dev[i], "root"], capture_output=True)
            if mbit is not None:
                burst = max(64 * 1024, int(mbit * 1e6 / 8 / 100))  # >= 10 ms of traffic
                _sh("ip", "netns", "exec", self.ns[i], "tc", "qdisc", "add", "dev", self.dev[i],
                    "root", "tbf", "rate", f"{mbit}mbit", "burst", str(burst), "latency",
                    "2000ms")

    def exec(self, i, cmd, **kw):
        return subprocess.Popen(["ip", "netns", "exec", self.ns[i]] + cmd, cwd=ROOT, **kw)

    def __exit__(self, *exc):
        for ns in self.ns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        return False


def _sh(*cmd):
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise ConfigError(f"{' '.join(cmd)} failed: {out.stderr.strip()[:200]}")


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_profile(net, protocol, blocks, rtt_ms, tmp):
    """One protocol's blocks on the current shaping, with delay proxies of rtt_ms / 2."""
    p0, p1, q0, q1 = (_port() for _ in range(4))
    files = []
    for rank, addrs in enumerate(([f"{net.ip[0]}:{p0}", f"127.0.0.1:{q0}"],
                                  [f"127.0.0.1:{q1}", f"{net.ip[1]}:{p1}"])):
        path = os.path.join(tmp, f"parties{rank}.json")
        with open(path, "w") as f:
            json.dump({"parties": addrs, "model_owner": 0, "data_owner": 1,
                       "connect_timeout_s": 20, "recv_timeout_s": 300}, f)
        files.append(path)
    py = [sys.executable]
    delay = str(rtt_ms / 2)
    procs = [
        net.exec(0, py + ["-m", "protocols.delay_proxy", "--listen", f"127.0.0.1:{q0}",
                          "--to", f"{net.ip[1]}:{p1}", "--delay-ms", delay]),
        net.exec(1, py + ["-m", "protocols.delay_proxy", "--listen", f"127.0.0.1:{q1}",
                          "--to", f"{net.ip[0]}:{p0}", "--delay-ms", delay]),
        net.exec(0, py + ["-m", "protocols.party", "--rank", "0", "--parties", files[0]],
                 stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "party0.log"), "w")),
    ]
    try:
        time.sleep(1.0)
        driver = net.exec(1, py + [os.path.abspath(__file__), "--inner", files[1], "--protocol",
                                   protocol, "--blocks", ",".join(blocks)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = driver.communicate(timeout=3600)
        if driver.returncode:
            raise ConfigError(f"{protocol} run failed: {err.strip().splitlines()[-1][:300]}")
        line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1]
        return json.loads(line[len("RESULT "):])
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            p.wait()


def project(compute_s, bytes_sent, sends, refill, mbit, rtt_ms, kind):
    from protocols.network import NetworkProfile, projected_seconds

    prof = NetworkProfile("shaped", mbit * 1e6, rtt_ms / 1000.0)
    return projected_seconds(compute_s, bytes_sent, sends, prof, kind, refill_sends=refill)


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else 0.5 * (xs[len(xs) // 2 - 1] + xs[len(xs) // 2])


def analyse(raw, fit=False):
    """Rows (measured vs projected) from the raw runs {protocol: {profile|"unshaped": rows}}.

    Per protocol and block: the refill-free floor of sends is the least any run had
    (protocols.refill); T_comp is the median refill-free unshaped run (none: the median
    refill-free shaped run less its projected network time). Runs of one block and profile
    are grouped by refill count; each group gives one row (medians). A refill's price is
    fitted on every refill group, unshaped ones included (--fit; least squares, both >= 0):
        measured - projection without refills = c * R + rho * R * RTT / 2,    R = max_i R_i
    c: compute per refill send (on the loopback of the unshaped runs: part of T_comp, as in
    the simulator's compute_s), rho: flights per refill send (protocols.network)."""
    from protocols import network
    from protocols.refill import count_refills, refill_floor, refill_sends
    from protocols.registry import get_protocol

    groups = []
    for pname, by_prof in raw.items():
        kind = get_protocol(pname).kind
        # unshaped runs come first and last: each block once
        for block in dict.fromkeys(r["block"] for r in by_prof["unshaped"]):
            runs = {prof: [run for r in rows if r["block"] == block for run in r["runs"]]
                    for prof, rows in by_prof.items()}
            floor = refill_floor([run["sends"] for rs in runs.values() for run in rs])

            def split(run):
                if kind != "CHEETAH":
                    return [0] * len(run["sends"]), 0
                rs = refill_sends(run["sends"], floor)
                return list(rs), count_refills(rs)

            free = [r["seconds"] for r in runs["unshaped"] if split(r)[1] == 0]
            if not free:
                for prof, rs in runs.items():
                    if prof != "unshaped":
                        mbit, rtt = (float(v) for v in prof.split("/"))
                        free += [r["seconds"] - project(0.0, r["bytes_sent"], r["sends"], None,
                                                        mbit, rtt, kind)
                                 for r in rs if split(r)[1] == 0]
            t_comp = max(0.0, _median(free))
            for prof, rs in runs.items():
                mbit, rtt = (None, 0.0) if prof == "unshaped" else \
                    (float(v) for v in prof.split("/"))
                by_n = {}
                for r in rs:
                    by_n.setdefault(split(r)[1], []).append(r)
                for n, grp in sorted(by_n.items()):
                    med = lambda f: [_median([g[f][i] for g in grp])  # noqa: E731
                                     for i in range(len(grp[0][f]))]
                    refill = [_median([split(g)[0][i] for g in grp])
                              for i in range(len(grp[0]["sends"]))]
                    groups.append({"protocol": pname, "kind": kind, "block": block,
                                   "mbit": mbit, "rtt_ms": rtt, "runs": len(grp),
                                   "refills": n, "bytes_sent": med("bytes_sent"),
                                   "sends": med("sends"), "refill_sends": refill,
                                   "t_comp_free_s": t_comp,
                                   "measured_s": _median([g["seconds"] for g in grp])})
    c_send, rho = network.REFILL_COMPUTE_PER_SEND_S, network.REFILL_FLIGHTS_PER_SEND["CHEETAH"]
    if fit:
        xs, ys = [], []
        for g in groups:
            if g["kind"] == "CHEETAH" and g["refills"]:
                rest = g["measured_s"] - g["t_comp_free_s"]
                if g["mbit"] is not None:
                    regular = [s - r for s, r in zip(g["sends"], g["refill_sends"])]
                    rest -= project(0.0, g["bytes_sent"], regular, None, g["mbit"],
                                    g["rtt_ms"], g["kind"])
                r = max(g["refill_sends"])
                xs.append((r, r * g["rtt_ms"] / 2000.0))
                ys.append(rest)
        if xs:
            c_send, rho = _nnls2(xs, ys)
    network.REFILL_FLIGHTS_PER_SEND["CHEETAH"] = rho
    for g in groups:
        g["compute_s"] = g["t_comp_free_s"] + c_send * max(g["refill_sends"])
    groups = [g for g in groups if g["mbit"] is not None]
    rows = []
    for g in groups:
        projected = project(g["compute_s"], g["bytes_sent"], g["sends"], g["refill_sends"],
                            g["mbit"], g["rtt_ms"], g["kind"])
        old = project(g["compute_s"], g["bytes_sent"], g["sends"], None, g["mbit"],
                      g["rtt_ms"], g["kind"])
        rows.append({"protocol": g["protocol"], "block": g["block"], "mbit": g["mbit"],
                     "rtt_ms": g["rtt_ms"], "runs": g["runs"], "refills": g["refills"],
                     "bytes_max": max(g["bytes_sent"]), "sends_max": max(g["sends"]),
                     "refill_sends_max": max(g["refill_sends"]),
                     "compute_s": g["compute_s"], "measured_s": g["measured_s"],
                     "projected_s": projected, "error": projected / g["measured_s"] - 1.0,
                     "projected_no_refill_model_s": old,
                     "error_no_refill_model": old / g["measured_s"] - 1.0})
    return rows, {"refill_flights_per_send": rho, "refill_compute_per_send_s": c_send}


def _nnls2(xs, ys):
    """Least squares y = a * x1 + b * x2 with a, b >= 0."""
    import numpy as np

    X, y = np.asarray(xs, float), np.asarray(ys, float)
    best = None
    for cols in ([0, 1], [0], [1]):
        coef, *_ = np.linalg.lstsq(X[:, cols], y, rcond=None)
        if (coef >= 0).all():
            full = np.zeros(2)
            full[cols] = coef
            err = float(np.sum((X @ full - y) ** 2))
            if best is None or err < best[0]:
                best = (err, full)
    return (0.0, 0.0) if best is None else (float(best[1][0]), float(best[1][1]))


def print_table(rows):
    print(f"\n{'protocol':<9}{'block':<12}{'network':>14}{'refills':>8}{'MB':>8}{'sends':>7}"
          f"{'refill':>7}{'T_comp':>8}{'measured':>10}{'projected':>10}{'error':>8}"
          f"{'old':>8}", file=sys.stderr)
    for r in rows:
        print(f"{r['protocol']:<9}{r['block']:<12}{r['mbit']:>7g}Mb/{r['rtt_ms']:<4g}ms"
              f"{r['refills']:>8}{r['bytes_max'] / 1e6:>8.2f}{r['sends_max']:>7.0f}"
              f"{r['refill_sends_max']:>7.0f}{r['compute_s']:>8.2f}{r['measured_s']:>10.2f}"
              f"{r['projected_s']:>10.2f}{r['error']:>+8.0%}{r['error_no_refill_model']:>+8.0%}",
              file=sys.stderr)


def write(args, argv, raw, rows, fitted):
    from protocols.network import FLIGHTS_PER_SEND

    worst = max(abs(r["error"]) for r in rows)
    print(f"worst |error| {worst:.0%} (target 30%); CHEETAH refill: "
          f"{fitted['refill_flights_per_send']:.4f} flights and "
          f"{fitted['refill_compute_per_send_s'] * 1e3:.2f} ms compute per refill send",
          file=sys.stderr)
    if not args.out:
        return
    payload = {"command": "python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:])),
               "rows": rows, "worst_abs_error": worst,
               "flights_per_send": FLIGHTS_PER_SEND, **fitted, "fitted": bool(args.fit),
               "model": "T = T_comp + k * max(sends - refill_sends) * RTT/2 + rho * "
                        "max(refill_sends) * RTT/2 + max(bytes) / BW; T_comp = the unshaped "
                        "refill-free median + c * max(refill_sends)",
               "raw": raw}

    def fill(tmp_dir):
        write_json_atomic(str(tmp_dir / "results.json"), payload)
        (tmp_dir / "results.csv").write_text(rows_to_csv(rows))

    write_outputs_atomic(args.out, fill)
    print(f"wrote {args.out}/results.json, results.csv", file=sys.stderr)


def main(argv=None):
    args = parse_args(argv)
    if args.inner:
        return inner(args)
    if args.reproject:
        with open(args.reproject) as f:
            raw = json.load(f)["raw"]
        rows, fitted = analyse(raw, args.fit)
        print_table(rows)
        return write(args, argv, raw, rows, fitted)
    from tqdm import tqdm

    from protocols.registry import get_protocol

    protocols = [get_protocol(p) for p in args.protocols.split(",") if p]
    for p in protocols:
        if p.world_size != 2:
            raise ConfigError(f"{p.name}: validation runs two parties (one per namespace)")
    profiles = _profiles(args.profiles)
    chosen = {p.name: [b for b in (args.blocks or DEFAULT_BLOCKS[p.kind]).split(",") if b]
              for p in protocols}
    for b in sum(chosen.values(), []):
        if b not in BLOCKS:
            raise ConfigError(f"unknown block {b!r}; choose from {list(BLOCKS)}")
    if os.geteuid() != 0:
        raise ConfigError("needs root: it creates network namespaces and tc qdiscs")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise ConfigError(f"needs the `{tool}` command (iproute2)")
    # SIGTERM unwinds like an error, so the namespaces are removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    raw = {}
    partial = os.path.join(tempfile.gettempdir(), f"validate_network.{os.getpid()}.raw.json")
    print(f"raw runs so far: {partial} (--reproject reads it)", file=sys.stderr)
    # unshaped first and last: the compute baseline averaged over the load during the runs
    runs = [(p, prof) for p in protocols for prof in [None] + profiles + [None]]
    with Netns() as net, tempfile.TemporaryDirectory() as tmp, \
            tqdm(total=len(runs), desc="shaped runs", unit="run", file=sys.stderr) as bar:
        for protocol in protocols:
            raw[protocol.name] = {}
            for prof in [None] + profiles + [None]:
                bar.set_postfix_str(f"{protocol.name} {'unshaped' if prof is None else prof}")
                net.shape(None if prof is None else prof[0])
                got = run_profile(net, protocol.name, chosen[protocol.name],
                                  0.0 if prof is None else prof[1], tmp)
                bar.update()
                key = "unshaped" if prof is None else f"{prof[0]:g}/{prof[1]:g}"
                raw[protocol.name][key] = raw[protocol.name].get(key, []) + got
                write_json_atomic(partial, {"raw": raw})  # survives a failure below
    rows, fitted = analyse(raw, args.fit)
    print_table(rows)
    write(args, argv, raw, rows, fitted)
    os.remove(partial)


if __name__ == "__main__":
    run_main(main)
