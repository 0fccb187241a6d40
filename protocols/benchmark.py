"""Measuring blocks under SPU with every party's counters, caching them on disk, and composing
a whole decode step from them.

    meter = BlockMeter(get_protocol("aby3"), cache_dir="runs/block_cache")
    counters = meter.measure(block)            # all parties; cached by exact configuration
    step = compose_step({h: [(block, meter.measure(block)) for block in blocks_for(h)]
                         for h in (2, 4)}, target_heads=32)

Composition rules (each one is printed by run_spu.py and recorded in its JSON):
  * a block is measured once and multiplied by `block.count` (layers that run it);
  * attention blocks measured on fewer KV heads than the model has are extrapolated linearly in
    the number of heads from two measured head counts (`extrapolate`), kept between the larger
    measurement and its proportional scaling (tests check the fit against a direct run);
  * the static step beyond the measured prompt lengths is extrapolated in length
    (`extrapolate_seq`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from protocols.blocks import MODEL, USER, Block, random_inputs, with_frozen_rows
from protocols.registry import Protocol

FORMAT = 3  # bump when what a cached measurement means changes
# Blocks faster than REPEAT_BELOW_S run REPEATS times and keep the median of every counter:
# CHEETAH refills its silent-OT buffer (measured: ~1-2 MB and ~2,200 sends per refill) inside
# whichever run drains it, so one run of a small block may or may not carry a refill, and a
# refill multiplied by 32 layers (or by a head extrapolation) would swamp the block's own
# rounds (a 4-head softmax over 8k entries: ~700 sends steady). A median keeps a refill only
# where most runs of the block trigger one (blocks moving tens of MB per run); run_spu.py
# says so. ABY3's per-party counters also vary a few % from run to run (its truncation draws
# the parties' roles from a public random pivot; their sum is fixed): each counter comes
# ranked on its own, largest first (SpuSession.run), and each position keeps its median.
REPEATS, REPEAT_BELOW_S = 3, 10.0
# SEMI2K's Beaver cache (Protocol.beaver_cache): a block's fixed operands (weights; KV rows
# written before the step) are opened by its first run and kept; the block's counters are
# those of the runs after it on the same runtime and the same input buffers (the steady step),
# and first minus steady is kept apart as the block's one-time openings.
PUBLIC_ARGS = ("position",)  # block arguments that every party knows (as in decode_step)


@dataclasses.dataclass(frozen=True)
class Counters:
    """Counters of a run (or a sum of runs), one entry per party; seconds: wall-clock;
    refill_sends: the part of `sends` that is CHEETAH silent-OT refill bursts
    (protocols.refill; None: not known, counted as none)."""

    bytes_sent: Tuple[float, ...]
    bytes_recv: Tuple[float, ...]
    sends: Tuple[float, ...]
    seconds: float
    refill_sends: Optional[Tuple[float, ...]] = None

    @property
    def refills(self) -> Tuple[float, ...]:
        return self.refill_sends or tuple(0 for _ in self.sends)

    @staticmethod
    def zero(world_size: int) -> "Counters":
        z = (0,) * world_size
        return Counters(z, z, z, 0.0)

    @staticmethod
    def of(cost) -> "Counters":
        """From a protocols.cost.Cost with every party measured."""
        if any(p is None for p in cost.parties):
            raise ValueError("every party's counters are needed")
        return Counters(tuple(cost.bytes_sent), tuple(cost.bytes_recv), tuple(cost.sends),
                        cost.seconds)

    def __add__(self, o: "Counters") -> "Counters":
        return Counters(*(tuple(a + b for a, b in zip(x, y)) for x, y in
                          ((self.bytes_sent, o.bytes_sent), (self.bytes_recv, o.bytes_recv),
                           (self.sends, o.sends))), self.seconds + o.seconds,
                        _sum_refills(self, o))

    def scale(self, f: float) -> "Counters":
        return Counters(tuple(a * f for a in self.bytes_sent),
                        tuple(a * f for a in self.bytes_recv), tuple(a * f for a in self.sends),
                        self.seconds * f,
                        None if self.refill_sends is None else
                        tuple(a * f for a in self.refill_sends))

    @property
    def total_bytes(self) -> float:
        return float(sum(self.bytes_sent))

    def to_json(self) -> dict:
        out = {"bytes_sent": [round(b) for b in self.bytes_sent],
               "bytes_recv": [round(b) for b in self.bytes_recv],
               "sends": [round(s) for s in self.sends], "seconds": self.seconds}
        if self.refill_sends is not None:
            out["refill_sends"] = [round(s) for s in self.refill_sends]
        return out

    @staticmethod
    def from_json(d: dict) -> "Counters":
        refill = d.get("refill_sends")
        return Counters(tuple(d["bytes_sent"]), tuple(d["bytes_recv"]), tuple(d["sends"]),
                        float(d["seconds"]), None if refill is None else tuple(refill))


def _sum_refills(a: Counters, b: Counters):
    if a.refill_sends is None and b.refill_sends is None:
        return None
    return tuple(x + y for x, y in zip(a.refills, b.refills))


def extrapolate(measured: Dict[int, Counters], heads: int) -> Counters:
    """Counters at `heads` KV heads: the measurement itself if taken there, else the line
    through the two largest measured head counts (an extrapolation: label it), kept between
    the larger measurement and its proportional scaling (heads / measured heads)."""
    if heads in measured:
        return measured[heads]
    if len(measured) < 2:
        raise ValueError("extrapolation needs measurements at two head counts")
    a, b = sorted(measured)[-2:]
    ca, cb = measured[a], measured[b]
    t = (heads - a) / (b - a)
    grow = heads / b

    def line(x, y):
        # between "does not grow with heads" and "grows in proportion to heads": a line
        # through two noisy points must not leave what batched ops can do
        return tuple(min(max(u + t * (v - u), v), v * grow) for u, v in zip(x, y))

    refill = None
    if ca.refill_sends is not None or cb.refill_sends is not None:  # refills follow traffic
        refill = tuple(min(r, s) for r, s in zip(line(ca.refills, cb.refills),
                                                  line(ca.sends, cb.sends)))
    return Counters(line(ca.bytes_sent, cb.bytes_sent), line(ca.bytes_recv, cb.bytes_recv),
                    line(ca.sends, cb.sends), line((ca.seconds,), (cb.seconds,))[0], refill)


class BlockMeter:
    """Runs blocks under one protocol and returns every party's counters.

    Every party's counters come from one run (protocols.session.SpuSession). CHEETAH
    sessions pay their one-time setup in `warm_up` first (reported as `setup`), so block
    counters are steady state. Measurements are cached in `cache_dir` as JSON keyed by the
    compiled program text, the protocol setting, the input owners and the SPU version (exact
    configuration).
    """

    def __init__(self, protocol: Protocol, cache_dir: Optional[str] = None, cluster=None):
        self.protocol = protocol
        self.cluster = cluster  # protocols.party.Cluster: measure on real parties instead
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._sessions = None
        self.setup: Optional[Counters] = None
        self.hits = self.misses = 0
        self.last_one_time: Optional[Counters] = None  # of the last measure()d block

    # ---- sessions ----
    def _ensure_sessions(self):
        if self._sessions is not None:
            return self._sessions
        if self.cluster is not None:
            self._sessions = []
            if self.protocol.kind == "CHEETAH":
                self.setup = Counters.of(self.cluster.warm_up(self.protocol))
                self._store(self._setup_key(), self.setup)
            return self._sessions
        from protocols.session import SpuSession

        self._sessions = [SpuSession(self.protocol)]
        if self.protocol.kind == "CHEETAH":
            self.setup = Counters.of(self._sessions[0].warm_up())
            self._store(self._setup_key(), self.setup)
        return self._sessions

    def setup_cost(self) -> Optional[Counters]:
        """CHEETAH's one-time setup (HE keys, OT base): cached, else measured now."""
        if self.protocol.kind != "CHEETAH":
            return None
        if self.setup is None:
            self.setup = self._load(self._setup_key())
        if self.setup is None:
            self._ensure_sessions()
        return self.setup

    # ---- disk cache ----
    def _key(self, text: str, block: Block) -> str:
        key = {"format": FORMAT, "program": text, "owners": block.owners,
               "protocol": self.protocol.cache_key(), "spu": _spu_version()}
        if steady_only(self.protocol, block):
            key["runs"] = "steady: after a first run on the same buffers (Beaver cache warm)"
        if self.cluster is not None:  # real parties: same counters, other seconds
            key["backend"] = "brpc"
        elif self.protocol.world_size > 2:  # all parties from one run, each counter ranked
            key["parties"] = "one run, each counter ranked"
        blob = json.dumps(key, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _setup_key(self) -> str:
        key = {"format": FORMAT, "setup": self.protocol.cache_key(),
               "spu": _spu_version()}
        if self.cluster is not None:
            key["backend"] = "brpc"
        blob = json.dumps(key, sort_keys=True)
        return "setup-" + hashlib.sha256(blob.encode()).hexdigest()

    def _load(self, key: str) -> Optional[Counters]:
        if self.cache_dir is None:
            return None
        path = self.cache_dir / f"{key}.json"
        try:
            return Counters.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError):
            return None

    def _store(self, key: str, counters: Counters) -> None:
        if self.cache_dir is None:
            return
        from protocols.cli import write_json_atomic

        write_json_atomic(str(self.cache_dir / f"{key}.json"), counters.to_json())

    # ---- measuring ----
    def compile(self, block: Block):
        from protocols.session import SpuSession

        compiler = (self._sessions or [None])[0] or _Compiler.get(self.protocol, SpuSession)
        return compile_block(compiler, block)

    def measure(self, block: Block) -> Counters:
        """Every party's counters for one run of `block` (cached on disk); with the Beaver
        cache, of a steady run, its one-time openings in `last_one_time`."""
        program = self.compile(block)
        key = self._key(program.text, block)
        cached = self._load(key)
        steady = steady_only(self.protocol, block)
        self.last_one_time = self._load("onetime-" + key) if steady else None
        if cached is not None and (self.last_one_time is not None or not steady):
            self.hits += 1
            return _with_refills(self.protocol, cached, None)
        self.misses += 1
        if self.cluster is not None:
            self._ensure_sessions()  # CHEETAH: setup first
            recipe = block.recipe
            if recipe is None:
                raise ValueError(f"block {block.name} has no recipe to send to the parties")
            runs = self.cluster.measure(self.protocol, *recipe)
        else:
            runs = measure_runs(self._ensure_sessions()[0], block, {MODEL: 0, USER: 1},
                                program)
        if steady:  # the first run opened the fixed operands
            first, runs = Counters.of(runs[0]), runs[1:]
        counters = _with_refills(self.protocol, Counters.of(_median_cost(runs)), runs)
        if steady:
            self.last_one_time = first + counters.scale(-1.0)
            self._store("onetime-" + key, self.last_one_time)
        self._store(key, counters)
        return counters


