"""The simulated Xen host process: XenStore daemon + event-channel broker
(+ with --zygote, pyxenfb-zygote on RUN_DIR/zygote.sock).

`pyxenfb-sim host --run-dir DIR` runs both in one asyncio loop, seeds dom0's
XenStore content the way a freshly booted dom0 with xenstored and xl has it,
prints one ready line and serves until SIGTERM/SIGINT/SIGHUP.

One host per run dir: DIR/host.pid is held with an exclusive flock for the
host's lifetime, so a second host is refused while the first is alive and a
crashed host's leftovers (stale lock file, sockets, domain dirs) are
recognised as stale and cleaned on the next start.
"""
from __future__ import annotations

import asyncio
import errno
import fcntl
import glob
import logging
import os
import shutil
import signal
import sys

from ..platform.xenstore import XenStore
from .evtchn_broker import EvtchnBroker
from .xenstored import XenStored

log = logging.getLogger("pyxenfb.sim.host")


class HostAlreadyRunning(Exception):
    pass


# Dom0 nodes a fresh xenstored + dom0 kernel + xl leave behind (captured
# xenstore-ls, minus device-model/0: no dom0 qdisk QEMU runs in the sim).
# xenstored itself creates /tool/xenstored and /local/domain/0/{name,domid}.
DOM0_NODES = {
    "/local/domain/0/name": "Domain-0",
    "/local/domain/0/domid": "0",
    "/local/domain/0/control/feature-poweroff": "1",
    "/local/domain/0/control/feature-reboot": "1",
    "/local/domain/0/control/feature-suspend": "1",
    "/local/pool/0/name": "Pool-0",
    "/vm": "",
    "/libxl": "",
}


ZYGOTE_START_TIMEOUT = 60.0     # its warm-up imports numpy & co.: slow on a busy or emulated dom0
ZYGOTE_STOP_TIMEOUT = 5.0


class SimHost:
    def __init__(self, run_dir: str, zygote: bool = False):
        self.run_dir = os.path.abspath(run_dir)
        self.pid_path = os.path.join(self.run_dir, "host.pid")
        self._pid_fd: int | None = None
        self.xenstored: XenStored | None = None
        self.broker: EvtchnBroker | None = None
        self.want_zygote = zygote
        self.zygote: asyncio.subprocess.Process | None = None

    def _lock(self) -> None:
        os.makedirs(self.run_dir, exist_ok=True)
        fd = os.open(self.pid_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            other = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise HostAlreadyRunning(
                    f"another host (pid {other}) is running on {self.run_dir}") from None
            raise
        self._pid_fd = fd

    def _clean_stale(self) -> None:
        """Leftovers of a host that died: its sockets and domains are gone."""
        for path in ("xenstored.sock", "evtchn.sock", "qmp-libxl-*", "qmp-libxenstat-*"):
            for found in glob.glob(os.path.join(self.run_dir, path)):
                os.unlink(found)
        for found in glob.glob(os.path.join(self.run_dir, "dom[0-9]*")):
            if os.path.isdir(found) and found.rsplit("dom", 1)[1].isdigit():
                log.info("removing stale domain dir %s", found)
                shutil.rmtree(found, ignore_errors=True)

    async def start(self) -> None:
        self._lock()
        try:
            self._clean_stale()
            self.xenstored = XenStored(self.run_dir)
            await self.xenstored.start()
            self.broker = EvtchnBroker(os.path.join(self.run_dir, "evtchn.sock"))
            await self.broker.start()
            await self._seed_dom0()
            if self.want_zygote:
                await self._start_zygote()
            os.ftruncate(self._pid_fd, 0)
            os.pwrite(self._pid_fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            await self.close()
            raise

    async def _start_zygote(self) -> None:
        """pyxenfb-zygote on RUN_DIR/zygote.sock, beside the host (as systemd
        would run it beside xenstored); its log is RUN_DIR/zygote.log."""
        path = os.path.join(self.run_dir, "zygote.sock")
        with open(os.path.join(self.run_dir, "zygote.log"), "ab") as log_file:
            self.zygote = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pyxenfb.zygote.server", "--socket", path,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=log_file,
                start_new_session=True)    # a Ctrl-C meant for the host is the host's to relay
        try:
            line = await asyncio.wait_for(self.zygote.stdout.readline(), ZYGOTE_START_TIMEOUT)
        except asyncio.TimeoutError:
            line = b""
        if not line.startswith(b"pyxenfb-zygote: ready"):
            raise OSError(f"pyxenfb-zygote did not start; see {self.run_dir}/zygote.log")

    async def _stop_zygote(self) -> None:
        """Its children (the domains' device models) are left running."""
        if self.zygote is None or self.zygote.returncode is not None:
            return
        self.zygote.terminate()
        try:
            await asyncio.wait_for(self.zygote.wait(), ZYGOTE_STOP_TIMEOUT)
        except asyncio.TimeoutError:
            self.zygote.kill()
            await self.zygote.wait()
        log_path = os.path.join(self.run_dir, "zygote.log")
        if os.path.exists(log_path) and os.path.getsize(log_path) == 0:
            os.unlink(log_path)             # nothing went wrong: leave the run dir clean

    async def _seed_dom0(self) -> None:
        xs = await XenStore.open(os.path.join(self.run_dir, "xenstored.sock"))
        try:
            async def body(tx: int) -> None:
                for path, value in DOM0_NODES.items():
                    await xs.write(path, value, tx=tx)
            await xs.transaction(body)
        finally:
            xs.close()

    def _power_off_domains(self) -> None:
        """The host going down takes its domains with it: SIGKILL each domain's
        guest and device model (only processes whose argv names this run dir,
        so a recycled pid is never hit)."""
        for pid_file in glob.glob(os.path.join(self.run_dir, "dom[0-9]*", "*.pid")):
            try:
                pid = int(open(pid_file).read().split()[0])
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if self.run_dir.encode() not in f.read():
                        continue
                os.kill(pid, signal.SIGKILL)
                log.info("host stopping: killed pid %d (%s)", pid, os.path.basename(pid_file))
            except (OSError, ValueError, IndexError):
                continue

    async def close(self) -> None:
        self._power_off_domains()
        await self._stop_zygote()
        if self.broker is not None:
            await self.broker.close()
            self.broker = None
        if self.xenstored is not None:
            await self.xenstored.close()
            self.xenstored = None
        for name in ("xenstored.sock", "evtchn.sock"):
            try:
                os.unlink(os.path.join(self.run_dir, name))
            except FileNotFoundError:
                pass
        if self._pid_fd is not None:
            # Unlink while still holding the lock: a new host can't race in between.
            try:
                os.unlink(self.pid_path)
            except FileNotFoundError:
                pass
            os.close(self._pid_fd)
            self._pid_fd = None


def ready_line(run_dir: str) -> str:
    return f"pyxenfb-sim: host ready, run dir {run_dir} (export PYXENFB_SIM={run_dir})"


async def run_host(run_dir: str, zygote: bool = False) -> int:
    host = SimHost(run_dir, zygote)
    try:
        await host.start()
    except HostAlreadyRunning as exc:
        print(f"pyxenfb-sim: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"pyxenfb-sim: cannot start the host on {host.run_dir}: {exc}", file=sys.stderr)
        return 1
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    try:
        print(ready_line(host.run_dir), flush=True)
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await host.close()
    return 0
