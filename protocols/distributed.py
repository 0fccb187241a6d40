"""One MPC party in its own process, linked to the others over SPU's brpc runtime.

`PartySession` has the interface of `protocols.session.SpuSession`, for one party: every party
process runs the same driver code (same calls in the same order, SPMD), each compiling the same
programs locally (their hashes are compared across parties before the first run) and holding
only its own shares. A secret input is secret-shared by its owner, who keeps its share and sends
each peer theirs over the link; other parties pass a placeholder of the right shape (they never
see the value). Public values are known to every party (lengths, positions). `reveal_to` sends
the output's shares to one party only (the user gets the next token; nobody else learns it).
Counters: each party reads its own runtime's profile; `run` gathers all parties' counters, so
every party reports the exact per-party bytes and sends of the run.
Failures (dead peer, unreachable address, timeout) raise `PartyError` with a one-line message.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import socket
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np

from mpc_llama.errors import ConfigError, MpcacheError
from protocols.cost import Cost, PartyCost, capture_fd1, parse_profile
from protocols.parties import Parties
from protocols.registry import Protocol
from protocols.session import Program, SecretRef, SpuSession


CONNECT_ATTEMPT_S = 10.0  # one brpc connection attempt (~9 s) plus the retry interval


class PartyError(MpcacheError):
    """A party could not reach, or lost, its peers (one-line message, non-zero exit).
    Scripts leave with os._exit after printing it (experiments.cli.run_main): the link's
    destructor would wait for, or abort on, a peer that is gone."""

    hard_exit = True


def make_desc(parties: Parties, link_id: str = "mpcache"):
    """libspu link description: addresses, bounded connect retries and message timeouts, TLS."""
    from spu import libspu

    desc = libspu.link.Desc()
    desc.id = link_id
    for rank, addr in enumerate(parties.addresses):
        desc.add_party(f"party{rank}", addr)
    # SPU 0.9.5's brpc link spends ~9 s per connection attempt (measured), plus the interval
    desc.connect_retry_interval_ms = 1000
    desc.connect_retry_times = max(1, math.ceil(parties.connect_timeout_s / CONNECT_ATTEMPT_S))
    desc.recv_timeout_ms = int(parties.recv_timeout_s * 1000)
    desc.http_timeout_ms = int(parties.recv_timeout_s * 1000)
    return desc


def _tls(desc, parties: Parties, rank: int):
    if parties.tls is None:
        return
    files = parties.tls.for_rank(rank)
    desc.enable_ssl = True
    for opts in (desc.server_ssl_opts, desc.client_ssl_opts):
        opts.cert.certificate_path = files.cert
        opts.cert.private_key_path = files.key
        opts.verify.ca_file_path = files.ca
        opts.verify.verify_depth = 1


def _translate(exc: BaseException, what: str) -> PartyError:
    """One line from an SPU/yacl exception ("what: [file:line] message", then a stack)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    detail = next((re.sub(r"^\[[^\]]*\]\s*", "", ln) for ln in lines
                   if ln != "what:" and not ln.startswith(("#", "stacktrace"))),
                  type(exc).__name__)
    return PartyError(f"{what}: {detail[:300]}")


def connect(parties: Parties, rank: int):
    """This party's brpc link to all others (waits up to parties.connect_timeout_s)."""
    from spu import libspu

    if not 0 <= rank < parties.world_size:
        raise ConfigError(f"rank {rank} is not a party of the parties file "
                          f"(0..{parties.world_size - 1})")
    check_port_free(parties, rank)
    desc = make_desc(parties)
    _tls(desc, parties, rank)
    start = time.perf_counter()
    try:
        with capture_fd1():
            return libspu.link.create_brpc(desc, rank)
    except Exception as e:  # noqa: BLE001 - brpc raises plain RuntimeErrors
        raise _translate(e, f"party {rank} could not connect to its peers "
                         f"{[a for i, a in enumerate(parties.addresses) if i != rank]} "
                         f"within {time.perf_counter() - start:.0f} s") from None


def check_port_free(parties: Parties, rank: int) -> None:
    """A clear error when this party's listening port is taken (brpc would only log it)."""
    host, port = parties.host_port(rank)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a server would
    try:
        sock.bind((host if host != "localhost" else "127.0.0.1", port))
    except OSError as e:
        raise ConfigError(f"party {rank}: cannot listen on {parties.addresses[rank]}: "
                          f"{e.strerror} (port in use?)") from None
    finally:
        sock.close()


