"""Run one MPC party as its own process; drive a set of parties from the user's side.

On each host (rank N of the parties file):

    python -m protocols.party --rank N --parties parties.json [--model smollm2|PATH]

The party connects to its peers over SPU's brpc link and serves jobs sent by the data owner
(the user's process, `experiments/generate.py --parties` or `experiments/run_spu.py --parties`),
until told to stop. Jobs are public descriptions in JSON (which program, lengths, policy,
protocol); secret inputs enter only at their owners: the model owner reads the weights from its
own --model, the user holds the prompt. Every party compiles the same programs itself (hashes
compared before running) and reports its own counters.

`Cluster` is the user's side: it starts the other parties on this machine when their addresses
are loopback ones (children in their own process group, killed on any exit: no orphans), joins
as the data owner, and sends the jobs. A party that dies makes the others fail: locally the
cluster notices at once and exits with a message; remote parties time out after
recv_timeout_s (parties file).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mpc_llama.errors import ConfigError  # noqa: E402
from protocols.parties import Parties, load_parties  # noqa: E402

# ---- public job descriptions (JSON) ----


def encode_cfg(cfg) -> dict:
    return dataclasses.asdict(cfg)


def decode_cfg(data: dict):
    from mpc_llama.config import LlamaConfig, RopeScaling

    data = dict(data)
    if data.get("rope_scaling") is not None:
        data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
    return LlamaConfig(**data)


def encode_policy(policy) -> Optional[dict]:
    if policy is None:
        return None
    return {"name": policy.name, "fields": dataclasses.asdict(policy)}


def decode_policy(data):
    from eviction import POLICIES

    if data is None:
        return None
    if data["name"] not in POLICIES:
        raise ConfigError(f"unknown policy {data['name']!r} in a job")
    return POLICIES[data["name"]](**data["fields"])


def encode_protocol(protocol) -> dict:
    return dataclasses.asdict(protocol)


def decode_protocol(data):
    from protocols.registry import Protocol

    return Protocol(**data)


BUILDERS = ("dense", "attention", "static")


def build_block(job: dict):
    """The block a "block" job names, rebuilt from its recipe (the same at every party)."""
    from protocols import blocks as B

    cfg, policy = decode_cfg(job["cfg"]), decode_policy(job["policy"])
    builder = job["builder"]
    if builder == "dense":
        found = B.dense_blocks(cfg)
    elif builder == "attention":
        found = B.attention_blocks(cfg, policy, job["seq"], job["heads"])
    elif builder == "static":
        found = B.static_blocks(cfg, policy, job["seq"], job["heads"])
    else:
        raise ConfigError(f"unknown block builder {builder!r}")
    named = [b for b in found if b.name == job["name"]]
    if len(named) != 1:
        raise ConfigError(f"no single block {job['name']!r} from {builder}")
    return named[0]


# ---- a party's job server ----

class JobServer:
    """Serves the jobs of one run at one party (also used in-process by the data owner)."""

    def __init__(self, parties: Parties, rank: int, link, model: str):
        self.parties, self.rank, self.link, self.model = parties, rank, link, model
        self.session = None
        self._model = None

    def session_for(self, protocol):
        from protocols.distributed import PartySession

        if self.session is None:
            self.session = PartySession(protocol, self.parties, self.rank, self.link)
        elif self.session.protocol != protocol:
            raise ConfigError("one party process serves one protocol setting")
        return self.session

    def params(self, cfg):
        """The weights at the model owner; their shapes elsewhere."""
        from protocols.private_generation import placeholder_params

        if self.rank != self.parties.model_owner:
            return placeholder_params(cfg)
        if self._model is None:
            from mpc_llama.loading import load_model

            self._model = load_model(self.model, with_tokenizer=False)
        return self._model.params

    def serve(self, job: dict):
        """Runs one job; returns what the data owner needs (None elsewhere)."""
        from protocols.benchmark import measure_runs

        protocol = decode_protocol(job["protocol"])
        session = self.session_for(protocol)
        kind = job["kind"]
        if kind == "warm_up":
            return session.warm_up()
        if kind == "block":
            return measure_runs(session, build_block(job),
                                {"model": self.parties.model_owner,
                                 "user": self.parties.data_owner})
        if kind == "generate":
            from protocols.private_generation import PrivateGenerator

            cfg = decode_cfg(job["cfg"])
            gen = PrivateGenerator(session, cfg, self.params(cfg),
                                   self.parties.model_owner, self.parties.data_owner,
                                   policy=decode_policy(job["policy"]))
            prompt = job.get("prompt") or [0] * job["prompt_len"]  # the prompt: user only
            return gen.generate(prompt, job["max_new_tokens"], job["eos_ids"])
        raise ConfigError(f"unknown job kind {kind!r}")


def serve_forever(parties: Parties, rank: int, model: str) -> None:
    from protocols.distributed import connect

    link = connect(parties, rank)
    server = JobServer(parties, rank, link, model)
    driver = parties.data_owner
    while True:
        try:
            job = json.loads(link.recv(driver))
        except Exception:  # noqa: BLE001
            from protocols.distributed import PartyError

            raise PartyError(f"party {rank}: nothing from the data owner (party {driver}) "
                             f"within {parties.recv_timeout_s:g} s: it went away") from None
        if job["kind"] == "stop":
            break
        server.serve(job)
    link.barrier()    # everyone is done sending before anyone leaves
    link.stop_link()  # only on a clean stop: it waits for the peers


# ---- the user's side ----

class Cluster:
    """The data owner's handle on a set of parties (see the module docstring).

    with Cluster(parties_path, model) as cluster:
        result = cluster.generate(protocol, cfg, policy, prompt, max_new_tokens, eos_ids)
    """

    def __init__(self, parties_path: str, model: str = "smollm2", start_local: bool = True,
                 log_dir: Optional[str] = None):
        self.path, self.model = parties_path, model
        self.parties = load_parties(parties_path)
        self.rank = self.parties.data_owner
        self.start_local, self.log_dir = start_local, log_dir
        self.children: List[subprocess.Popen] = []
        self.server = None
        self._failed = None
        self._closing = False

    # ---- lifecycle ----
    def __enter__(self):
        from protocols.distributed import check_port_free, connect

        p = self.parties
        for r in range(p.world_size):
            if p.is_local(r) and (self.start_local or r == self.rank):
                check_port_free(p, r)  # before starting anything
        try:
            if self.start_local:
                for r in range(p.world_size):
                    if r != self.rank and p.is_local(r):
                        self.children.append(self._spawn(r))
                threading.Thread(target=self._watch, daemon=True).start()
            link = connect(p, self.rank)
        except BaseException:
            self._kill_children()
            raise
        self.server = JobServer(p, self.rank, link, self.model)
        return self

    def _spawn(self, rank: int) -> subprocess.Popen:
        log = subprocess.DEVNULL
        if self.log_dir:
            os.makedirs(self.log_dir, exist_ok=True)
            log = open(os.path.join(self.log_dir, f"party{rank}.log"), "wb")
        cmd = [sys.executable, "-m", "protocols.party", "--rank", str(rank), "--parties",
               self.path, "--model", self.model]
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)

    def _watch(self):
        """A local party that dies ends the run at once (this process is blocked in SPU)."""
        while not self._closing:
            for child in self.children:
                code = child.poll()
                if code is not None and code != 0 and not self._closing:
                    rank = int(child.args[child.args.index("--rank") + 1])
                    self._kill_children()
                    sys.stderr.write(f"error: party {rank} (pid {child.pid}) exited with code "
                                     f"{code} mid-run; stopping all parties\n")
                    sys.stderr.flush()
                    os._exit(3)
            time.sleep(0.2)

    def _kill_children(self):
        for child in self.children:
            if child.poll() is None:
                try:
                    os.killpg(child.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            child.wait()

    def __exit__(self, exc_type, exc, tb):
        self._closing = True
        try:
            if exc_type is None and self.server is not None:
                self._send({"kind": "stop"})
                self.server.link.barrier()
                self.server.link.stop_link()
                deadline = time.time() + 30
                for child in self.children:
                    child.wait(timeout=max(0.1, deadline - time.time()))
        except Exception:  # noqa: BLE001 - fall through to the kill below
            pass
        finally:
            self._kill_children()
        return False

    # ---- jobs ----
    def _send(self, job: dict) -> None:
        data = json.dumps(job).encode()
        for r in range(self.parties.world_size):
            if r != self.rank:
                self.server.link.send(r, data)

    def run(self, job: dict):
        """Sends a job to every party and runs it here too; returns this party's result."""
        from protocols.distributed import PartyError

        try:
            self._send(job)
        except Exception as e:  # noqa: BLE001
            raise PartyError(f"could not reach the parties: {str(e).strip()[:200]}") from None
        return self.server.serve(job)

    def warm_up(self, protocol):
        """CHEETAH's one-time setup on the parties (its Cost)."""
        return self.run({"kind": "warm_up", "protocol": encode_protocol(protocol)})

    def generate(self, protocol, cfg, policy, prompt, max_new_tokens, eos_ids=()):
        """Private greedy generation on the parties; the prompt stays here (the user)."""
        job = {"kind": "generate", "protocol": encode_protocol(protocol),
               "cfg": encode_cfg(cfg), "policy": encode_policy(policy),
               "prompt_len": len(prompt), "max_new_tokens": max_new_tokens,
               "eos_ids": list(eos_ids)}
        self._send(job)  # the public job: without the prompt
        return self.server.serve({**job, "prompt": list(prompt)})

    def measure(self, protocol, cfg, policy, builder, name, seq=None, heads=None):
        """One block's runs on the parties (list of Costs, every party's counters)."""
        return self.run({"kind": "block", "protocol": encode_protocol(protocol),
                         "cfg": encode_cfg(cfg), "policy": encode_policy(policy),
                         "builder": builder, "name": name, "seq": seq, "heads": heads})


