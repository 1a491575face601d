"""WAN emulation for the local mesh: one asyncio TCP proxy per inter-region leaf link.

This machine has no ``tc netem``, so each leaf link goes through a proxy that delays every byte
by the link's one-way latency in each direction and can, on command:

* ``cut``        close every connection (FIN/RST) and refuse new ones: a link torn down;
* ``blackhole``  stop delivering bytes without closing anything, like a dead WAN: the peers
                 notice only through their own ping timeouts. Bytes are held, not dropped
                 (TCP would retransmit them), and flow again on restore if both ends are
                 still there;
* ``restore``    back to normal;
* ``latency``    change the one-way delay.

All links of a mesh live in one process with a line-based JSON control port
(``{"cmd": "cut", "link": "lon-sgp"}``) used by ``meridian link ...``, the tests and the drills.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

CHUNK = 65536


class _Pipe:
    """One direction of one connection: read, hold for ``delay``, write in order."""

    def __init__(
        self, link: Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.link = link
        self.reader = reader
        self.writer = writer
        self.queue: deque[tuple[float, bytes]] = deque()
        self.wake = asyncio.Event()
        self.eof = False

    async def read_loop(self) -> None:
        try:
            while True:
                data = await self.reader.read(CHUNK)
                if not data:
                    break
                self.queue.append((time.monotonic() + self.link.delay_s, data))
                self.wake.set()
        except (ConnectionError, OSError):
            pass
        finally:
            self.eof = True
            self.wake.set()

    async def write_loop(self) -> None:
        try:
            while True:
                while not self.queue:
                    if self.eof:
                        return
                    self.wake.clear()
                    await self.wake.wait()
                due, data = self.queue[0]
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                await self.link.flowing.wait()
                self.queue.popleft()
                self.writer.write(data)
                await self.writer.drain()
        except (ConnectionError, OSError):
            pass


class _Conn:
    def __init__(self, link: Link, a: tuple[Any, Any], b: tuple[Any, Any]) -> None:
        self.link = link
        self.writers: list[asyncio.StreamWriter] = [a[1], b[1]]
        self.up = _Pipe(link, a[0], b[1])
        self.down = _Pipe(link, b[0], a[1])

    async def run(self) -> None:
        tasks = [asyncio.create_task(p.read_loop()) for p in (self.up, self.down)] + [
            asyncio.create_task(p.write_loop()) for p in (self.up, self.down)
        ]
        try:
            # A connection ends when either side closes and what it sent has been delivered.
            _done, _ = await asyncio.wait(tasks[2:], return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.abort()
            for t in tasks:
                t.cancel()

    def abort(self) -> None:
        for w in self.writers:
            with contextlib.suppress(Exception):
                w.transport.abort()


@dataclass
class LinkStats:
    connections_total: int = 0
    refused_total: int = 0


class Link:
    def __init__(
        self,
        name: str,
        listen: int,
        target_host: str,
        target_port: int,
        delay_ms: float,
        host: str = "127.0.0.1",
    ) -> None:
        self.name = name
        self.host = host
        self.listen = listen
        self.target = (target_host, target_port)
        self.delay_s = delay_ms / 1000.0
        self.state = "up"
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.conns: set[_Conn] = set()
        self.stats = LinkStats()
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(
            self._accept, self.host, self.listen, reuse_address=True
        )

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.state == "cut":
            self.stats.refused_total += 1
            writer.transport.abort()
            return
        try:
            # Opening the far side also takes the one-way delay (SYN), so re-links see it.
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            self.stats.refused_total += 1
            writer.transport.abort()
            return
        for w in (writer, up_w):
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Conn(self, (reader, writer), (up_r, up_w))
        self.conns.add(conn)
        self.stats.connections_total += 1
        try:
            await conn.run()
        finally:
            self.conns.discard(conn)

    def cut(self) -> None:
        self.state = "cut"
        self.flowing.set()
        for c in list(self.conns):
            c.abort()

    def blackhole(self) -> None:
        self.state = "blackhole"
        self.flowing.clear()

    def restore(self) -> None:
        self.state = "up"
        self.flowing.set()

    def status(self) -> dict[str, Any]:
        return {
            "link": self.name,
            "state": self.state,
            "one_way_ms": round(self.delay_s * 1000, 3),
            "listen": self.listen,
            "target": f"{self.target[0]}:{self.target[1]}",
            "connections": len(self.conns),
            "connections_total": self.stats.connections_total,
            "refused_total": self.stats.refused_total,
        }


class ProxyServer:
    def __init__(self, links: list[Link], control_port: int, host: str = "127.0.0.1") -> None:
        self.links = {ln.name: ln for ln in links}
        self.control_port = control_port
        self.host = host

    async def serve(self) -> None:
        for ln in self.links.values():
            await ln.start()
        ctl = await asyncio.start_server(
            self._control, self.host, self.control_port, reuse_address=True
        )
        async with ctl:
            await ctl.serve_forever()

    async def _control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    reply = self.handle(json.loads(line))
                except Exception as e:
                    reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        finally:
            writer.close()

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "status":
            return {"ok": True, "links": [ln.status() for ln in self.links.values()]}
        names = list(self.links) if req.get("link") in (None, "all") else [req["link"]]
        for n in names:
            if n not in self.links:
                return {"ok": False, "error": f"unknown link {n!r}; have {sorted(self.links)}"}
            ln = self.links[n]
            if cmd == "cut":
                ln.cut()
            elif cmd == "blackhole":
                ln.blackhole()
            elif cmd == "restore":
                ln.restore()
            elif cmd == "latency":
                ln.delay_s = float(req["ms"]) / 1000.0
            else:
                return {"ok": False, "error": f"unknown command {cmd!r}"}
        return {"ok": True, "links": [self.links[n].status() for n in names]}


class LinkControl:
    """Client of a running proxy's control port (blocking; for the CLI, tests and drills)."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.addr = (host, port)

    def send(self, cmd: str, link: str | None = None, **kw: Any) -> dict[str, Any]:
        req = {"cmd": cmd, "link": link, **kw}
        with socket.create_connection(self.addr, timeout=5) as s:
            s.sendall(json.dumps(req).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        reply: dict[str, Any] = json.loads(buf)
        if not reply.get("ok"):
            raise RuntimeError(reply.get("error", "link proxy refused the command"))
        return reply

    def cut(self, link: str) -> None:
        self.send("cut", link)

    def blackhole(self, link: str) -> None:
        self.send("blackhole", link)

    def restore(self, link: str) -> None:
        self.send("restore", link)

    def latency(self, link: str, ms: float) -> None:
        self.send("latency", link, ms=ms)

    def status(self) -> list[dict[str, Any]]:
        links: list[dict[str, Any]] = self.send("status")["links"]
        return links


def _parse_link(spec: str) -> Link:
    kv = dict(part.split("=", 1) for part in spec.split(","))
    host, port = kv["target"].rsplit(":", 1)
    return Link(kv["name"], int(kv["listen"]), host, int(port), float(kv["ms"]))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Meridian WAN link proxies")
    ap.add_argument("--control", type=int, required=True, help="control port")
    ap.add_argument(
        "--link",
        action="append",
        default=[],
        help="name=lon-nyc,listen=PORT,target=HOST:PORT,ms=35 (repeatable)",
    )
    args = ap.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(ProxyServer([_parse_link(s) for s in args.link], args.control).serve())


if __name__ == "__main__":
    main()
