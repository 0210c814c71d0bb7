"""A slow link for the benchmark: 10 Mbit/s, 20 ms one way.

Preferred: a network namespace of our own whose loopback carries
`tc qdisc ... netem rate R delay D` (servers and client all run inside it;
X11 and the simulated host talk over unix sockets, so only RFB crosses the
link; every packet crosses lo once, so the round trip is 2 D).  Needs root,
iproute2 and the kernel's sch_netem.  Where netem is missing (some VM
kernels), `Relay` emulates the same link in user space: a TCP relay that
serialises each direction at R and delivers D later.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import threading
import time


class LinkError(Exception):
    pass


@contextlib.contextmanager
def netem_namespace(rate: str = "10mbit", delay: str = "20ms"):
    """Yields the `ip netns exec NS` prefix; the namespace (and its qdisc) is
    deleted on the way out, whatever happened."""
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
        raise LinkError("a network namespace needs root and iproute2 (apt-get install iproute2)")
    ns = f"pxb-link-{os.getpid()}"
    def run(*argv):
        r = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        if r.returncode:
            raise LinkError(f"{' '.join(argv)}: {r.stderr.strip()}")
    run("ip", "netns", "add", ns)
    try:
        run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo", "root", "netem",
            "rate", rate, "delay", delay)
        yield ["ip", "netns", "exec", ns]
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


class Relay:
    """127.0.0.1:listen_port -> 127.0.0.1:target_port; each direction is a link
    of `rate_bps` that delivers `delay_s` after the last byte left (netem's
    rate + delay).  Runs an event loop in a thread; close() stops it."""

    def __init__(self, target_port: int, rate_bps: float = 10e6, delay_s: float = 0.020):
        self.target, self.rate, self.delay = target_port, rate_bps, delay_s
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="link-relay")
        self.thread.start()
        if not self._started.wait(10):
            raise LinkError("relay did not start")

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._client, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self._started.set()
        self.loop.run_forever()

    async def _pipe(self, reader, writer):
        queue: asyncio.Queue = asyncio.Queue()
        async def deliver():
            while (item := await queue.get()) is not None:
                at, data = item
                await asyncio.sleep(max(0.0, at - time.monotonic()))
                writer.write(data)
                await writer.drain()
            writer.close()
        sender = asyncio.ensure_future(deliver())
        busy = 0.0
        try:
            while data := await reader.read(1 << 16):
                busy = max(time.monotonic(), busy) + len(data) * 8 / self.rate
                queue.put_nowait((busy + self.delay, data))
        except ConnectionError:
            pass
        queue.put_nowait(None)
        with contextlib.suppress(ConnectionError):
            await sender

    async def _client(self, reader, writer):
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_w), self._pipe(up_r, writer))

    def close(self):
        def stop():
            self.server.close()
            for task in asyncio.all_tasks(self.loop):
                task.cancel()
            self.loop.stop()
        self.loop.call_soon_threadsafe(stop)
        self.thread.join(10)
