"""Processes the suite starts, and their cleanup (also on Ctrl-C / SIGTERM).

Every child gets its own session, so a whole process tree (anchor script with
Xvfb/x11vnc/xanim; sim host) is stopped with one killpg.  Domains' guests and
device models are started by `pyxenfb-sim create` in sessions of their own:
they are found through the pid files in the sim's run directory.
"""
from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
HOST_START_TIMEOUT = 20.0
CREATE_TIMEOUT = 120.0


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _alive_pg(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def stop_groups(pgids: list[int], grace: float = 3.0) -> None:
    """SIGTERM each group, SIGKILL whatever is left after `grace` s."""
    for pg in pgids:
        _killpg(pg, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive_pg(pg) for pg in pgids):
        time.sleep(0.05)
    for pg in pgids:
        _killpg(pg, signal.SIGKILL)


class Procs:
    """Owns the process groups and temp dirs a run creates."""

    def __init__(self):
        self.groups: list[int] = []
        self.popens: list[subprocess.Popen] = []
        self.dirs: list[str] = []
        self.sims: list["SimHost"] = []

    def popen(self, argv, **kw) -> subprocess.Popen:
        p = subprocess.Popen(argv, start_new_session=True, **kw)
        self.groups.append(p.pid)
        self.popens.append(p)
        return p

    def tempdir(self, prefix: str) -> str:
        # /dev/shm: guest RAM lives in the run dir; short: unix socket paths <= 108 bytes
        base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        d = tempfile.mkdtemp(prefix=prefix, dir=base)
        self.dirs.append(d)
        return d

    def cleanup(self) -> None:
        for sim in reversed(self.sims):
            sim.kill_domains()
        stop_groups(list(reversed(self.groups)))
        for p in self.popens:
            try:
                p.wait(1)
            except subprocess.TimeoutExpired:
                pass
        self.groups.clear()
        self.popens.clear()
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)
        self.dirs.clear()


class SimHost:
    """`pyxenfb-sim host` in a fresh run dir, plus domains made with `pyxenfb-sim create`."""

    def __init__(self, procs: Procs, zygote: bool = False, prefix: list[str] | None = None):
        """zygote: `host --zygote`: every device model is forked by pyxenfb-zygote.
        prefix: run the host and `create` under it (e.g. `ip netns exec NS`)."""
        self.procs = procs
        self.prefix = list(prefix or [])
        self.run_dir = procs.tempdir("pxb-")
        self.env = dict(os.environ, PYXENFB_SIM=self.run_dir)
        self.host = procs.popen([*self.prefix, sys.executable, "-m", "pyxenfb.sim.cli", "host",
                                 "--run-dir", self.run_dir, *(["--zygote"] if zygote else [])],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        procs.sims.append(self)
        ready, _, _ = select.select([self.host.stdout], [], [],
                                    HOST_START_TIMEOUT * (3 if zygote else 1))
        line = self.host.stdout.readline() if ready else ""
        if "host ready" not in line:
            raise RuntimeError(f"pyxenfb-sim host did not start: {line!r}")

    def create(self, domid: int, *, width: int = 800, height: int = 600,
               animate: str | None = None, fps: float | None = None,
               guest: bool = True, memory: int = 64, dm: str | None = None) -> int:
        """Create a domain with a VNC vfb; returns its VNC TCP port.  dm: device model program."""
        argv = [*self.prefix, sys.executable, "-m", "pyxenfb.sim.cli", "create", "--run-dir", self.run_dir,
                "--domid", str(domid), "--name", f"bench{domid}", "--memory", str(memory),
                "--vfb", "vnc=1,vnclisten=127.0.0.1,vncdisplay=0,vncunused=1",
                "--width", str(width), "--height", str(height)]
        if animate:
            argv += ["--animate", animate]
        if fps:
            argv += ["--fps", str(fps)]
        if not guest:
            argv.append("--no-guest")
        if dm:
            argv += ["--dm", dm]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=CREATE_TIMEOUT,
                           env=self.env)
        if r.returncode != 0:
            raise RuntimeError(f"create domain {domid} failed: {r.stderr.strip()}")
        # "domain N (NAME) created; VNC on HOST:PORT"
        port = int(r.stdout.strip().rsplit(":", 1)[1])
        if guest and self.prefix:              # the port is inside the namespace: wait there
            subprocess.run([*self.prefix, sys.executable, "-c", "from bench.procs import wait_desktop; "
                            f"wait_desktop({port}, {width}, {height})"], check=True, timeout=60,
                           cwd=Path(__file__).resolve().parent.parent)
        elif guest:
            wait_desktop(port, width, height)
        return port

    def pid(self, domid: int, what: str) -> int:
        """what: "dm" or "guest"."""
        return int(Path(self.run_dir, f"dom{domid}", f"{what}.pid").read_text())

    def dm_processes(self, domid: int) -> list[int]:
        """The pids that make domid's device model: pyqemu-dm, and through a
        zygote also the child it forked (named in the stand-in's first log line)."""
        pids = [self.pid(domid, "dm")]
        try:
            log = next(Path(self.run_dir).glob(f"qemu-dm-bench{domid}.log")).read_text()
        except (StopIteration, OSError):
            return pids
        m = re.search(r"forked the device model as pid (\d+)", log)
        return pids + [int(m.group(1))] if m else pids

    def zygote_pid(self) -> int | None:
        import socket
        import struct
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
                s.connect(os.path.join(self.run_dir, "zygote.sock"))
                return struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
        except OSError:
            return None

    def kill_domains(self) -> None:
        pgids = []
        for f in Path(self.run_dir).glob("dom*/*.pid"):
            try:
                pgids.append(int(f.read_text()))
            except (OSError, ValueError):
                pass
        stop_groups(pgids, grace=1.0)


