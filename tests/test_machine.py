"""pyqemu-dm as a process: start-up errors, lifecycle, idle behaviour."""
import asyncio
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pyxenfb.sim import toolstack
from pyxenfb.sim.fbdump import fbdump_array
from pyxenfb.platform.xenstore import XenStore
from pyxenfb.rfb.listener import VNC_BASE_PORT
import simkit
from simkit import wait_node, wait_until

DM = [sys.executable, "-m", "pyxenfb.machine.cli"]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "PYXENFB_SIM"}
    env.update(extra)
    return env


def _dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie of ours counts as dead; so does one reaped while we read.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].startswith("Z")
    except (FileNotFoundError, ProcessLookupError):
        return True


def _wait_dead(pid: int, timeout: float) -> float:
    start = time.monotonic()
    wait_until(lambda: _dead(pid), timeout, f"pid {pid} to exit")
    return time.monotonic() - start


def test_no_xen_no_sim_is_one_line_and_exit_1():
    r = subprocess.run(DM + ["-M", "xenpv", "-d", "5"], env=_env(), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "/dev/xen" in lines[0] and "PYXENFB_SIM" in lines[0]
    assert "Traceback" not in r.stderr


def test_busy_vnc_port_is_one_line_and_exit_1(host):
    asyncio.run(toolstack.create_domain(host, 1, "busy", vfb="vnc=1", dm=None, start_guest=False))
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    display = blocker.getsockname()[1] - VNC_BASE_PORT
    try:
        r = subprocess.run(DM + ["-M", "xenpv", "-d", "1", "-vnc", f"127.0.0.1:{display}"],
                           env=_env(PYXENFB_SIM=host), capture_output=True, text=True, timeout=60)
    finally:
        blocker.close()
    assert r.returncode == 1, r.stderr
    errors = [line for line in r.stderr.splitlines() if "pyqemu-dm:" in line and "in use" in line]
    assert len(errors) == 1, r.stderr
    assert "Traceback" not in r.stderr


def test_create_destroy_create_same_domid(host):
    async def scenario():
        xs = await XenStore.open(os.path.join(host, "xenstored.sock"))
        try:
            for round_ in range(2):
                res = await toolstack.create_domain(host, 4, "again", vfb="vnc=1,vncdisplay=41,vncunused=1",
                                                    width=320, height=240)
                assert await xs.read_str("/local/domain/0/device-model/4/state") == "running"
                assert await xs.read_str("/local/domain/4/console/vnc-port") == str(res.vnc_port)
                for dev in ("vfb", "vkbd"):
                    await wait_node(xs, f"/local/domain/0/backend/{dev}/4/0/state", lambda v: v == "4")
                dump = await asyncio.to_thread(fbdump_array, host, 4)
                assert dump.shape == (240, 320, 3)
                await toolstack.destroy_domain(host, 4)          # SIGKILL to the DM
                _wait_dead(res.dm_pid, 10)
        finally:
            xs.close()
    asyncio.run(scenario())


def _start_dm(host: str, domid: int, *extra) -> subprocess.Popen:
    qmp = os.path.join(host, f"qmp-test-{domid}")
    proc = subprocess.Popen(DM + ["-xen-domid", str(domid), "-chardev",
                                  f"socket,id=libxl-cmd,path={qmp},server=on,wait=off",
                                  "-mon", "chardev=libxl-cmd,mode=control", "-machine", "xenpv",
                                  *extra], env=_env(PYXENFB_SIM=host),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc


def test_sigterm_exits_0_and_leaves_nothing(host):
    async def scenario():
        await toolstack.create_domain(host, 2, "term", vfb="vnc=1", dm=None, start_guest=False)
        xs = await XenStore.open(os.path.join(host, "xenstored.sock"))
        proc = _start_dm(host, 2, "-vnc", "127.0.0.1:0,to=99")
        try:
            await wait_node(xs, "/local/domain/0/device-model/2/state", lambda v: v == "running")
            assert os.path.exists(os.path.join(host, "qmp-test-2"))
            port = int(await xs.read_str("/local/domain/2/console/vnc-port"))
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0, proc.stderr.read()
            assert not os.path.exists(os.path.join(host, "qmp-test-2"))
            with socket.socket() as s:               # the VNC port is free again
                s.bind(("127.0.0.1", port))
        finally:
            if proc.poll() is None:
                proc.kill()
            xs.close()
    asyncio.run(scenario())


def test_release_domain_alone_makes_it_exit(host):
    """@releaseDomain alone (no signal) ends the device model: exit 0, and it
    says the domain is the reason.  (How fast: bench/, not a test assert.)"""
    async def scenario():
        await toolstack.create_domain(host, 3, "gone", vfb="vnc=1", dm=None, start_guest=False)
        xs = await XenStore.open(os.path.join(host, "xenstored.sock"))
        proc = _start_dm(host, 3, "-vnc", "127.0.0.1:0,to=99")
        try:
            await wait_node(xs, "/local/domain/0/device-model/3/state", lambda v: v == "running")
            t0 = time.monotonic()
            await xs.release_domain(3)
            code = await asyncio.to_thread(proc.wait, 10)
            print(f"exit {time.monotonic() - t0:.3f} s after @releaseDomain")
            stderr = proc.stderr.read()
            assert code == 0, stderr
            assert stderr.count("domain 3 is gone, exiting") == 1, stderr
        finally:
            if proc.poll() is None:
                proc.kill()
            xs.close()
    asyncio.run(scenario())


# x86_64 syscall numbers and which argument is the timeout (-1 / NULL: none).
_WAITS_WITHOUT_TIMEOUT = {
    232: (3, {0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF}),     # epoll_wait(fd, events, max, timeout)
    281: (3, {0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF}),     # epoll_pwait
    7: (2, {0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF}),       # poll(fds, n, timeout)
    202: (3, {0}),                                  # futex(uaddr, op, val, timeout)
}
# Blocking reads have no timeout argument: an event wakes them or nothing
# does (the zygote's stand-in waits for its child's exit status this way).
_READS = {0: "read", 47: "recvmsg"}


def _device_model_pids(res) -> list[int]:
    """The DM's pid and, through a zygote, the child that is the device model."""
    pids = [res.dm_pid]
    m = re.search(r"forked the device model as pid (\d+)", Path(res.dm_log).read_text(errors="replace"))
    return pids + [int(m.group(1))] if m else pids


def _threads_waiting_without_timeout(pid: int) -> dict[str, str]:
    """Every thread of `pid` -> why it is not blocked without a timeout ('' if it is)."""
    verdict = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/syscall") as f:
            fields = f.read().split()
        if fields[0] != "running" and int(fields[0]) in _READS:
            verdict[task] = ""
            continue
        if fields[0] == "running" or int(fields[0]) not in _WAITS_WITHOUT_TIMEOUT:
            verdict[task] = " ".join(fields[:6])
            continue
        arg, no_timeout = _WAITS_WITHOUT_TIMEOUT[int(fields[0])]
        verdict[task] = "" if int(fields[1 + arg], 16) in no_timeout else " ".join(fields[:6])
    return verdict


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86_64 syscall numbers")
def test_idle_guest_and_idle_vnc_client_cause_no_wakeups(host):
    """No polling: with nothing changing, every thread of the device model
    blocks without a timeout (the loop in epoll_wait(-1), the workers on a
    futex with none), so nothing but an event can wake it.  Its wake-ups per
    idle second are measured in bench/ (idle_wakeups)."""
    from vncdotool import api

    async def scenario():
        res = await toolstack.create_domain(host, 5, "idle", vfb="vnc=1,vncdisplay=45,vncunused=1")
        xs = await XenStore.open(os.path.join(host, "xenstored.sock"))
        try:
            for dev in ("vfb", "vkbd"):
                await wait_node(xs, f"/local/domain/0/backend/{dev}/5/0/state", lambda v: v == "4")
            return res
        finally:
            xs.close()
    res = asyncio.run(scenario())
    client = api.connect(f"127.0.0.1::{res.vnc_port}")
    try:
        img = np.asarray(client.refreshScreen().screen.convert("RGB"))
        assert img.shape == (600, 800, 3)
        pids = _device_model_pids(res)
        assert len(pids) == (2 if simkit.THROUGH_ZYGOTE else 1), pids
        wait_until(lambda: not any(v for pid in pids
                                   for v in _threads_waiting_without_timeout(pid).values()), 10,
                   lambda: f"every thread blocked without a timeout: "
                           f"{[_threads_waiting_without_timeout(pid) for pid in pids]}")
    finally:
        client.disconnect()
        asyncio.run(toolstack.destroy_domain(host, 5))


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86_64 syscall numbers")
def test_the_idle_check_catches_a_polling_loop():
    """The check above fails for a loop that wakes on a timer, and passes for
    one that only waits for events."""
    polling = "import asyncio\nasync def m():\n    while True: await asyncio.sleep(30)\nasyncio.run(m())"
    waiting = "import asyncio\nasync def m():\n    await asyncio.Event().wait()\nasyncio.run(m())"
    procs = {kind: subprocess.Popen([sys.executable, "-c", code])
             for kind, code in (("polling", polling), ("waiting", waiting))}
    try:
        for kind, proc in procs.items():
            wait_until(lambda: all(v.split()[0] in ("232", "281")
                                   for v in _blocked_in(proc.pid)), 10, f"{kind} in epoll_wait")
        assert any(_threads_waiting_without_timeout(procs["polling"].pid).values())
        assert not any(_threads_waiting_without_timeout(procs["waiting"].pid).values())
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()


def _blocked_in(pid: int) -> list[str]:
    """The syscall line of each thread of pid ('running' while it runs)."""
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/syscall") as f:
            out.append(f.read())
    return out


SLOW_NUMPY = '''
import importlib.abc, os, sys, time
class _SlowNumpy(importlib.abc.MetaPathFinder):
    """Makes the device model's numpy import take {delay} s (a TCG dom0 takes 7-16 s)."""
    def find_spec(self, name, path=None, target=None):
        if name == "numpy" and "pyxenfb.machine_pv" in sys.modules:
            sys.meta_path.remove(self)
            open(os.path.join({marks!r}, "numpy-begin"), "w").close()
            time.sleep({delay})
            open(os.path.join({marks!r}, "numpy-released"), "w").close()
        return None
sys.meta_path.insert(0, _SlowNumpy())
'''


@pytest.mark.skipif(simkit.THROUGH_ZYGOTE, reason="the zygote and its children: tests/test_zygote.py")
def test_a_dm_without_tls_never_loads_openssl(host):
    """OpenSSL costs a device model ~5 MB resident, and most have no TLS:
    asyncio is imported without it, and DES comes through ctypes rather than
    cffi's parser (util/lean_imports.py).  A cold DM that checks a VNC
    password shows the picture, refuses a wrong one, and maps none of OpenSSL."""
    res = asyncio.run(toolstack.create_domain(host, 8, "nossl", vfb="vnc=1,vncdisplay=58,vncunused=1,"
                                              "vncpasswd=s3cret", width=320, height=200))
    try:
        asyncio.run(simkit.wait_frontends_connected(host, 8))
        shot = simkit.vnc_screenshot(res.vnc_port, password="s3cret", timeout=20)
        assert np.array_equal(shot, fbdump_array(host, 8))
        assert not _password_accepted(res.vnc_port, "wrong")
        assert simkit.openssl_mapped(res.dm_pid) == []
    finally:
        asyncio.run(toolstack.destroy_domain(host, 8))


def _password_accepted(port: int, password: str) -> bool:
    """One VNC authentication with our own client's DES: the SecurityResult."""
    from pyxenfb.rfb.auth import vnc_response
    from rfb_harness import RawClient
    c = RawClient(port)
    try:
        assert c.recv_exact(12) == b"RFB 003.008\n"
        c.send(b"RFB 003.008\n")
        assert 2 in c.recv_exact(c.recv_exact(1)[0])
        c.send(b"\x02")
        c.send(vnc_response(password, c.recv_exact(16)))
        return c.recv_exact(4) == b"\0\0\0\0"
    finally:
        c.close()


@pytest.mark.skipif(simkit.THROUGH_ZYGOTE, reason="through a zygote, numpy was loaded before the fork")
def test_qmp_and_running_do_not_wait_for_numpy(host, tmp_path, monkeypatch):
    """libxl allows a DM 60 s to write `running` and each QMP command 10 s; numpy
    alone took 7-16 s in the emulated dom0. So `running`, QMP (with a password
    set before the VNC server exists) come first; the display stack follows."""
    from vncdotool import api
    delay = 12.0                                   # > libxl's 10 s QMP timeout
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SLOW_NUMPY.format(marks=str(tmp_path), delay=delay))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(hooks)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))

    t0 = time.monotonic()
    res = asyncio.run(toolstack.create_domain(host, 6, "slow", vfb="vnc=1,vncdisplay=56,vncunused=1,"
                                              "vncpasswd=s3cret", width=320, height=200))
    created = time.monotonic() - t0
    assert (tmp_path / "numpy-begin").exists(), "the hook never saw the DM import numpy"
    assert not (tmp_path / "numpy-released").exists(), \
        f"xl create returned after {created:.1f} s, only once numpy had loaded"

    async def connected():
        xs = await XenStore.open(os.path.join(host, "xenstored.sock"))
        try:
            for dev in ("vfb", "vkbd"):
                await wait_node(xs, f"/local/domain/0/backend/{dev}/6/0/state",
                                 lambda v: v == "4", timeout=delay + 30)
        finally:
            xs.close()
    asyncio.run(connected())
    assert (tmp_path / "numpy-released").exists()
    client = api.connect(f"127.0.0.1::{res.vnc_port}", password="s3cret", timeout=20)
    try:
        shot = np.asarray(client.refreshScreen().screen.convert("RGB"))
        client.mouseMove(100, 150)
    finally:
        client.disconnect()
    assert np.array_equal(shot, fbdump_array(host, 6))
    # xen-kbdfront asks for an absolute pointer only if the backend offered one
    # when it probed, i.e. before our backends existed: the machine advertises early.
    def positions():
        return [e for e in toolstack.read_input_log(host, 6) if e["type"] == "pos"]
    wait_until(positions, 10, lambda: f"an absolute position in {toolstack.read_input_log(host, 6)}")
    last = positions()[-1]
    assert (last["x"], last["y"]) == (100, 150)