def steady_only(protocol: Protocol, block: Block) -> bool:
    """Whether `block` is measured steady, its fixed operands opened by a first run (SEMI2K's
    Beaver cache; see REPEATS above)."""
    return protocol.beaver_cache and bool(block.fixed or block.frozen_rows is not None)


def compile_block(session, block: Block):
    """The block's program for `session`'s protocol: with the Beaver cache, its fixed
    operands (weights, frozen KV rows) marked as cached."""
    from protocols.session import PUBLIC, SECRET

    if steady_only(session.protocol, block):
        block = with_frozen_rows(block)
    vis = [PUBLIC if n in PUBLIC_ARGS else SECRET for n in block.arg_names]
    cached = block.fixed + tuple(n for n in block.arg_names if n.endswith("_frozen"))
    return session.compile(block.fn, block.args, block.arg_names, vis, cached=cached)


def measure_runs(session, block: Block, owners: dict, program=None) -> list:
    """Runs `block` on `session` (once, or REPEATS times when it is fast) with random inputs
    shared by their owners ({MODEL: rank, USER: rank}); returns the Costs. With the Beaver
    cache (`steady_only`) a first run opens the fixed operands and comes first in the list,
    then the steady runs on the same input buffers. The same calls at every party of a
    distributed run (protocols.party)."""
    if program is None:
        program = compile_block(session, block)
    warm = steady_only(session.protocol, block)
    if warm:
        block = with_frozen_rows(block)
    values = random_inputs(block)
    inputs = [session.put(name, value, owner=owners.get(owner), public=name in PUBLIC_ARGS)
              for name, owner, value in zip(block.arg_names, block.owners, values)]
    outs = [f"__block_out{i}" for i in range(len(program.out_trees))]
    party_runs = []

    def wanted():
        steady = party_runs[1:] if warm else party_runs
        return (1 if warm else 0) + (REPEATS if steady and steady[0].seconds < REPEAT_BELOW_S
                                     else 1)

    while len(party_runs) < wanted():
        refs, cost = session.run(program, outs)
        for ref in refs:
            session.delete(ref)
        party_runs.append(cost)
    for ref in inputs:  # free the shares now (and the kept openings): 3PC holds one session
        session.delete(ref)  # per party
    return party_runs