def main(argv=None):
    from protocols.cli import Parser

    p = Parser(description=__doc__)
    p.add_argument("--rank", type=int, required=True, help="this party's index in the file")
    p.add_argument("--parties", required=True, help="parties file (JSON)")
    p.add_argument("--model", default="smollm2",
                   help="weights (read at the model owner only): smollm2, .gguf or HF dir")
    args = p.parse_args(argv)
    parties = load_parties(args.parties)
    if not 0 <= args.rank < parties.world_size:
        raise ConfigError(f"--rank {args.rank}: the parties file has ranks "
                          f"0..{parties.world_size - 1}")
    if args.rank == parties.data_owner:
        raise ConfigError(f"rank {args.rank} is the data owner: it runs the user's program "
                          "(experiments/generate.py or run_spu.py with --parties)")
    serve_forever(parties, args.rank, args.model)


if __name__ == "__main__":
    from mpc_llama.errors import MpcacheError

    try:
        main()
    except MpcacheError as e:
        # a failed party leaves without the link's destructor (it would block on a dead
        # peer), after a grace for messages still in flight to live ones
        from protocols.cli import EXIT_GRACE_S

        sys.stderr.write(f"error: {e}\n")
        sys.stderr.flush()
        time.sleep(EXIT_GRACE_S)
        os._exit(2)