def _free_display_pair() -> tuple[int, int]:
    """A display D whose VNC port (5900+D) and websocket=on port (5700+D) are free."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port - VNC_BASE_PORT < 0 or port - 200 < 1024:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port - 200))
        except OSError:
            continue
        return port - VNC_BASE_PORT, port - 200
    raise AssertionError("no free VNC/WebSocket port pair")


def _ws_rfb_banner(url: str, origin: str | None) -> bytes:
    from websockets.sync.client import connect
    with connect(url, origin=origin, open_timeout=10, proxy=None) as ws:
        return ws.recv(timeout=10)


@pytest.mark.parametrize("style", ["libxl", "xend"])
def test_websocket_port_and_origin_through_the_command_line(host, style):
    """-vnc ...,websocket=,websocket-origin= through the real command line
    (libxl's argv, and xend's -vnc -vncunused -vnclisten): the VNC port speaks
    RFB at once and takes no WebSocket; the WebSocket port serves clients
    without an Origin and the listed page, refuses another page with 403 and
    one log line; query-vnc marks the WebSocket client."""
    from websockets.exceptions import InvalidStatus

    from pyxenfb.sim.qmpclient import QmpClient
    from rfb_harness import RawClient
    domid = 6 if style == "libxl" else 7
    display, ws_port = _free_display_pair()
    allowed = "https://console.example"

    async def scenario():
        await toolstack.create_domain(host, domid, f"ws{domid}", vfb="vnc=1", dm=None, start_guest=False)
        xs = await XenStore.open(os.path.join(host, "xenstored.sock"))
        qmp_path = os.path.join(host, f"qmp-test-{domid}")
        if style == "libxl":
            proc = _start_dm(host, domid, "-vnc", f"127.0.0.1:{display},websocket={ws_port},"
                             f"websocket-origin={allowed.upper()}")
        else:
            proc = subprocess.Popen(
                DM + ["-M", "xenpv", "-d", str(domid), "-domain-name", f"ws{domid}",
                      "--vnc", f"0.0.0.0:{display},websocket=on,websocket-origin={allowed}",
                      "-vncunused", "-vnclisten", "127.0.0.1",
                      "-chardev", f"socket,id=c,path={qmp_path},server=on,wait=off",
                      "-mon", "chardev=c,mode=control"],
                env=_env(PYXENFB_SIM=host), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            await wait_node(xs, f"/local/domain/0/device-model/{domid}/state", lambda v: v == "running",
                            pids=(proc.pid,))
            port = int(await xs.read_str(f"/local/domain/{domid}/console/vnc-port"))
            assert port == 5900 + display
            return proc, port, qmp_path
        except BaseException:
            proc.kill()
            raise
        finally:
            xs.close()

    proc, port, qmp_path = asyncio.run(scenario())
    try:
        rfb = RawClient(port)                       # the banner at once, as any RFB server
        assert rfb.recv_exact(12) == b"RFB 003.008\n"
        rfb.close()
        with pytest.raises(Exception):              # no WebSocket on the VNC port
            _ws_rfb_banner(f"ws://127.0.0.1:{port}/", None)
        url = f"ws://127.0.0.1:{ws_port}/"
        assert _ws_rfb_banner(url, None) == b"RFB 003.008\n"          # websockify, scripts
        assert _ws_rfb_banner(url, allowed) == b"RFB 003.008\n"
        with pytest.raises(InvalidStatus) as refused:
            _ws_rfb_banner(url, "http://127.0.0.2:8000")
        assert refused.value.response.status_code == 403

        from websockets.sync.client import connect
        with connect(url, open_timeout=10, proxy=None) as ws:
            assert ws.recv(timeout=10) == b"RFB 003.008\n"
            ws.send(b"RFB 003.008\n")
            assert ws.recv(timeout=10) == b"\x01\x01"
            ws.send(b"\x01")
            ws.send(b"\x01")                        # shared
            got = b""
            while len(got) < 4 + 4 + 24:            # SecurityResult + ServerInit head
                got += ws.recv(timeout=10)

            async def query():
                qmp = await QmpClient.connect(qmp_path, "query-vnc")
                try:
                    await qmp.execute("qmp_capabilities")
                    return await qmp.execute("query-vnc")
                finally:
                    qmp.close()
            info = asyncio.run(query())
        assert [c["websocket"] for c in info["clients"]] == [True], info
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, stderr = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
    refusals = [line for line in stderr.splitlines() if "WebSocket refused" in line]
    assert len(refusals) == 1, stderr
    assert "Origin 'http://127.0.0.2:8000' is not allowed" in refusals[0]
    assert "websocket-origin=http://127.0.0.2:8000" in refusals[0]
    assert "port" in stderr and f"WebSocket (ws://) on port {ws_port}" in stderr, stderr