class _Compiler:
    """A session used only to compile (compiling needs no runtime state)."""

    _cache: dict = {}

    @classmethod
    def get(cls, protocol, session_cls):
        if protocol not in cls._cache:
            cls._cache[protocol] = session_cls(protocol)
        return cls._cache[protocol]


def _median_cost(costs):
    """A Cost whose party counters are the per-field medians of `costs` (same program)."""
    import numpy as np

    from protocols.cost import PartyCost

    if len(costs) == 1:
        return costs[0]
    parties = []
    for i, p in enumerate(costs[0].parties):
        if p is None:
            parties.append(None)
            continue
        fields = [[getattr(c.parties[i], f) for c in costs] for f in
                  ("bytes_sent", "bytes_recv", "sends", "recvs")]
        parties.append(PartyCost(*(int(np.median(v)) for v in fields)))
    return dataclasses.replace(costs[0], parties=tuple(parties),
                               seconds=float(np.median([c.seconds for c in costs])))


def _with_refills(protocol: Protocol, counters: Counters, costs) -> Counters:
    """CHEETAH: `counters` with their refill sends (protocols.refill) from the block's runs
    `costs`, or from the two-party asymmetry alone (None: a cached entry without them)."""
    from protocols import refill

    if protocol.kind != "CHEETAH" or counters.refill_sends is not None:
        return counters
    if costs is None:
        found = refill.asymmetric_refill(counters.sends)
    else:
        found = refill.block_refill([c.sends for c in costs], counters.sends)
    return dataclasses.replace(counters, refill_sends=tuple(found))