def lossy_dm(procs: Procs) -> str:
    """A device model program: pyqemu-dm with `lossy=on` added to its -vnc
    option (QEMU's switch for Tight JPEG; xl has no key for it)."""
    from pyxenfb.sim.toolstack import default_dm_program
    path = os.path.join(procs.tempdir("pxb-lossy-"), "pyqemu-dm-lossy")
    Path(path).write_text(
        f"#!{sys.executable}\nimport os, sys\n"
        f"dm = {default_dm_program()!r}\n"
        "args = sys.argv[1:]\n"
        "args = [a + ',lossy=on' if i and args[i - 1] == '-vnc' else a for i, a in enumerate(args)]\n"
        "os.execv(dm[0], dm + args)\n")
    os.chmod(path, 0o755)
    return path


def wait_desktop(port: int, width: int, height: int, timeout: float = 30.0) -> None:
    """Until the DM's VNC desktop has the guest's size: `create` returns when
    the DM runs, the guest's frontends connect (and resize the desktop) after.
    A client connected before that and asking for one encoding only (no
    DesktopSize) would be dropped at the resize."""
    import socket
    import struct
    deadline = time.monotonic() + timeout
    size = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                f = s.makefile("rb")
                f.read(12)
                s.sendall(b"RFB 003.008\n")
                types = f.read(f.read(1)[0])
                if 1 in types:
                    s.sendall(b"\x01")
                    f.read(4)
                    s.sendall(b"\x01")
                    size = struct.unpack(">HH", f.read(4))
                    if size == (width, height):
                        return
        except (OSError, IndexError, struct.error):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"VNC desktop on port {port} is {size}, not {width}x{height}, after {timeout} s")


# ---- /proc readings --------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def context_switches(pid: int) -> int:
    """voluntary + nonvoluntary context switches summed over all threads."""
    total = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        try:
            for line in status.read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def memory_kib(pid: int) -> dict:
    """RSS (VmRSS) and PSS (smaps_rollup), KiB."""
    out = {"rss": None, "pss": None}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss"] = int(line.split()[1])
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                out["pss"] = int(line.split()[1])
    except OSError:
        pass
    return out
