"""Real two-party runs under shaped networks, against the cost model's projection.

    sudo python experiments/validate_network.py --out runs/netval
    sudo python experiments/validate_network.py --protocols cheetah --profiles 100/10 --out DIR

Builds two network namespaces joined by a veth pair (10.213.0.1 <-> 10.213.0.2, created and
removed by this script; no other address is touched), rate-limits each end with `tc tbf` and
adds one-way delay with a TCP proxy in front of each party (protocols/delay_proxy.py: the
kernel has no netem). Party 0 (model owner) runs in one namespace, party 1 (data owner,
driving) in the other, each its own process on SPU's brpc link. For every protocol, block and
profile it measures the wall-clock of the block and compares it with

    projected = T_comp + k * max_i(sends_i) * RTT / 2 + max_i(bytes_i) / BW

(protocols.network.projected_seconds), T_comp being the same block's time on the unshaped
link (no rate limit, no delay) between the same namespaces. Writes results.json and
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
}


def parse_args(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("--protocols", default="semi2k,cheetah", help="two-party protocols")
    p.add_argument("--profiles", default="1000/1,100/10,50/40",
                   help="shaped networks as MBIT/RTT_MS (comma list)")
    p.add_argument("--blocks", default=",".join(BLOCKS), help=f"from {list(BLOCKS)}")
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
            costs = cluster.measure(protocol, cfg, pol, builder, block, seq, heads)
            best = sorted(costs, key=lambda c: c.seconds)[len(costs) // 2]
            rows.append({"block": name, "seconds": best.seconds, "runs": len(costs),
                         "bytes_sent": [p.bytes_sent for p in best.parties],
                         "sends": [p.sends for p in best.parties]})
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


def project(base_s, row, mbit, rtt_ms, kind):
    from protocols.network import NetworkProfile, projected_seconds

    prof = NetworkProfile("shaped", mbit * 1e6, rtt_ms / 1000.0)
    return projected_seconds(base_s, row["bytes_sent"], row["sends"], prof, kind)


def main(argv=None):
    args = parse_args(argv)
    if args.inner:
        return inner(args)
    from tqdm import tqdm

    from protocols.registry import get_protocol

    protocols = [get_protocol(p) for p in args.protocols.split(",") if p]
    for p in protocols:
        if p.world_size != 2:
            raise ConfigError(f"{p.name}: validation runs two parties (one per namespace)")
    profiles = _profiles(args.profiles)
    blocks = [b for b in args.blocks.split(",") if b]
    for b in blocks:
        if b not in BLOCKS:
            raise ConfigError(f"unknown block {b!r}; choose from {list(BLOCKS)}")
    if os.geteuid() != 0:
        raise ConfigError("needs root: it creates network namespaces and tc qdiscs")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise ConfigError(f"needs the `{tool}` command (iproute2)")
    # SIGTERM unwinds like an error, so the namespaces are removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    rows = []
    runs = [(p, prof) for p in protocols for prof in [None] + profiles]
    with Netns() as net, tempfile.TemporaryDirectory() as tmp, \
            tqdm(total=len(runs), desc="shaped runs", unit="run", file=sys.stderr) as bar:
        for protocol in protocols:
            base = None
            for prof in [None] + profiles:
                bar.set_postfix_str(f"{protocol.name} {'unshaped' if prof is None else prof}")
                net.shape(None if prof is None else prof[0])
                got = run_profile(net, protocol.name, blocks, 0.0 if prof is None else prof[1],
                                  tmp)
                bar.update()
                if prof is None:
                    base = {r["block"]: r["seconds"] for r in got}
                    continue
                for r in got:
                    projected = project(base[r["block"]], r, prof[0], prof[1], protocol.kind)
                    rows.append({"protocol": protocol.name, "block": r["block"],
                                 "mbit": prof[0], "rtt_ms": prof[1],
                                 "bytes_max": max(r["bytes_sent"]), "sends_max": max(r["sends"]),
                                 "compute_s": base[r["block"]], "measured_s": r["seconds"],
                                 "projected_s": projected,
                                 "error": projected / r["seconds"] - 1.0})
    print(f"\n{'protocol':<9}{'block':<12}{'network':>14}{'MB':>9}{'sends':>7}{'T_comp':>8}"
          f"{'measured':>10}{'projected':>10}{'error':>8}")
    for r in rows:
        print(f"{r['protocol']:<9}{r['block']:<12}{r['mbit']:>7g}Mb/{r['rtt_ms']:<4g}ms"
              f"{r['bytes_max'] / 1e6:>9.2f}{r['sends_max']:>7}{r['compute_s']:>8.2f}"
              f"{r['measured_s']:>10.2f}{r['projected_s']:>10.2f}{r['error']:>+8.0%}")
    worst = max(abs(r["error"]) for r in rows)
    print(f"worst |error| {worst:.0%} (target 30%)")
    if args.out:
        payload = {"command": "python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:])),
                   "rows": rows, "worst_abs_error": worst,
                   "model": "T = T_comp + k * max(sends) * RTT/2 + max(bytes) / BW, T_comp from "
                            "the unshaped run between the same namespaces"}

        def fill(tmp_dir):
            write_json_atomic(str(tmp_dir / "results.json"), payload)
            (tmp_dir / "results.csv").write_text(rows_to_csv(rows))

        write_outputs_atomic(args.out, fill)
        print(f"wrote {args.out}/results.json, results.csv")


if __name__ == "__main__":
    run_main(main)