def _spu_version() -> str:
    from importlib.metadata import version

    return version("spu")


def compose_step(measured: Dict, target_heads: int) -> Dict[str, Tuple[Block, Counters]]:
    """{block name: (block, counters x block.count)} at `target_heads` KV heads, from
    {variant: [(block, counters)]} with variant None (full-size dense blocks) or a measured
    head count (extrapolated when the target was not measured)."""
    by_name: Dict[str, Tuple[Block, dict]] = {}
    for heads, pairs in measured.items():
        for block, c in pairs:
            by_name.setdefault(block.name, (block, {}))[1][heads] = c
    return {name: (block, (cs[None] if None in cs else extrapolate(cs, target_heads))
                   .scale(block.count))
            for name, (block, cs) in by_name.items()}


def compose_static(measured: Dict, seq: int, target_heads: int, line: bool = False):
    """The static step at prompt length `seq`, from {(length, heads): [(block, counters)]}:
    extrapolated in heads, then in length where `seq` was not measured (`line`: a step
    ranked inside blocks, see extrapolate_seq)."""
    by_name: Dict[str, Tuple[Block, dict]] = {}
    for (length, heads), pairs in measured.items():
        for block, c in pairs:
            by_name.setdefault(block.name, (block, {}))[1].setdefault(length, {})[heads] = c
    out = {}
    for name, (block, by_len) in by_name.items():
        at_heads = {t: extrapolate(cs, target_heads) for t, cs in by_len.items()}
        out[name] = (block, extrapolate_seq(at_heads, seq, line).scale(block.count))
    return out


def total(parts, world_size: int) -> Counters:
    """Sum of the counters of {name: (block, counters)}."""
    out = Counters.zero(world_size)
    for _, c in parts.values():
        out = out + c
    return out


