"""Running compiled jax functions on SPU with secrets that stay secret between runs.

A `SpuSession` holds one SPU runtime per party (threads linked in memory, like SPU's own
simulator) for its whole life. Inputs are secret-shared by their owner (model weights by the
model owner, prompt tokens by the user) and stay in the runtimes as named variables; programs
read and write those variables, so the KV cache never leaves secret-shared form between decode
steps. Only values explicitly `reveal`ed are reconstructed. Unlike `spu.utils.simulation`,
which reshares every input on every call, the persistent runtimes also pay CHEETAH's one-time
setup once, on their first run.

SEMI2K's Beaver cache (`Protocol.beaver_cache`): a program compiled with `cached=(arg names)`
marks those arguments with `spu.experimental.make_cached_var`, so the masked opening of each
(x - a) is kept by every party's runtime and reused by every later multiplication with the
same operand, in this run and in later runs: weights are opened once per session. SPU keys the
kept opening by the buffer's address (and view), so a marked variable must keep its buffer
while it is used, and its opening must be dropped before the buffer is freed: a new value at a
reused address would otherwise replay the stale opening and silently corrupt results. The
session tracks every marked variable and drops its opening (`drop_cached_var`, a program with
no communication) before `put`, `rename` or `delete` overwrites or frees it.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any, Callable, List, Optional, Sequence

import jax
import numpy as np

from protocols.cost import Cost, PartyCost, capture_fd1, parse_links, parse_profile
from protocols.registry import Protocol

SECRET, PUBLIC = "secret", "public"


@dataclasses.dataclass(frozen=True)
class Program:
    """A compiled SPU executable plus the pytree structure of its inputs and outputs."""

    executable: Any
    arg_names: tuple          # one variable-name prefix per positional argument
    in_trees: tuple
    out_trees: tuple          # one treedef per element of the returned tuple
    out_shapes: tuple
    text: str                 # the SPU IR (pphlo), for inspection by tests
    cached: tuple = ()        # (variable name, ShapeDtypeStruct) of the Beaver-cached inputs


@dataclasses.dataclass(frozen=True)
class SecretRef:
    """Handle to a pytree of variables living inside the party runtimes."""

    names: tuple
    tree: Any


def _run_parallel(fns: Sequence[Callable[[], Any]]) -> List[Any]:
    results: List[Any] = [None] * len(fns)
    errors: List[BaseException] = []

    def call(i):
        try:
            results[i] = fns[i]()
        except BaseException as e:  # re-raised in the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def ranked_counters(links: Sequence[PartyCost]) -> List[PartyCost]:
    """The parties' link counters with EACH counter ranked on its own, largest first: entry i
    holds the i-th largest bytes sent, bytes received, sends and receives (not one party's
    four counters). Without ranks in SPU's log a party cannot be followed from one program to
    the next, and a joint order (by bytes) let the head extrapolation of a block mix one
    party's sends at 2 heads with another's at 4 (ABY3's roles vary by run): ranked alone,
    entry 0 of a composed step is the sum of every block's busiest party per counter, an
    upper bound of the busiest party's total. Sums over the parties are unchanged."""
    cols = [sorted((getattr(p, f.name) for p in links), reverse=True)
            for f in dataclasses.fields(PartyCost)]
    return [PartyCost(*vals) for vals in zip(*cols)]


class SpuSession:
    """Persistent SPU runtimes for one protocol setting.

    Every run measures every party. In 2PC the profiled party (`profile_rank`, default 0)
    prints SPU's counters and the other's follow exactly (its sends are the profiled party's
    receives); `ops` are the profiled party's. With three parties all of them print: their
    link counters are NOT by rank (SPU 0.9.5's log lines carry no rank, and parties finishing
    together interleave them): each counter is ranked on its own, largest first
    (`ranked_counters`), and `ops` sum all parties'.
    ABY3 needs the one-run measurement: its truncation picks the parties' roles by a public
    random pivot, so one party's counters differ from run to run while their sum does not.
    """

    def __init__(self, protocol: Protocol, profile_rank: int = 0):
        from spu import api as spu_api
        from spu import libspu

        self.protocol = protocol
        self.world_size = protocol.world_size
        self.profile_rank = profile_rank
        self._libspu = libspu
        desc = libspu.link.Desc()
        # in-memory links time out after 30 s by default: a big CHEETAH block (the 7B
        # embedding's HE matmul) on a shared 2-core machine makes its peer wait longer
        desc.recv_timeout_ms = 1_800_000
        for rank in range(self.world_size):
            desc.add_party(f"id_{rank}", f"thread_{rank}")
        self._io = spu_api.Io(self.world_size, protocol.runtime_config())

        def make(rank):
            link = libspu.link.create_mem(desc, rank)
            profile = rank == profile_rank or self.world_size > 2
            return spu_api.Runtime(link, protocol.runtime_config(profile=profile))

        with capture_fd1():  # SPU logs thread-pool creation to fd 1; keep stdout clean
            self._runtimes = _run_parallel([lambda r=r: make(r) for r in range(self.world_size)])
        # CHEETAH's first run also pays its one-time setup; SEMI2K's dealer and ABY3 have none
        self._setup_pending = protocol.kind == "CHEETAH"
        self._marked = {}  # Beaver-cached variable name -> ShapeDtypeStruct

    # ---- compiling ----
    @property
    def beaver_cache(self) -> bool:
        """Whether programs mark their `cached` arguments (SEMI2K with the cache on)."""
        return self.protocol.beaver_cache

    def compile(self, fn: Callable, args: Sequence[Any], arg_names: Sequence[str],
                visibility: Optional[Sequence[str]] = None, cached: Sequence[str] = ()
                ) -> Program:
        """Compiles fn(*args) for SPU. `args` are pytrees of arrays or ShapeDtypeStructs;
        `arg_names[i]` names the variables of argument i; `visibility[i]` is "secret"
        (default) or "public" (a value every party may know, such as a public length);
        `cached`: names of the (secret) arguments that stay fixed across runs, opened once
        under SEMI2K's Beaver cache (ignored by protocols without it)."""
        from spu.utils import frontend as spu_fe

        libspu = self._libspu
        visibility = list(visibility or [SECRET] * len(args))
        specs = [jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype),
                                        arg) for arg in args]
        names, vis, trees, marked = [], [], [], []
        for arg, spec, prefix, v in zip(args, specs, arg_names, visibility):
            leaves, tree = jax.tree_util.tree_flatten(spec)
            trees.append(tree)
            names += [f"{prefix}:{i}" for i in range(len(leaves))]
            vis += [libspu.Visibility.VIS_PUBLIC if v == PUBLIC else libspu.Visibility.VIS_SECRET
                    ] * len(leaves)
            if self.beaver_cache and prefix in cached:
                marked += [(f"{prefix}:{i}", leaf) for i, leaf in enumerate(leaves)]
        if marked:
            fn = _marking(fn, [name in cached for name in arg_names])
        out_holder = {}

        def out_names(flat):
            out_holder["n"] = len(flat)
            return [f"__out:{i}" for i in range(len(flat))]

        with capture_fd1():
            executable, out_info = spu_fe.compile(spu_fe.Kind.JAX, fn, specs, {}, names, vis,
                                                  out_names)
        if not isinstance(out_info, tuple):
            raise TypeError("SPU programs must return a tuple (one element per output name)")
        out_trees = tuple(jax.tree_util.tree_structure(o) for o in out_info)
        leaves = jax.tree_util.tree_leaves(out_info)
        return Program(executable, tuple(arg_names), tuple(trees), out_trees,
                       tuple((tuple(o.shape), o.dtype) for o in leaves),
                       executable.code.decode("utf-8", "replace"), tuple(marked))

    # ---- the Beaver cache ----
    def release(self, names: Sequence[str]) -> None:
        """Drops the kept Beaver openings of the marked variables among `names` (at every
        party; no communication). Call before their buffers are overwritten or freed; `put`,
        `rename` and `delete` do."""
        names = [n for n in dict.fromkeys(names) if n in self._marked]
        if not names:
            return
        from spu.experimental import drop_cached_var

        from spu.utils import frontend as spu_fe

        specs = [self._marked[n] for n in names]
        outs = [f"__released:{i}" for i in range(len(names))]  # not "__out": see rename
        with capture_fd1():  # the program reads the marked variables themselves, by name
            executable, _ = spu_fe.compile(
                spu_fe.Kind.JAX, lambda *xs: tuple(drop_cached_var(x) for x in xs), specs, {},
                list(names), [self._libspu.Visibility.VIS_SECRET] * len(names),
                lambda flat: outs)
        self._run_quiet(executable)
        for out in outs:
            for rt in self._runtimes:
                rt.del_var(out)
        for n in names:
            del self._marked[n]

    # ---- data in and out ----
    def put(self, prefix: str, tree: Any, owner: Optional[int] = None,
            public: bool = False) -> SecretRef:
        """Shares a pytree of arrays as variables `prefix:i`, secret-shared by `owner`
        (that party's rank), or as a public value every party holds."""
        libspu = self._libspu
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        self.release([f"{prefix}:{i}" for i in range(len(leaves))])
        names = []
        for i, leaf in enumerate(leaves):
            arr = np.asarray(leaf)
            if public:
                shares = self._io.make_shares(arr, libspu.Visibility.VIS_PUBLIC)
            else:
                shares = self._io.make_shares(arr, libspu.Visibility.VIS_SECRET,
                                              -1 if owner is None else owner)
            name = f"{prefix}:{i}"
            for rt, share in zip(self._runtimes, shares):
                rt.set_var(name, share)
            names.append(name)
        return SecretRef(tuple(names), treedef)

    def _run_quiet(self, executable) -> None:
        """Runs an executable at every party, its counters discarded (no communication)."""
        with capture_fd1():
            _run_parallel([lambda rt=rt: rt.run(executable) for rt in self._runtimes])

    def reveal(self, ref: SecretRef) -> Any:
        """Reconstructs the values behind `ref` (e.g. the next token, for its owner)."""
        leaves = [self._io.reconstruct([rt.get_var(n) for rt in self._runtimes])
                  for n in ref.names]
        return jax.tree_util.tree_unflatten(ref.tree, leaves)

    def reveal_to(self, ref: SecretRef, rank: int) -> Any:
        """The values behind `ref` for party `rank` (in-process: the caller speaks for it)."""
        return self.reveal(ref)

    def agree(self, flag: bool, root: int) -> bool:
        """A public decision taken by party `root` (in-process: the caller's)."""
        return bool(flag)

    def close(self) -> None:
        """Nothing to release in-process (see protocols.distributed.PartySession)."""

    def rename(self, ref: SecretRef, prefix: str) -> SecretRef:
        """Moves variables to new names (a local copy inside each party, no communication)."""
        names = []
        self.release(list(ref.names) + [f"{prefix}:{i}" for i in range(len(ref.names))])
        for i, old in enumerate(ref.names):
            new = f"{prefix}:{i}"
            for rt in self._runtimes:
                rt.set_var(new, rt.get_var(old))
                if new != old:
                    rt.del_var(old)
            names.append(new)
        return SecretRef(tuple(names), ref.tree)

    def delete(self, ref: SecretRef) -> None:
        self.release(ref.names)
        for name in ref.names:
            for rt in self._runtimes:
                rt.del_var(name)

    # ---- running ----
    def warm_up(self) -> Cost:
        """Pays one-time setup (CHEETAH: HE keys, OT base) with a small program that uses
        matmul, multiplication, comparison, exp and division, and returns its cost: the first
        run minus a steady second run. Call before measuring; later runs are steady state."""
        import jax.numpy as jnp

        def probe(a, b):
            x = a @ b
            return (jnp.exp(-jnp.abs(x)) / (1.0 + jnp.maximum(x, 0.0) * x),)

        a = np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8)
        prog = self.compile(probe, (a, a), ("__warm_a", "__warm_b"))
        self.put("__warm_a", a), self.put("__warm_b", a)
        (out,), first = self.run(prog, ("__warm_out",))
        (out,), steady = self.run(prog, ("__warm_out",))
        self.delete(out)
        return first - steady

    def run(self, program: Program, out_names: Sequence[str]):
        """Runs `program` on the variables named by its `arg_names` (put them first).

        Returns (a tuple of SecretRefs, output j's variables renamed `out_names[j]:i`; Cost).
        """
        self._marked.update(program.cached)
        start = time.perf_counter()
        with capture_fd1() as captured:
            _run_parallel([lambda rt=rt: rt.run(program.executable) for rt in self._runtimes])
        seconds = time.perf_counter() - start
        link, ops = parse_profile(captured[0])
        if link is None:
            raise RuntimeError("SPU printed no link counters; was profiling disabled?")
        if self.world_size > 2:
            parties = ranked_counters(parse_links(captured[0]))
            if len(parties) != self.world_size:
                raise RuntimeError(f"expected {self.world_size} parties' link counters, "
                                   f"SPU printed {len(parties)}")
        else:
            parties = [None] * self.world_size
            parties[self.profile_rank] = link
            parties[1 - self.profile_rank] = PartyCost(link.bytes_recv, link.bytes_sent,
                                                       link.recvs, link.sends)
        cost = Cost(tuple(parties), ops, seconds,
                    self.profile_rank if self.world_size == 2 else None,
                    includes_setup=self._setup_pending)
        self._setup_pending = False
        return self._name_outputs(program, out_names), cost

    def _name_outputs(self, program: Program, out_names: Sequence[str]) -> tuple:
        """A run's outputs ("__out:i") renamed `out_names[j]:i`, one SecretRef per output."""
        refs, offset = [], 0
        for tree, prefix in zip(program.out_trees, out_names):
            n = tree.num_leaves
            out = SecretRef(tuple(f"__out:{i}" for i in range(offset, offset + n)), tree)
            refs.append(self.rename(out, prefix))
            offset += n
        return tuple(refs)


def _marking(fn: Callable, marks: Sequence[bool]) -> Callable:
    """fn with the arguments flagged in `marks` passed through make_cached_var (every leaf)."""
    from spu.experimental import make_cached_var

    def marked(*args):
        return fn(*(jax.tree_util.tree_map(make_cached_var, a) if m else a
                    for a, m in zip(args, marks)))
    return marked
