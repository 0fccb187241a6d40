"""A TCP proxy that delays every byte by a fixed one-way latency, in both directions.

    python -m protocols.delay_proxy --listen 127.0.0.1:7000 --to 10.213.0.1:61920 --delay-ms 20

This machine's kernel has no netem, so `experiments/validate_network.py` puts one of these in
front of each party: a message crossing it arrives `delay` later, without a bandwidth limit
(rate shaping is done by tc tbf on the veth pair). Order is kept; data is forwarded as read.
Threads with `time.sleep` (sub-millisecond precision), not asyncio: an event loop waits in
whole milliseconds (epoll), which doubled a 0.5 ms one-way delay in a first version.
"""

from __future__ import annotations

import argparse
import collections
import socket
import threading
import time


def _split(addr: str):
    host, _, port = addr.rpartition(":")
    return host, int(port)


def _pipe(src: socket.socket, dst: socket.socket, delay: float) -> None:
    """Forwards src -> dst, each chunk `delay` seconds after it was read."""
    queue = collections.deque()
    ready = threading.Condition()

    def writer():
        while True:
            with ready:
                while not queue:
                    ready.wait()
                due, data = queue.popleft()
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            if not data:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            try:
                dst.sendall(data)
            except OSError:
                return

    threading.Thread(target=writer, daemon=True).start()
    while True:
        try:
            data = src.recv(1 << 16)
        except OSError:
            data = b""
        with ready:
            queue.append((time.perf_counter() + delay, data))
            ready.notify()
        if not data:
            return


def serve(listen: str, target: str, delay_s: float) -> None:
    """Accepts connections on `listen` and relays each to `target` with the delay."""
    server = socket.create_server(_split(listen), reuse_port=False)
    while True:
        client, _ = server.accept()
        try:
            upstream = socket.create_connection(_split(target))
        except OSError:
            client.close()
            continue
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_pipe, args=(client, upstream, delay_s), daemon=True).start()
        threading.Thread(target=_pipe, args=(upstream, client, delay_s), daemon=True).start()


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter,
                     argparse.RawDescriptionHelpFormatter):
    """--help: this docstring as written, and the defaults."""


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--listen", required=True, help="HOST:PORT this proxy accepts on")
    p.add_argument("--to", required=True, help="HOST:PORT every connection is forwarded to")
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay")
    args = p.parse_args(argv)
    serve(args.listen, args.to, args.delay_ms / 1000.0)


if __name__ == "__main__":
    main()
