"""Communication counters of SPU runs, read from the runtime's profile log.

SPU 0.9.5 has no Python API for its counters. With `enable_pphlo_profile` the C++ runtime of a
party prints, after each run, one line per op kind and a `Link details` total to file
descriptor 1; we capture fd 1 around the run and parse them. The lines carry no rank, and
parties that finish together interleave them: with three parties profiling (ABY3 needs it:
its truncation draws the parties' roles from a public random pivot, so one party's counters
are only consistent with the others' within one run), `parse_links` returns the three
`Link details` lines in the order printed, and the per-op lines sum over the parties.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
import tempfile
from typing import Dict, List, Optional, Tuple

_OP = re.compile(r"- (\S+), executed (\d+) times, duration ([\d.e+-]+)s, send bytes (\d+) "
                 r"recv bytes (\d+), send actions (\d+), recv actions (\d+)")
_LINK = re.compile(r"Link details: total send bytes (\d+), recv bytes (\d+), "
                   r"send actions (\d+), recv actions (\d+)")


@dataclasses.dataclass(frozen=True)
class OpCost:
    """One op kind's counters for the profiled party."""

    calls: int
    seconds: float
    bytes_sent: int
    bytes_recv: int
    sends: int


@dataclasses.dataclass(frozen=True)
class PartyCost:
    bytes_sent: int
    bytes_recv: int
    sends: int
    recvs: int


@dataclasses.dataclass(frozen=True)
class Cost:
    """What one program run cost.

    parties: per-party link counters (index = rank; in-process 3PC runs: busiest first, see
    protocols.session.SpuSession);
    ops: per-op breakdown of party `ops_rank` (None: all parties summed);
    seconds: wall-clock of the run (all parties as threads on this machine);
    includes_setup: True for the first run of a CHEETAH runtime, which also pays its one-time
    HE key and OT setup.
    """

    parties: Tuple[Optional[PartyCost], ...]
    ops: Dict[str, OpCost]
    seconds: float
    ops_rank: Optional[int] = 0
    includes_setup: bool = False

    @property
    def bytes_sent(self) -> List[Optional[int]]:
        return [p.bytes_sent if p else None for p in self.parties]

    @property
    def bytes_recv(self) -> List[Optional[int]]:
        return [p.bytes_recv if p else None for p in self.parties]

    @property
    def sends(self) -> List[Optional[int]]:
        return [p.sends if p else None for p in self.parties]

    def __add__(self, other: "Cost") -> "Cost":
        parties = tuple(None if a is None or b is None else
                        PartyCost(a.bytes_sent + b.bytes_sent, a.bytes_recv + b.bytes_recv,
                                  a.sends + b.sends, a.recvs + b.recvs)
                        for a, b in zip(self.parties, other.parties))
        ops = dict(self.ops)
        for name, o in other.ops.items():
            a = ops.get(name)
            ops[name] = o if a is None else OpCost(a.calls + o.calls, a.seconds + o.seconds,
                                                   a.bytes_sent + o.bytes_sent,
                                                   a.bytes_recv + o.bytes_recv, a.sends + o.sends)
        return Cost(parties, ops, self.seconds + other.seconds, self.ops_rank,
                    self.includes_setup or other.includes_setup)

    def __sub__(self, other: "Cost") -> "Cost":
        """Counter difference (e.g. a first run minus a steady run = one-time setup)."""
        parties = tuple(None if a is None or b is None else
                        PartyCost(a.bytes_sent - b.bytes_sent, a.bytes_recv - b.bytes_recv,
                                  a.sends - b.sends, a.recvs - b.recvs)
                        for a, b in zip(self.parties, other.parties))
        return Cost(parties, {}, self.seconds - other.seconds, self.ops_rank, False)

    def to_json(self) -> dict:
        return {"bytes_sent": self.bytes_sent, "bytes_recv": self.bytes_recv,
                "sends": self.sends, "seconds": self.seconds, "ops_rank": self.ops_rank,
                "includes_setup": self.includes_setup,
                "ops": {k: dataclasses.asdict(v) for k, v in sorted(self.ops.items())}}


def zero_cost(world_size: int) -> Cost:
    return Cost(tuple(PartyCost(0, 0, 0, 0) for _ in range(world_size)), {}, 0.0)


def parse_profile(text: str) -> Tuple[Optional[PartyCost], Dict[str, OpCost]]:
    """Parses one party's profile lines; sums several runs if present."""
    link = None
    for m in _LINK.finditer(text):
        vals = [int(v) for v in m.groups()]
        link = PartyCost(*vals) if link is None else PartyCost(
            link.bytes_sent + vals[0], link.bytes_recv + vals[1], link.sends + vals[2],
            link.recvs + vals[3])
    ops: Dict[str, OpCost] = {}
    for m in _OP.finditer(text):
        name, calls, secs, sb, rb, sa, _ = m.groups()
        prev = ops.get(name, OpCost(0, 0.0, 0, 0, 0))
        ops[name] = OpCost(prev.calls + int(calls), prev.seconds + float(secs),
                           prev.bytes_sent + int(sb), prev.bytes_recv + int(rb),
                           prev.sends + int(sa))
    return link, ops


def parse_links(text: str) -> List[PartyCost]:
    """Every `Link details` line of `text`, in the order printed (one per profiled party)."""
    return [PartyCost(*(int(v) for v in m.groups())) for m in _LINK.finditer(text)]


@contextlib.contextmanager
def capture_fd1():
    """Redirects file descriptor 1 (where SPU's C++ logger writes) to a temp file.

    Yields a list that receives the captured text when the block exits.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    result: List[str] = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 1)
        try:
            yield result
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
            tmp.seek(0)
            result.append(tmp.read().decode("utf-8", "replace"))