def head_samples(target: int, samples: Iterable[int]) -> List[int]:
    """KV-head counts to measure: the target itself when it is at most the largest sample,
    else the two largest samples (then extrapolated)."""
    samples = sorted(set(int(s) for s in samples))
    if target <= samples[-1]:
        return [target]
    if len(samples) < 2:
        raise ValueError("give two head counts to extrapolate from")
    return samples[-2:]


def extrapolate_seq(measured: Dict[int, Counters], seq: int, line: bool = False) -> Counters:
    """Counters at prompt length `seq` from measurements at shorter lengths (an
    extrapolation: label it). Bytes and seconds: least squares a*T + b*T^2 with a, b >= 0 (the
    static step's window scores and top-k grow with T, its compaction matrix with keep x T);
    with `line` (a step ranked inside blocks: the same work per block, blocks growing with T)
    the least-squares line a + b*T, b >= 0 (over lengths already cut into blocks, where the
    blocks' widths still grow a little, a T^2 term would bend it up: 13% over at 512 tokens
    from 128 and 256, tests/test_run_spu.py). Sends: those of the longest measured length
    (its ops are batched over the prompt, so rounds do not grow with it); with `line` in
    proportion to T (SPU's top-k runs row by row, and every block is a row)."""
    import numpy as np

    if seq in measured:
        return measured[seq]
    if len(measured) < 2:
        raise ValueError("length extrapolation needs at least two measured lengths")
    xs = np.array(sorted(measured), float)
    cs = [measured[int(x)] for x in xs]
    if line:
        basis = np.stack([np.ones_like(xs), xs], axis=1)
        target = np.array([1.0, float(seq)])
    else:
        basis = np.stack([xs, xs ** 2], axis=1)
        target = np.array([seq, float(seq) ** 2])

    def fit(vals):
        vals = np.asarray(vals, float)
        if line:
            coef, *_ = np.linalg.lstsq(basis, vals, rcond=None)
            return max(float(target @ coef), float(vals[-1])) if coef[1] >= 0 else float(vals[-1])
        best = None
        for cols in ([0, 1], [0], [1]):  # non-negative least squares over 2 columns
            coef, *_ = np.linalg.lstsq(basis[:, cols], vals, rcond=None)
            if (coef >= 0).all():
                err = np.sum((basis[:, cols] @ coef - vals) ** 2)
                if best is None or err < best[0]:
                    best = (err, float(target[cols] @ coef))
        return best[1] if best else 0.0

    def per_party(get):
        return tuple(fit([get(c)[p] for c in cs]) for p in range(len(get(cs[0]))))

    # a block-local step's sends grow with its blocks (SPU's top-k runs row by row, a block
    # a row): in proportion to T (least squares through 0; SPU's quick-select rounds vary
    # from run to run, and an affine line through two noisy lengths came out 11-26% low at
    # 4x the shorter one, this 3-20% high: tests/test_run_spu.py)
    sends = tuple(round(float(xs @ np.asarray([c.sends[p] for c in cs], float)) /
                        float(xs @ xs) * seq) for p in range(len(cs[0].sends))) \
        if line else cs[-1].sends
    return Counters(per_party(lambda c: c.bytes_sent), per_party(lambda c: c.bytes_recv),
                    sends, fit([c.seconds for c in cs]))


def static_lengths(seq: int, max_seq: int, block: int = 0) -> List[int]:
    """Prompt lengths at which the static step is measured: `seq` itself when affordable,
    else max_seq / 4, max_seq / 2 and max_seq (then extrapolated to seq). `block` > 0: the
    step ranks inside blocks of about `block` entries at `seq` (`Policy.static_block`), so its
    cost grows linearly in T, one block at a time; it is measured at two lengths that are
    already cut into blocks (at least 2 x block each: max_seq / 2 and max_seq, or 2 x block
    and 4 x block when max_seq is shorter), never at a length still ranked globally, whose
    keep x T one-hot would bend the fit."""
    if seq <= max_seq:
        return [seq]
    if block:
        lo = max(2 * block, max_seq // 2)
        hi = max(2 * lo, max_seq)
        return [seq] if hi >= seq else [lo, hi]
    return [max_seq // 4, max_seq // 2, max_seq]
