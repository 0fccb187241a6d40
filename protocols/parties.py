"""The parties file: where each MPC party listens, who owns what, timeouts, optional TLS.

    {"parties": ["127.0.0.1:61920", "127.0.0.1:61921"], "model_owner": 0, "data_owner": 1,
     "connect_timeout_s": 30, "recv_timeout_s": 60,
     "tls": {"cert": "party{rank}.crt", "key": "party{rank}.key", "ca": "ca.crt"}}

One address per party (rank = index). `model_owner` holds the weights, `data_owner` the
prompt (and drives the run: it sends the public job description to the others). Timeouts
bound how long a party waits to reach its peers and for any single message, so a dead or
unreachable peer ends the run with an error instead of a hang (the connect bound is counted in
whole brpc connection attempts, ~10 s each in SPU 0.9.5). TLS paths may contain
`{rank}`; relative paths are read relative to the parties file.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
from typing import Optional, Tuple

from mpc_llama.errors import ConfigError

KNOWN_KEYS = {"parties", "model_owner", "data_owner", "connect_timeout_s", "recv_timeout_s",
              "tls"}


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    cert: str
    key: str
    ca: str

    def for_rank(self, rank: int) -> "TlsFiles":
        return TlsFiles(*(p.replace("{rank}", str(rank)) for p in (self.cert, self.key, self.ca)))


@dataclasses.dataclass(frozen=True)
class Parties:
    addresses: Tuple[str, ...]
    model_owner: int = 0
    data_owner: int = 1
    connect_timeout_s: float = 30.0
    recv_timeout_s: float = 60.0
    tls: Optional[TlsFiles] = None

    @property
    def world_size(self) -> int:
        return len(self.addresses)

    def host_port(self, rank: int) -> Tuple[str, int]:
        host, _, port = self.addresses[rank].rpartition(":")
        return host, int(port)

    def is_local(self, rank: int) -> bool:
        host = self.host_port(rank)[0]
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def check_world(self, world_size: int, protocol_name: str) -> None:
        if self.world_size != world_size:
            raise ConfigError(f"protocol {protocol_name} needs {world_size} parties, the parties "
                              f"file lists {self.world_size}")


def _port(addr: str) -> int:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"party address {addr!r} is not host:port")
    return int(port)


def parse_parties(data, base_dir: str = ".") -> Parties:
    """Parties from the parsed JSON object (see the module docstring)."""
    if not isinstance(data, dict):
        raise ConfigError("the parties file must hold a JSON object")
    unknown = set(data) - KNOWN_KEYS
    if unknown:
        raise ConfigError(f"parties file: unknown key(s) {sorted(unknown)}")
    addrs = data.get("parties")
    if not isinstance(addrs, list) or not all(isinstance(a, str) for a in addrs):
        raise ConfigError("parties file: \"parties\" must be a list of \"host:port\" strings")
    if not 2 <= len(addrs) <= 3:
        raise ConfigError(f"parties file lists {len(addrs)} parties; SPU's protocols here "
                          "need 2 (semi2k, cheetah) or 3 (aby3, semi2k)")
    for a in addrs:
        _port(a)
    if len(set(addrs)) != len(addrs):
        raise ConfigError("parties file: two parties share an address")
    fields = {}
    for key in ("model_owner", "data_owner"):
        value = data.get(key, {"model_owner": 0, "data_owner": 1}[key])
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < len(addrs):
            raise ConfigError(f"parties file: {key} must be a party index in "
                              f"[0, {len(addrs) - 1}], got {value!r}")
        fields[key] = value
    if fields["model_owner"] == fields["data_owner"]:
        raise ConfigError("parties file: model_owner and data_owner must be different parties")
    for key in ("connect_timeout_s", "recv_timeout_s"):
        if key in data:
            value = data[key]
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"parties file: {key} must be a positive number of seconds")
            fields[key] = float(value)
    tls = data.get("tls")
    if tls is not None:
        if not isinstance(tls, dict) or set(tls) != {"cert", "key", "ca"}:
            raise ConfigError("parties file: \"tls\" needs exactly \"cert\", \"key\" and \"ca\" "
                              "paths")
        fields["tls"] = TlsFiles(*(os.path.join(base_dir, str(tls[k]))
                                   for k in ("cert", "key", "ca")))
    return Parties(tuple(addrs), **fields)


def load_parties(path: str) -> Parties:
    """Reads and checks a parties file (one-line ConfigError on any problem)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read parties file {path}: {e.strerror}") from None
    except ValueError as e:
        raise ConfigError(f"parties file {path} is not valid JSON: {e}") from None
    parties = parse_parties(data, os.path.dirname(os.path.abspath(path)))
    if parties.tls is not None:
        for rank in range(parties.world_size):
            for p in dataclasses.astuple(parties.tls.for_rank(rank)):
                if parties.is_local(rank) and not os.path.isfile(p):
                    raise ConfigError(f"TLS file {p} (party {rank}) does not exist")
    return parties
