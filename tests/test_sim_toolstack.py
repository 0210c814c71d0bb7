"""The simulated host process and the xl-like toolstack (pyxenfb/sim/host.py,
toolstack.py, fbdump.py, cli.py), checked against the libxl 4.17 capture in
/work/shared/reference/libxl-4.17-captured/."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pyxenfb.devices import xenfb_abi as abi
from pyxenfb.sim import toolstack
from pyxenfb.sim.fbdump import FbdumpError, read_framebuffer
from pyxenfb.sim.guestmem import GuestMemory
from pyxenfb.platform.xenstore import XenStore
from pyxenfb.rfb.listener import VNC_BASE_PORT

REPO = Path(__file__).resolve().parent.parent
HAVE_GUEST = (REPO / "pyxenfb/sim/guest.py").exists()
HAVE_DM = (REPO / "pyxenfb/machine_pv.py").exists()
needs_guest = pytest.mark.skipif(not HAVE_GUEST, reason="pyxenfb/sim/guest.py not written yet")
needs_dm = pytest.mark.skipif(not (HAVE_GUEST and HAVE_DM),
                              reason="needs pyxenfb/sim/guest.py and pyxenfb/machine_pv.py")
needs_xenstore_ls = pytest.mark.skipif(shutil.which("xenstore-ls") is None,
                                       reason="xenstore-ls (Debian xenstore-utils) not installed")
HOST_START_TIMEOUT = 15.0


# ---- the host process ---------------------------------------------------------

from simkit import (  # noqa: E402
    short_run_dir as _short_run_dir, start_host, stop_host, wait_node, wait_until,
)


def test_host_ready_refuses_second_and_stops_cleanly():
    run_dir = _short_run_dir()
    try:
        proc = start_host(run_dir)
        assert Path(run_dir, "host.pid").read_text().strip() == str(proc.pid)
        for sock in ("xenstored.sock", "evtchn.sock"):
            assert Path(run_dir, sock).is_socket()
        second = subprocess.run([sys.executable, "-m", "pyxenfb.sim.cli", "host",
                                 "--run-dir", run_dir], capture_output=True, text=True, timeout=30)
        assert second.returncode == 1
        assert f"another host (pid {proc.pid}) is running on {run_dir}" in second.stderr
        assert stop_host(proc) == 0
        assert sorted(os.listdir(run_dir)) == []       # no sockets, no host.pid
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def test_host_starts_over_stale_run_dir():
    run_dir = _short_run_dir()
    try:
        # What a SIGKILLed host leaves: its pid file, a dead socket, a domain dir.
        Path(run_dir, "host.pid").write_text("999999\n")
        dead = socket.socket(socket.AF_UNIX)
        dead.bind(os.path.join(run_dir, "xenstored.sock"))
        dead.close()
        os.makedirs(os.path.join(run_dir, "dom7"))
        Path(run_dir, "dom7", "memory").write_bytes(b"\0" * 4096)
        proc = start_host(run_dir)
        assert not os.path.exists(os.path.join(run_dir, "dom7"))
        assert Path(run_dir, "host.pid").read_text().strip() == str(proc.pid)
        assert stop_host(proc) == 0
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def xenstore_ls(run_dir: str, path: str = "/") -> dict[str, tuple[str, str]]:
    """`xenstore-ls -fp` (libxenstore, an independent reader) -> {path: (value, perms)}."""
    out = subprocess.run(["xenstore-ls", "-fp", path], capture_output=True, text=True, timeout=10,
                         env=dict(os.environ, XENSTORED_PATH=os.path.join(run_dir, "xenstored.sock")),
                         check=True).stdout
    return parse_xenstore_ls(out)


def parse_xenstore_ls(text: str) -> dict[str, tuple[str, str]]:
    nodes = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        path, rest = line.split(" = ", 1)
        value, perms = rest.rsplit("   (", 1)
        nodes[path] = (json.loads(value), perms.rstrip(")"))
    return nodes


@needs_xenstore_ls
def test_host_seeds_dom0(host):
    nodes = xenstore_ls(host)
    for path, value in [("/local/domain/0/name", "Domain-0"), ("/local/domain/0/domid", "0"),
                        ("/local/pool/0/name", "Pool-0"), ("/vm", ""), ("/libxl", "")]:
        assert nodes[path] == (value, "n0"), path
    assert "/tool/xenstored" in nodes


# ---- create --no-dm against the capture -----------------------------------------

# From xenstore-ls-after-create.txt (xl create of domain 1 "fbtest", memory=256,
# vfb=["vnc=1,vnclisten=127.0.0.1,vncdisplay=0"]): the lines the toolstack
# writes.  Edits, each because another party writes it in the real run:
# backend state 1 (the DM moves it to 2 and adds feature-*/hotplug-status),
# no console/tty (xenconsoled), no console/vnc-* (written after QMP, tested
# below), no image/device-model-pid (no DM here).  <UUID> stands for the
# random /vm uuid; store/console ring-refs are fake frames, checked apart.
CAPTURED_AFTER_CREATE = r'''
/libxl/1 = ""   (n0)
/libxl/1/device = ""   (n0)
/libxl/1/device/console/0/backend = "/local/domain/0/backend/console/1/0"   (n0)
/libxl/1/device/console/0/frontend = "/local/domain/1/console"   (n0)
/libxl/1/device/console/0/frontend-id = "1"   (n0)
/libxl/1/device/console/0/online = "1"   (n0)
/libxl/1/device/console/0/protocol = "vt100"   (n0)
/libxl/1/device/console/0/state = "1"   (n0)
/libxl/1/device/vfb = ""   (n0)
/libxl/1/device/vfb/0 = ""   (n0)
/libxl/1/device/vfb/0/backend = "/local/domain/0/backend/vfb/1/0"   (n0)
/libxl/1/device/vfb/0/frontend = "/local/domain/1/device/vfb/0"   (n0)
/libxl/1/device/vfb/0/frontend-id = "1"   (n0)
/libxl/1/device/vfb/0/online = "1"   (n0)
/libxl/1/device/vfb/0/opengl = "0"   (n0)
/libxl/1/device/vfb/0/sdl = "0"   (n0)
/libxl/1/device/vfb/0/state = "1"   (n0)
/libxl/1/device/vfb/0/vnc = "1"   (n0)
/libxl/1/device/vfb/0/vncdisplay = "0"   (n0)
/libxl/1/device/vfb/0/vnclisten = "127.0.0.1"   (n0)
/libxl/1/device/vfb/0/vncunused = "1"   (n0)
/libxl/1/device/vkbd = ""   (n0)
/libxl/1/device/vkbd/0 = ""   (n0)
/libxl/1/device/vkbd/0/backend = "/local/domain/0/backend/vkbd/1/0"   (n0)
/libxl/1/device/vkbd/0/frontend = "/local/domain/1/device/vkbd/0"   (n0)
/libxl/1/device/vkbd/0/frontend-id = "1"   (n0)
/libxl/1/device/vkbd/0/online = "1"   (n0)
/libxl/1/device/vkbd/0/state = "1"   (n0)
/libxl/1/dm-version = "qemu_xen"   (n0)
/libxl/1/type = "pv"   (n0)
/local/domain/0/backend/console/1/0 = ""   (n0,r1)
/local/domain/0/backend/console/1/0/frontend = "/local/domain/1/console"   (n0,r1)
/local/domain/0/backend/console/1/0/frontend-id = "1"   (n0,r1)
/local/domain/0/backend/console/1/0/online = "1"   (n0,r1)
/local/domain/0/backend/console/1/0/protocol = "vt100"   (n0,r1)
/local/domain/0/backend/console/1/0/state = "1"   (n0,r1)
/local/domain/0/backend/vfb = ""   (n0)
/local/domain/0/backend/vfb/1 = ""   (n0)
/local/domain/0/backend/vfb/1/0 = ""   (n0,r1)
/local/domain/0/backend/vfb/1/0/frontend = "/local/domain/1/device/vfb/0"   (n0,r1)
/local/domain/0/backend/vfb/1/0/frontend-id = "1"   (n0,r1)
/local/domain/0/backend/vfb/1/0/online = "1"   (n0,r1)
/local/domain/0/backend/vfb/1/0/opengl = "0"   (n0,r1)
/local/domain/0/backend/vfb/1/0/sdl = "0"   (n0,r1)
/local/domain/0/backend/vfb/1/0/state = "1"   (n0,r1)
/local/domain/0/backend/vfb/1/0/vnc = "1"   (n0,r1)
/local/domain/0/backend/vfb/1/0/vncdisplay = "0"   (n0,r1)
/local/domain/0/backend/vfb/1/0/vnclisten = "127.0.0.1"   (n0,r1)
/local/domain/0/backend/vfb/1/0/vncunused = "1"   (n0,r1)
/local/domain/0/backend/vkbd = ""   (n0)
/local/domain/0/backend/vkbd/1 = ""   (n0)
/local/domain/0/backend/vkbd/1/0 = ""   (n0,r1)
/local/domain/0/backend/vkbd/1/0/frontend = "/local/domain/1/device/vkbd/0"   (n0,r1)
/local/domain/0/backend/vkbd/1/0/frontend-id = "1"   (n0,r1)
/local/domain/0/backend/vkbd/1/0/online = "1"   (n0,r1)
/local/domain/0/backend/vkbd/1/0/state = "1"   (n0,r1)
/local/domain/1 = ""   (n0,r1)
/local/domain/1/attr = ""   (n1)
/local/domain/1/console = ""   (n0,r1)
/local/domain/1/console/backend = "/local/domain/0/backend/console/1/0"   (n0,r1)
/local/domain/1/console/backend-id = "0"   (n1,r0)
/local/domain/1/console/limit = "1048576"   (n0,r1)
/local/domain/1/console/output = "pty"   (n0,r1)
/local/domain/1/console/port = "2"   (n0,r1)
/local/domain/1/console/type = "xenconsoled"   (n0,r1)
/local/domain/1/control = ""   (n0,r1)
/local/domain/1/control/feature-poweroff = ""   (n1)
/local/domain/1/control/feature-reboot = ""   (n1)
/local/domain/1/control/feature-suspend = ""   (n1)
/local/domain/1/control/platform-feature-multiprocessor-suspend = "1"   (n0,r1)
/local/domain/1/control/platform-feature-xs_reset_watches = "1"   (n0,r1)
/local/domain/1/control/shutdown = ""   (n1)
/local/domain/1/control/sysrq = ""   (n1)
/local/domain/1/cpu = ""   (n0,r1)
/local/domain/1/cpu/0 = ""   (n0,r1)
/local/domain/1/cpu/0/availability = "online"   (n0,r1)
/local/domain/1/data = ""   (n1)
/local/domain/1/device = ""   (n0,r1)
/local/domain/1/device/suspend = ""   (n0,r1)
/local/domain/1/device/suspend/event-channel = ""   (n1)
/local/domain/1/device/vfb = ""   (n0,r1)
/local/domain/1/device/vfb/0 = ""   (n1,r0)
/local/domain/1/device/vfb/0/backend = "/local/domain/0/backend/vfb/1/0"   (n1,r0)
/local/domain/1/device/vfb/0/backend-id = "0"   (n1,r0)
/local/domain/1/device/vfb/0/state = "1"   (n1,r0)
/local/domain/1/device/vkbd = ""   (n0,r1)
/local/domain/1/device/vkbd/0 = ""   (n1,r0)
/local/domain/1/device/vkbd/0/backend = "/local/domain/0/backend/vkbd/1/0"   (n1,r0)
/local/domain/1/device/vkbd/0/backend-id = "0"   (n1,r0)
/local/domain/1/device/vkbd/0/state = "1"   (n1,r0)
/local/domain/1/domid = "1"   (n0,r1)
/local/domain/1/drivers = ""   (n1)
/local/domain/1/error = ""   (n1)
/local/domain/1/feature = ""   (n1)
/local/domain/1/memory = ""   (n0,r1)
/local/domain/1/memory/static-max = "262144"   (n0,r1)
/local/domain/1/memory/target = "262144"   (n0,r1)
/local/domain/1/memory/videoram = "0"   (n0,r1)
/local/domain/1/name = "fbtest"   (n0,r1)
/local/domain/1/store = ""   (n0,r1)
/local/domain/1/store/port = "1"   (n0,r1)
/local/domain/1/vm = "/vm/<UUID>"   (n0,r1)
/vm/<UUID> = ""   (n0,r1)
/vm/<UUID>/image = ""   (n0,r1)
/vm/<UUID>/image/ostype = "linux"   (n0,r1)
/vm/<UUID>/name = "fbtest"   (n0,r1)
/vm/<UUID>/uuid = "<UUID>"   (n0,r1)
'''
# Written by libxl with values that can't match a sim (fake frames, this
# run's clock and "kernel"): only their presence and permissions are checked.
CAPTURED_PRESENT = {
    "/local/domain/1/console/ring-ref": "n0,r1",
    "/local/domain/1/store/ring-ref": "n0,r1",
    "/vm/<UUID>/image/kernel": "n0,r1",
    "/vm/<UUID>/image/cmdline": "n0,r1",
    "/vm/<UUID>/start_time": "n0,r1",
}
CREATE_VFB = "vnc=1,vnclisten=127.0.0.1,vncdisplay=0"


def _with_uuid(nodes: dict, uuid: str) -> dict:
    return {k.replace("<UUID>", uuid): (v[0].replace("<UUID>", uuid), v[1])
            for k, v in nodes.items()}


@needs_xenstore_ls
def test_create_no_dm_writes_the_captured_nodes(host):
    result = asyncio.run(toolstack.create_domain(host, 1, "fbtest", memory=256, vfb=CREATE_VFB,
                                                 dm=None, start_guest=False))
    assert result.summary() == "domain 1 (fbtest) created; no device model"
    nodes = xenstore_ls(host)
    expected = _with_uuid(parse_xenstore_ls(CAPTURED_AFTER_CREATE), result.uuid)
    for path, want in expected.items():
        assert nodes.get(path) == want, path
    for path, perms in CAPTURED_PRESENT.items():
        assert nodes[path.replace("<UUID>", result.uuid)][1] == perms, path
    # Nothing more in the device dirs than the capture has.
    for prefix in ("/local/domain/0/backend/vfb/1", "/local/domain/0/backend/vkbd/1",
                   "/local/domain/1/device/vfb", "/local/domain/1/device/vkbd",
                   "/libxl/1/device/vfb", "/libxl/1/device/vkbd"):
        extra = {p for p in nodes if p.startswith(prefix)} - set(expected)
        assert not extra, extra
    assert os.path.getsize(os.path.join(host, "dom1", "memory")) == 256 << 20


def test_create_refuses_duplicates_and_bad_input(host):
    async def scenario():
        await toolstack.create_domain(host, 3, "one", dm=None, start_guest=False)
        with pytest.raises(toolstack.ToolstackError, match="domain 3 already exists"):
            await toolstack.create_domain(host, 3, "two", dm=None, start_guest=False)
        with pytest.raises(toolstack.ToolstackError, match="already in use"):
            await toolstack.create_domain(host, 4, "one", dm=None, start_guest=False)
        with pytest.raises(toolstack.ToolstackError, match="bad domain name"):
            await toolstack.create_domain(host, 4, "a/b", dm=None, start_guest=False)
        with pytest.raises(toolstack.ToolstackError, match="out of range"):
            await toolstack.create_domain(host, 0, "zero", dm=None, start_guest=False)
        with pytest.raises(toolstack.ToolstackError, match="unknown key"):
            await toolstack.create_domain(host, 4, "x", vfb="vnc=1,bogus=2", dm=None)
        await toolstack.destroy_domain(host, 3)
    asyncio.run(scenario())


def test_introduce_release_and_destroy_removes_everything(host):
    async def scenario():
        xs = await XenStore.open(os.path.join(host, "xenstored.sock"))
        events: asyncio.Queue[str] = asyncio.Queue()
        for special in ("@introduceDomain", "@releaseDomain"):
            await xs.watch(special, "t", lambda path, _token: events.put_nowait(path))
        await xs.read("/local/domain/0/name")            # round trip: initial events are in
        while not events.empty():
            events.get_nowait()

        result = await toolstack.create_domain(host, 1, "fbtest", vfb=CREATE_VFB,
                                               dm=None, start_guest=False)
        assert await asyncio.wait_for(events.get(), 5) == "@introduceDomain"
        assert await xs.is_domain_introduced(1)
        assert os.path.exists(os.path.join(host, "dom1", "xenstored.sock"))

        await toolstack.destroy_domain(host, 1)
        assert await asyncio.wait_for(events.get(), 5) == "@releaseDomain"
        assert not await xs.is_domain_introduced(1)
        for path in ("/local/domain/1", "/libxl/1", f"/vm/{result.uuid}",
                     "/local/domain/0/backend/vfb/1", "/local/domain/0/backend/vkbd/1",
                     "/local/domain/0/backend/console/1", "/local/domain/0/device-model/1"):
            assert await xs.read(path, None) is None, path
        assert not os.path.exists(os.path.join(host, "dom1"))
        with pytest.raises(toolstack.ToolstackError, match="domain 1 does not exist"):
            await toolstack.destroy_domain(host, 1)
        xs.close()
    asyncio.run(scenario())


def test_cli_create_list_destroy(host):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "pyxenfb.sim.cli", *args],
                              capture_output=True, text=True, timeout=30,
                              env=dict(os.environ, PYXENFB_SIM=host))
    r = cli("create", "--domid", "5", "--name", "clidom", "--memory", "32", "--no-dm",
            "--no-guest", "--vfb", "vnc=1")
    assert (r.returncode, r.stdout) == (0, "domain 5 (clidom) created; no device model\n"), r.stderr
    r = cli("list")
    rows = [line.split() for line in r.stdout.splitlines()]
    assert rows[0] == ["Name", "ID", "Mem", "VCPUs", "State", "Time(s)"]
    assert rows[1][:2] == ["Domain-0", "0"] and rows[2][:4] == ["clidom", "5", "32", "1"]
    assert cli("destroy", "--domid", "5").returncode == 0
    r = cli("destroy", "--domid", "5")
    assert r.returncode == 1 and "domain 5 does not exist" in r.stderr
    r = cli("fbdump", "--domid", "5", os.path.join(host, "x.png"))
    assert r.returncode == 1 and "page-ref" in r.stderr


@needs_dm
def test_cli_create_without_vfb_boots_the_guest(host):
    """As Linux with no vfb/vkbd in its config: the guest boots with no
    frontends, no traceback, and stops cleanly on destroy."""
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "pyxenfb.sim.cli", *args],
                              capture_output=True, text=True, timeout=60,
                              env=dict(os.environ, PYXENFB_SIM=host))
    r = cli("create", "--domid", "7", "--name", "novfb", "--memory", "16")
    assert (r.returncode, r.stdout) == (0, "domain 7 (novfb) created; no VNC\n"), r.stderr
    guest_log = Path(host, "dom7", "guest.log")
    pid = int(Path(host, "dom7", "guest.pid").read_text())
    wait_until(lambda: guest_log.exists() and "guest running" in guest_log.read_text(), 30,
               lambda: guest_log.exists() and guest_log.read_text())
    assert "devices: none" in guest_log.read_text() and not _dead(pid)
    assert json.loads(Path(host, "dom7", "guest.json").read_text())["fb_page_ref"] is None
    assert cli("destroy", "--domid", "7").returncode == 0
    assert _dead(pid)


def test_fbdump_reads_through_xenstore_and_names_what_is_wrong(host, tmp_path):
    from pyxenfb.sim.fbdump import fbdump_array

    async def write(path, value):
        xs = await XenStore.open(os.path.join(host, "xenstored.sock"))
        try:
            await xs.write(path, value)
        finally:
            xs.close()
    fe = "/local/domain/9/device/vfb/0"
    with pytest.raises(FbdumpError, match="has no .*page-ref"):
        fbdump_array(host, 9)
    asyncio.run(write(f"{fe}/page-ref", "12x"))
    with pytest.raises(FbdumpError, match="not a frame number: '12x'"):
        fbdump_array(host, 9)
    asyncio.run(write(f"{fe}/page-ref", "12"))
    with pytest.raises(FbdumpError, match="cannot open guest memory"):
        fbdump_array(host, 9)
    with pytest.raises(FbdumpError, match="cannot reach XenStore"):
        fbdump_array(str(tmp_path), 9)              # no host on this run dir


# ---- the device model sequence (a fake DM that records what libxl-sim does) ------

FAKE_DM = r'''#!{python}
import asyncio, json, os, signal, sys
from pyxenfb.platform.xenstore import XenStore
TERMINATOR = {terminator!r}
MODE = {mode!r}
run_dir = os.environ["PYXENFB_SIM"]
record = os.path.join(run_dir, "fake-dm.json")
seen = {{"pid": os.getpid(), "argv": sys.argv, "env_sim": run_dir, "cwd": os.getcwd(),
        "console_limit": os.environ.get("XEN_QEMU_CONSOLE_LIMIT"), "commands": []}}
def save():
    with open(record + ".tmp", "w") as f:
        json.dump(seen, f)
    os.replace(record + ".tmp", record)
def caught(signum, frame):
    open(os.path.join(run_dir, "fake-dm-caught-%d" % signum), "w").close()
    sys.exit(0)
for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
    signal.signal(s, caught)
chardevs = {{}}
for i, a in enumerate(sys.argv):
    if a == "-chardev":
        opts = dict(kv.split("=", 1) for kv in sys.argv[i + 1].split(",")[1:])
        chardevs[opts["id"]] = opts["path"]
domid = sys.argv[sys.argv.index("-xen-domid") + 1]
async def serve(reader, writer):
    writer.write(json.dumps({{"QMP": {{"version": {{}}, "capabilities": []}}}}).encode() + TERMINATOR)
    while line := await reader.readline():
        cmd = json.loads(line)
        seen["commands"].append(cmd); save()
        ret = {{"query-chardev": [], "query-vnc": {{"enabled": True, "host": "127.0.0.1",
               "service": "5917", "family": "ipv4", "auth": "vnc"}}}}.get(cmd["execute"], {{}})
        writer.write(json.dumps({{"return": ret, "id": cmd["id"]}}).encode() + TERMINATOR)
        await writer.drain()
async def main():
    save()
    if MODE == "mute":
        await asyncio.Event().wait()
    servers = [await asyncio.start_unix_server(serve, p) for p in chardevs.values()]
    xs = await XenStore.open(os.path.join(run_dir, "xenstored.sock"))
    await xs.write("/local/domain/0/device-model/%s/state" % domid, "running")
    await asyncio.Event().wait()
asyncio.run(main())
'''


def write_fake_dm(directory: str, terminator: bytes = b"\r\n", mode: str = "ok") -> str:
    path = os.path.join(directory, f"fake-dm-{mode}")
    Path(path).write_text(FAKE_DM.format(python=sys.executable, terminator=terminator, mode=mode))
    os.chmod(path, 0o755)
    return path


def _dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:      # a zombie nobody reaped yet is dead too
            return f.read().rsplit(") ", 1)[1].startswith("Z")
    except (ProcessLookupError, FileNotFoundError):
        return True


def test_create_runs_the_libxl_dm_sequence(host):
    dm = write_fake_dm(host)
    vfb = "vnc=1,vnclisten=127.0.0.1,vncdisplay=3,vncpasswd=s3cret,keymap=de"

    async def scenario():
        result = await toolstack.create_domain(host, 2, "fbtest", memory=128, vfb=vfb, dm=dm,
                                               start_guest=False)
        assert result.summary() == "domain 2 (fbtest) created; VNC on 127.0.0.1:5917"
        seen = json.loads(Path(host, "fake-dm.json").read_text())
        # The captured argv shape (dm-argv-real-qemu.txt) with DIR for /var/run/xen.
        assert seen["argv"] == [
            dm, "-xen-domid", "2", "-no-shutdown",
            "-chardev", f"socket,id=libxl-cmd,path={host}/qmp-libxl-2,server=on,wait=off",
            "-mon", "chardev=libxl-cmd,mode=control",
            "-chardev", f"socket,id=libxenstat-cmd,path={host}/qmp-libxenstat-2,server=on,wait=off",
            "-mon", "chardev=libxenstat-cmd,mode=control",
            "-nodefaults", "-no-user-config", "-xen-attach", "-name", "fbtest",
            "-vnc", "127.0.0.1:3,password=on,to=99", "-display", "none", "-k", "de",
            "-machine", "xenpv", "-m", "128"]
        assert (seen["env_sim"], seen["cwd"], seen["console_limit"]) == (host, "/", "1048576")
        assert [(c["execute"], c.get("arguments")) for c in seen["commands"]] == [
            ("qmp_capabilities", None), ("query-chardev", None), ("query-vnc", None),
            ("change-vnc-password", {"password": "s3cret"})]
        xs = await XenStore.open(os.path.join(host, "xenstored.sock"))
        dom = "/local/domain/2"
        assert await xs.read_str(f"{dom}/console/vnc-port") == "5917"
        assert await xs.get_perms(f"{dom}/console/vnc-port") == ["n0", "r2"]   # as captured
        assert await xs.read_str(f"{dom}/console/vnc-listen") == "127.0.0.1"
        assert await xs.read_str(f"{dom}/console/vnc-pass") == "s3cret"
        assert await xs.read_str("/local/domain/0/backend/vfb/2/0/vncpasswd") == "s3cret"
        assert await xs.read_str(f"/vm/{result.uuid}/vncpasswd") == "s3cret"   # xend's place
        assert await xs.read_int(f"{dom}/image/device-model-pid") == result.dm_pid
        assert await xs.get_perms(f"{dom}/image/device-model-pid") == ["n0", "r2"]
        assert Path(host, "dom2", "dm.pid").read_text().strip() == str(result.dm_pid)
        assert os.path.exists(os.path.join(host, "qemu-dm-fbtest.log"))
        xs.close()

        await toolstack.destroy_domain(host, 2)
        assert _dead(result.dm_pid)
        # SIGKILL, as libxl 4.17 sent: the DM's handlers for catchable signals never ran.
        assert not [f for f in os.listdir(host) if f.startswith("fake-dm-caught")]
        assert not os.path.exists(os.path.join(host, "qmp-libxl-2"))
        assert not os.path.exists(os.path.join(host, "qmp-libxenstat-2"))
    asyncio.run(scenario())


def test_dm_replying_with_bare_newline_is_rejected(host):
    dm = write_fake_dm(host, terminator=b"\n")

    async def scenario():
        with pytest.raises(toolstack.ToolstackError, match=r"not terminated by \\r\\n"):
            await toolstack.create_domain(host, 2, "bare", vfb="vnc=1", dm=dm, start_guest=False)
        assert _dead(json.loads(Path(host, "fake-dm.json").read_text())["pid"])
        xs = await XenStore.open(os.path.join(host, "xenstored.sock"))
        assert await xs.read("/local/domain/2", None) is None       # cleaned up, as libxl does
        assert not await xs.is_domain_introduced(2)
        xs.close()
        assert not os.path.exists(os.path.join(host, "dom2"))
    asyncio.run(scenario())


def test_dm_that_never_gets_running_times_out_naming_its_log(host):
    dm = write_fake_dm(host, mode="mute")

    async def scenario():
        started = time.monotonic()
        with pytest.raises(toolstack.ToolstackError,
                           match=rf"did not write 'running'.*{host}/qemu-dm-mute.log"):
            await toolstack.create_domain(host, 2, "mute", vfb="vnc=1", dm=dm,
                                          start_guest=False, dm_timeout=1.0)
        assert time.monotonic() - started < 10
    asyncio.run(scenario())


def test_dm_exiting_early_fails_at_once(host):
    dm = os.path.join(host, "false-dm")
    Path(dm).write_text("#!/bin/sh\necho 'no xen here' >&2\nexit 1\n")
    os.chmod(dm, 0o755)

    async def scenario():
        with pytest.raises(toolstack.ToolstackError, match="exited before it was running"):
            await toolstack.create_domain(host, 2, "early", vfb="vnc=1", dm=dm,
                                          start_guest=False, dm_timeout=30)
        assert "no xen here" in Path(host, "qemu-dm-early.log").read_text()
    asyncio.run(scenario())


# ---- argv and vfb parsing ------------------------------------------------------------

def test_dm_argv_matches_the_capture():
    captured = Path("/work/shared/reference/libxl-4.17-captured/dm-argv-real-qemu.txt")
    if not captured.exists():
        pytest.skip("reference capture not available")
    argv = [line.split("=", 1)[1] for line in captured.read_text().splitlines()
            if line.startswith("argv[")]
    ours = toolstack.dm_argv([argv[0]], "/var/run/xen", 1, "fbtest", 256,
                             toolstack.parse_vfb("vnc=1,vnclisten=127.0.0.1,vncdisplay=0"))
    assert ours == argv


def test_vnc_arg_rules():
    p = toolstack.parse_vfb
    assert toolstack.vnc_arg(p("vncunused=0")) == "127.0.0.1:0"
    assert toolstack.vnc_arg(p("vnclisten=0.0.0.0,vncdisplay=7,vncpasswd=x")) == \
        "0.0.0.0:7,password=on,to=99"
    assert toolstack.vnc_arg(p("vnclisten=127.0.0.1:5,vncunused=0")) == "127.0.0.1:5"
    with pytest.raises(toolstack.ToolstackError):
        toolstack.vnc_arg(p("vnclisten=127.0.0.1:5,vncdisplay=2"))
    argv = toolstack.dm_argv(["dm"], "/r", 4, "n", 64, p("vnc=0,sdl=1"))
    assert argv[argv.index("-vnc") + 1] == "none" and "-sdl" in argv
    assert "-vnc" in toolstack.dm_argv(["dm"], "/r", 4, "n", 64, None)


# ---- fbdump against a hand-built guest memory (independent of the guest) -----------

def _build_guest_fb(mem: GuestMemory, guest_abi: abi.GuestAbi, width: int, height: int,
                    line_length: int, picture: np.ndarray) -> int:
    """Lay out a shared page + pd[] + scattered fb frames as Linux fbfront does."""
    rng = np.random.default_rng(1)
    fb_len = line_length * height
    n_pages = -(-fb_len // 4096)
    n_dirs = -(-n_pages * guest_abi.entry_size // 4096)
    free = [int(f) for f in rng.permutation(np.arange(1, mem.nr_frames))]
    page_ref, dirs, frames = free[0], free[1:1 + n_dirs], free[1 + n_dirs:1 + n_dirs + n_pages]
    page = mem.frame(page_ref)
    abi.FB_HEADER.pack_into(page, 0, 0, 0, 0, 0, width, height, line_length, n_pages * 4096, 32)
    for i, d in enumerate(dirs):
        struct.pack_into(guest_abi.entry_format, page, guest_abi.pd_offset + i * guest_abi.entry_size, d)
    entries = np.zeros(n_dirs * 4096 // guest_abi.entry_size, dtype=f"<u{guest_abi.entry_size}")
    entries[:n_pages] = frames
    raw = entries.view(np.uint8)
    for i, d in enumerate(dirs):
        mem.frame(d)[:] = raw[i * 4096:(i + 1) * 4096]
    rows = np.zeros((height, line_length), np.uint8)
    rows[:, :width * 4] = picture.astype("<u4").view(np.uint8).reshape(height, width * 4)
    flat = np.zeros(n_pages * 4096, np.uint8)
    flat[:fb_len] = rows.reshape(-1)
    for i, f in enumerate(frames):
        mem.frame(f)[:] = flat[i * 4096:(i + 1) * 4096]
    return page_ref


@pytest.mark.parametrize("guest_abi", [abi.ABI_X86_64, abi.ABI_X86_32], ids=lambda a: a.name)
def test_fbdump_walks_pd_for_each_abi(tmp_path, guest_abi):
    width, height, line_length = 100, 70, 448            # padded rows
    y, x = np.mgrid[0:height, 0:width].astype(np.uint32)
    picture = (x * 2) << 16 | (y * 3) << 8 | (x ^ y) & 0xFF
    with GuestMemory.create(str(tmp_path / "memory"), 256 * 4096) as mem:
        page_ref = _build_guest_fb(mem, guest_abi, width, height, line_length, picture)
        for protocol in (guest_abi.name, None):          # explicit, and QEMU's guess
            rgb = read_framebuffer(mem, page_ref, protocol)
            assert rgb.shape == (height, width, 3)
            assert (rgb[..., 0] == (picture >> 16) & 0xFF).all()
            assert (rgb[..., 1] == (picture >> 8) & 0xFF).all()
            assert (rgb[..., 2] == picture & 0xFF).all()


def test_fbdump_rejects_hostile_pages(tmp_path):
    with GuestMemory.create(str(tmp_path / "memory"), 16 * 4096) as mem:
        page = mem.frame(1)
        abi.FB_HEADER.pack_into(page, 0, 0, 0, 0, 0, 800, 600, 3200, 2 << 20, 32)
        struct.pack_into("<Q", page, 40, 10_000)          # pd[0] outside guest RAM
        with pytest.raises(FbdumpError, match="outside its memory"):
            read_framebuffer(mem, 1, "x86_64-abi")
        abi.FB_HEADER.pack_into(page, 0, 0, 0, 0, 0, -5, 600, 3200, 2 << 20, 32)
        with pytest.raises(FbdumpError, match="bad framebuffer size"):
            read_framebuffer(mem, 1, "x86_64-abi")
        abi.FB_HEADER.pack_into(page, 0, 0, 0, 0, 0, 800, 600, 100, 2 << 20, 32)
        with pytest.raises(FbdumpError, match="line_length"):
            read_framebuffer(mem, 1, "x86_64-abi")
        abi.FB_HEADER.pack_into(page, 0, 0, 0, 0, 0, 800, 600, 3200, 1 << 30, 32)
        with pytest.raises(FbdumpError, match="does not fit"):
            read_framebuffer(mem, 1, "x86_64-abi")


def test_read_input_log_skips_partial_lines(tmp_path):
    os.makedirs(tmp_path / "dom3")
    (tmp_path / "dom3" / "input.log").write_text('{"type": "key", "code": 30}\n[1]\n{"type": "po')
    assert toolstack.read_input_log(str(tmp_path), 3) == [{"type": "key", "code": 30}]
    lines = []
    toolstack.follow_input_log(str(tmp_path), 3, lines.append, follow=False)
    assert lines == ['{"type": "key", "code": 30}', "[1]", '{"type": "po']


# ---- with the reference guest and the real device model -----------------------------

@needs_guest
def test_fbdump_of_the_reference_guest(host):
    from pyxenfb.sim.picture import test_picture

    async def scenario():
        result = await toolstack.create_domain(host, 1, "guest", vfb="vnc=1", dm=None,
                                               width=320, height=200)
        xs = await XenStore.open(os.path.join(host, "xenstored.sock"))
        try:
            await wait_node(xs, "/local/domain/1/device/vfb/0/state", lambda v: v in ("3", "4"),
                             pids=(result.guest_pid,))
            rgb = toolstack.fbdump_array(host, 1)
            want = test_picture(320, 200)
            assert rgb.shape == (200, 320, 3)
            assert (rgb[..., 0] == (want >> 16) & 0xFF).all()
            assert (rgb[..., 2] == want & 0xFF).all()
        finally:
            xs.close()
            await toolstack.destroy_domain(host, 1)
    asyncio.run(scenario())


@needs_dm
def test_create_with_guest_and_pyqemu_dm_connects(host):
    async def scenario():
        result = await toolstack.create_domain(host, 1, "full", vfb="vnc=1,vncdisplay=37",
                                               dm="default", width=320, height=200)
        xs = await XenStore.open(os.path.join(host, "xenstored.sock"))
        try:
            assert result.vnc_port is not None and result.vnc_port >= VNC_BASE_PORT + 37
            assert await xs.read_str("/local/domain/1/console/vnc-port") == str(result.vnc_port)
            for dev in ("vfb", "vkbd"):
                await wait_node(xs, f"/local/domain/0/backend/{dev}/1/0/state", lambda v: v == "4",
                                 pids=(result.guest_pid, result.dm_pid))
        finally:
            xs.close()
            await toolstack.destroy_domain(host, 1)
        assert _dead(result.dm_pid) and _dead(result.guest_pid)
    asyncio.run(scenario())


def test_stopping_the_host_powers_off_its_domains():
    run_dir = _short_run_dir()
    proc = start_host(run_dir)
    try:
        res = asyncio.run(toolstack.create_domain(run_dir, 6, "orphan", vfb="vnc=1", dm=None))
        assert not _dead(res.guest_pid)
    finally:
        assert stop_host(proc) == 0
    wait_until(lambda: _dead(res.guest_pid), 10, "the guest to die with its host")
    shutil.rmtree(run_dir, ignore_errors=True)