class PartySession(SpuSession):
    """This process's party: a brpc-linked SPU runtime (see the module docstring)."""

    def __init__(self, protocol: Protocol, parties: Parties, rank: int, link=None):
        from spu import api as spu_api
        from spu import libspu

        parties.check_world(protocol.world_size, protocol.name)
        self.protocol, self.parties, self.rank = protocol, parties, rank
        self.world_size = protocol.world_size
        self.profile_rank = rank
        self._libspu = libspu
        self.link = link if link is not None else connect(parties, rank)
        self._io = spu_api.Io(self.world_size, protocol.runtime_config())
        with capture_fd1():
            self._runtime = spu_api.Runtime(self.link, protocol.runtime_config(profile=True))
        self._runtimes = [self._runtime]
        self._setup_pending = protocol.kind == "CHEETAH"
        self._marked = {}  # see SpuSession.release
        self._checked = set()

    # ---- messages (JSON for control, raw bytes for shares: nothing a peer sends is
    # ever unpickled or executed) ----
    def _send_bytes(self, dst: int, data: bytes) -> None:
        try:
            self.link.send(dst, data)
        except Exception as e:  # noqa: BLE001
            raise _translate(e, f"party {self.rank} lost party {dst}") from None

    def _recv_bytes(self, src: int) -> bytes:
        try:
            return self.link.recv(src)
        except Exception as e:  # noqa: BLE001
            raise _translate(e, f"party {self.rank} got nothing from party {src} within "
                             f"{self.parties.recv_timeout_s:g} s (dead or stuck)") from None

    def _send(self, dst: int, obj) -> None:
        self._send_bytes(dst, json.dumps(obj).encode())

    def _recv(self, src: int):
        return json.loads(self._recv_bytes(src))

    def _send_share(self, dst: int, share) -> None:
        chunks = list(share.share_chunks)
        self._send(dst, len(chunks))
        self._send_bytes(dst, share.meta)
        for chunk in chunks:
            self._send_bytes(dst, chunk)

    def _recv_share(self, src: int):
        n = int(self._recv(src))
        share = self._libspu.Share()
        share.meta = self._recv_bytes(src)
        share.share_chunks = [self._recv_bytes(src) for _ in range(n)]
        return share

    def broadcast(self, obj, root: int):
        """obj from `root` to every party (a public value)."""
        if self.rank == root:
            for dst in range(self.world_size):
                if dst != root:
                    self._send(dst, obj)
            return obj
        return self._recv(root)

    def all_gather(self, obj) -> list:
        """Every party's obj, in rank order, at every party."""
        out = [None] * self.world_size
        out[self.rank] = obj
        for step in range(1, self.world_size):  # ring: send to rank+step, receive from rank-step
            self._send((self.rank + step) % self.world_size, obj)
            src = (self.rank - step) % self.world_size
            out[src] = self._recv(src)
        return out

    def agree(self, flag: bool, root: int) -> bool:
        return bool(self.broadcast(bool(flag), root))

    def close(self) -> None:
        try:
            self.link.stop_link()
        except Exception:  # noqa: BLE001 - a peer already gone
            pass

    # ---- compiling ----
    def compile(self, fn, args, arg_names, visibility=None, cached=()) -> Program:
        program = super().compile(fn, args, arg_names, visibility, cached)
        digest = hashlib.sha256(program.text.encode()).hexdigest()
        if digest not in self._checked:
            digests = self.all_gather(digest)
            if len(set(digests)) != 1:
                raise PartyError(f"parties compiled different programs for {arg_names} "
                                 "(different code, model or settings at some party)")
            self._checked.add(digest)
        return program

    # ---- data in and out ----
    def put(self, prefix: str, tree: Any, owner: Optional[int] = None,
            public: bool = False) -> SecretRef:
        """Like SpuSession.put, for this party: the owner (rank 0 deals values with no owner)
        shares the leaves and sends each peer its share; others pass a placeholder pytree of
        the same structure and receive theirs. Public values must be given at every party."""
        libspu = self._libspu
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        self.release([f"{prefix}:{i}" for i in range(len(leaves))])
        dealer = 0 if owner is None else owner
        names = []
        for i, leaf in enumerate(leaves):
            name = f"{prefix}:{i}"
            if public:
                share = self._io.make_shares(np.asarray(leaf), libspu.Visibility.VIS_PUBLIC)[
                    self.rank]
            elif self.rank == dealer:
                shares = self._io.make_shares(np.asarray(leaf), libspu.Visibility.VIS_SECRET,
                                              -1 if owner is None else owner)
                for dst, s in enumerate(shares):
                    if dst != self.rank:
                        self._send_share(dst, s)
                share = shares[self.rank]
            else:
                share = self._recv_share(dealer)
            self._runtime.set_var(name, share)
            names.append(name)
        return SecretRef(tuple(names), treedef)

    def reveal_to(self, ref: SecretRef, rank: int):
        """The values behind `ref` at party `rank` (None at the others, who send their shares
        and learn nothing)."""
        leaves = []
        for name in ref.names:
            s = self._runtime.get_var(name)
            if self.rank != rank:
                self._send_share(rank, s)
                continue
            leaves.append(self._io.reconstruct([s if src == self.rank else self._recv_share(src)
                                                for src in range(self.world_size)]))
        if self.rank != rank:
            return None
        return jax.tree_util.tree_unflatten(ref.tree, leaves)

    def reveal(self, ref: SecretRef) -> Any:
        """The values behind `ref` at every party."""
        out = None
        for rank in range(self.world_size):
            got = self.reveal_to(ref, rank)
            out = got if rank == self.rank else out
        return out

    # ---- running ----
    def run(self, program: Program, out_names: Sequence[str]):
        """Runs `program` at this party; returns (refs, Cost with every party's counters)."""
        self._marked.update(program.cached)
        start = time.perf_counter()
        try:
            with capture_fd1() as captured:
                self._runtime.run(program.executable)
        except Exception as e:  # noqa: BLE001
            raise _translate(e, f"party {self.rank} failed while running a program (a peer "
                             "died or timed out)") from None
        seconds = time.perf_counter() - start
        link, ops = parse_profile(captured[0])
        if link is None:
            raise RuntimeError("SPU printed no link counters; was profiling disabled?")
        gathered = self.all_gather(json.dumps([link.bytes_sent, link.bytes_recv, link.sends,
                                               link.recvs, seconds]))
        values = [json.loads(g) for g in gathered]
        parties = tuple(PartyCost(*v[:4]) for v in values)
        cost = Cost(parties, ops, max(v[4] for v in values), self.rank,
                    includes_setup=self._setup_pending)
        self._setup_pending = False
        return self._name_outputs(program, out_names), cost
