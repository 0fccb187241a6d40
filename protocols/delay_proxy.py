"""A TCP proxy that delays every byte by a fixed one-way latency, in both directions.

    python -m protocols.delay_proxy --listen 127.0.0.1:7000 --to 10.213.0.1:61920 --delay-ms 20

This machine's kernel has no netem, so `experiments/validate_network.py` puts one of these in
front of each party: a message crossing it arrives `delay` later, without a bandwidth limit
(rate shaping is done by tc tbf on the veth pair). Order is kept; data is forwarded as read.
"""

from __future__ import annotations

import argparse
import asyncio
import socket


def _split(addr: str):
    host, _, port = addr.rpartition(":")
    return host, int(port)


async def _pipe(reader, writer, delay: float) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    async def pump_in():
        while True:
            data = await reader.read(1 << 16)
            queue.put_nowait((loop.time() + delay, data))
            if not data:
                return

    async def pump_out():
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                writer.close()
                return
            writer.write(data)
            await writer.drain()

    try:
        await asyncio.gather(pump_in(), pump_out())
    except (ConnectionError, OSError):
        writer.close()


def _nodelay(writer) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def serve(listen: str, target: str, delay_s: float) -> None:
    host, port = _split(target)

    async def handle(client_reader, client_writer):
        try:
            up_reader, up_writer = await asyncio.open_connection(host, port)
        except OSError:
            client_writer.close()
            return
        _nodelay(client_writer), _nodelay(up_writer)
        await asyncio.gather(_pipe(client_reader, up_writer, delay_s),
                             _pipe(up_reader, client_writer, delay_s))

    lhost, lport = _split(listen)
    server = await asyncio.start_server(handle, lhost, lport)
    async with server:
        await server.serve_forever()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--listen", required=True)
    p.add_argument("--to", required=True)
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay")
    args = p.parse_args(argv)
    asyncio.run(serve(args.listen, args.to, args.delay_ms / 1000.0))


if __name__ == "__main__":
    main()
