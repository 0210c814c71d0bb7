"""Run inside a fresh Debian 12 root where the pyxenfb .deb is installed
(tests/test_deb.py copies it in and runs it with the package's own
interpreter, /usr/lib/pyxenfb/venv/bin/python).  Prints one JSON object with
what it saw; the test on the host side asserts on it.

It exercises the installed files only: `pyxenfb-sim host`, a domain whose
device model is /usr/bin/pyqemu-dm (a cold start), the zygote started as its
socket unit would start it (systemd-socket-activate with the unit's
ExecStart) and a domain forked through it, the console started as its unit
would start it, then an upgrade (`dpkg -i` of the same .deb) and `apt-get
remove pyxenfb` with both device models running.  The processes it starts are
left for the host side to kill (it finds them by their root directory):
after removal there is no pyxenfb-sim to destroy domains with.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import select
import shlex
import socket
import struct
import subprocess
import sys
import time

RUN_DIR = "/run/pyxenfb-sim"      # not /tmp: the console unit has a private /tmp
ZYGOTE_SOCK = "/run/xen/pyxenfb-zygote.sock"
UNIT_DIR = "/lib/systemd/system"
FORKED = re.compile(r"zygote (\S+) forked the device model as pid (\d+)")
result: dict = {}


def run(*argv: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise AssertionError(f"no line from pid {proc.pid} within {timeout} s")
    return proc.stdout.readline()


def cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a.decode() for a in f.read().split(b"\0")[:-1]]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return not f.read().rsplit(") ", 1)[1].startswith("Z")
    except FileNotFoundError:
        return False


def ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(") ", 1)[1].split()[1])


async def _frontends_connected(domid: int, timeout: float) -> None:
    from pyxenfb.platform.xenstore import XenStore
    xs = await XenStore.open(os.path.join(RUN_DIR, "xenstored.sock"))
    try:
        changed = asyncio.Event()
        paths = [p for dev in ("vfb", "vkbd")
                 for p in (f"/local/domain/0/backend/{dev}/{domid}/0/state",
                           f"/local/domain/{domid}/device/{dev}/0/state")]
        for i, path in enumerate(paths):
            await xs.watch(path, f"w{i}", lambda _p, _t: changed.set())

        async def until_all():
            while True:
                changed.clear()
                if all([await xs.read_str(p) == "4" for p in paths]):
                    return
                await xs.until(changed.wait())
        await asyncio.wait_for(until_all(), timeout)
    finally:
        xs.close()


def frontends_connected(domid: int, timeout: float = 30.0) -> None:
    asyncio.run(_frontends_connected(domid, timeout))


def vnc_capture(port: int) -> tuple[int, int, bytes]:
    """The whole screen over RFB 3.8, Raw encoding, as RGB bytes (stdlib only:
    this also runs once the package, and its Python packages, are removed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        f = s.makefile("rb")

        def read(n: int) -> bytes:
            data = f.read(n)
            if len(data) != n:
                raise AssertionError(f"VNC: connection closed ({len(data)} of {n} bytes)")
            return data
        assert read(12) == b"RFB 003.008\n"
        s.sendall(b"RFB 003.008\n")
        types = read(read(1)[0])
        assert 1 in types, types                        # None: no password on this display
        s.sendall(b"\x01")
        assert read(4) == b"\0\0\0\0"
        s.sendall(b"\x01")                              # shared
        width, height = struct.unpack(">HH", read(4))
        read(16)
        read(struct.unpack(">I", read(4))[0])           # name
        # 32 bpp, depth 24, little-endian true colour: bytes B, G, R, x
        s.sendall(struct.pack(">B3xBBBBHHHBBB3x", 0, 32, 24, 0, 1, 255, 255, 255, 16, 8, 0))
        s.sendall(struct.pack(">BxHi", 2, 1, 0))        # SetEncodings: Raw
        s.sendall(struct.pack(">BBHHHH", 3, 0, 0, 0, width, height))
        pixels = bytearray(width * height * 4)
        covered = 0
        while covered < width * height:
            kind = read(1)[0]
            if kind == 2:                               # Bell
                continue
            if kind == 3:                               # ServerCutText
                read(3)
                read(struct.unpack(">I", read(4))[0])
                continue
            assert kind == 0, f"VNC: unexpected message {kind}"
            read(1)
            for _ in range(struct.unpack(">H", read(2))[0]):
                x, y, w, h, enc = struct.unpack(">HHHHi", read(12))
                assert enc == 0, f"VNC: encoding {enc} though only Raw was asked for"
                data = read(w * h * 4)
                for row in range(h):
                    start = ((y + row) * width + x) * 4
                    pixels[start:start + w * 4] = data[row * w * 4:(row + 1) * w * 4]
                covered += w * h
    rgb = bytearray(width * height * 3)
    rgb[0::3], rgb[1::3], rgb[2::3] = pixels[2::4], pixels[1::4], pixels[0::4]
    return width, height, bytes(rgb)


def fbdump_rgb(domid: int) -> tuple[int, int, bytes]:
    out = f"/tmp/fb{domid}.png"
    done = run("pyxenfb-sim", "fbdump", "--run-dir", RUN_DIR, "--domid", str(domid), out)
    assert done.returncode == 0, done.stderr
    from PIL import Image
    with Image.open(out) as im:
        return im.width, im.height, im.convert("RGB").tobytes()


def same_picture(domid: int, port: int, timeout: float = 20.0) -> dict:
    """The guest's framebuffer (fbdump) and what VNC serves agree; the guest
    may still be drawing, so compared again until they do, bounded."""
    deadline = time.monotonic() + timeout
    while True:
        guest, served = fbdump_rgb(domid), vnc_capture(port)
        if guest == served or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    w, h, rgb = served
    colours = len({rgb[i:i + 3] for i in range(0, len(rgb), 3 * 97)})
    return {"equal": guest == served, "size": [w, h], "colours": colours}


def create(domid: int, env: dict | None = None, *extra: str) -> dict:
    """A domain whose device model is the installed pyqemu-dm (extra: more
    `pyxenfb-sim create` options, such as --dm-restrict)."""
    done = run("pyxenfb-sim", "create", "--run-dir", RUN_DIR, "--domid", str(domid),
               "--name", f"g{domid}", "--vfb", f"vnc=1,vncdisplay={domid}",
               "--dm", "/usr/bin/pyqemu-dm", *extra, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    port = int(re.search(r"VNC on 127\.0\.0\.1:(\d+)", done.stdout).group(1))
    frontends_connected(domid)
    log = open(os.path.join(RUN_DIR, f"qemu-dm-g{domid}.log")).read()
    return {"port": port, "log": log}


async def _dm_pid(domid: int) -> int:
    from pyxenfb.platform.xenstore import XenStore
    xs = await XenStore.open(os.path.join(RUN_DIR, "xenstored.sock"))
    try:
        return int(await xs.read_str(f"/local/domain/{domid}/image/device-model-pid"))
    finally:
        xs.close()


def written_under_usr_lib(since: str) -> list[str]:
    done = run("find", "/usr/lib/pyxenfb", "-newer", since)
    return done.stdout.split()


def main() -> None:
    marker = "/tmp/deb-inside.started"
    open(marker, "w").close()
    done = run("pyqemu-dm", "--help")
    result["help"] = {"rc": done.returncode, "first": done.stdout.splitlines()[:1]}
    result["pyqemu_dm"] = os.path.realpath("/usr/bin/pyqemu-dm")

    os.makedirs(RUN_DIR)
    host = subprocess.Popen(["pyxenfb-sim", "host", "--run-dir", RUN_DIR],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    result["host"] = read_line(host, 60).strip()

    # 1. a cold start of the installed pyqemu-dm (no zygote yet)
    env = dict(os.environ, PYXENFB_ZYGOTE="off")
    d1 = create(1, env)
    d1["pid"] = asyncio.run(_dm_pid(1))
    d1["cmdline"] = cmdline(d1["pid"])
    d1["picture"] = same_picture(1, d1["port"])
    result["cold"] = d1

    # 2. the zygote as its socket unit starts it
    unit = open(os.path.join(UNIT_DIR, "pyxenfb-zygote.service")).read()
    exec_start = shlex.split(re.search(r"^ExecStart=(.*)$", unit, re.M).group(1))
    unit_env = re.findall(r"^Environment=(.*)$", unit, re.M)
    socket_unit = open(os.path.join(UNIT_DIR, "pyxenfb-zygote.socket")).read()
    listen = re.search(r"^ListenSequentialPacket=(.*)$", socket_unit, re.M).group(1)
    result["zygote_listen"] = listen
    os.makedirs(os.path.dirname(listen), exist_ok=True)     # systemd makes it for the unit
    activate = ["systemd-socket-activate", "--seqpacket", "-l", listen,
                *[a for e in unit_env for a in ("-E", e)], "--", *exec_start]
    zygote = subprocess.Popen(activate, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while not os.path.exists(listen):
        assert time.monotonic() < deadline and zygote.poll() is None, "no socket from systemd-socket-activate"
        time.sleep(0.05)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
        probe.connect(listen)                               # activates the service
        result["zygote_ready"] = read_line(zygote, 120).strip()
    result["zygote_pid"] = zygote.pid
    # The launcher's default socket (/var/run/xen/..., /run/xen/... on Debian)
    # is the unit's; the sim's create turns the zygote off unless told.
    from pyxenfb.zygote.standin import DEFAULT_SOCKET
    result["default_socket"] = [DEFAULT_SOCKET, os.path.realpath(DEFAULT_SOCKET)]
    d2 = create(2, dict(os.environ, PYXENFB_ZYGOTE=DEFAULT_SOCKET))
    d2["standin"] = asyncio.run(_dm_pid(2))
    m = FORKED.search(d2["log"])
    d2["child"] = int(m.group(2)) if m else None
    d2["child_ppid"] = ppid(d2["child"]) if m else None
    d2["standin_cmdline"] = cmdline(d2["standin"])
    d2["picture"] = same_picture(2, d2["port"])
    result["zygote"] = d2

    # 3. the console as its unit starts it (options from /etc/default), on the sim
    unit = open(os.path.join(UNIT_DIR, "pyxenfb-console.service")).read()
    exec_start = re.search(r"^ExecStart=(.*)$", unit, re.M).group(1)
    defaults = re.search(r"^EnvironmentFile=-?(.*)$", unit, re.M).group(1)
    console = subprocess.Popen(["sh", "-c", f". {defaults}; exec {exec_start} --port 0 --sim {RUN_DIR}"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = read_line(console, 60).strip()
        url = re.search(r"serving (http://127\.0\.0\.1:\d+/)", line)
        import urllib.request
        with urllib.request.urlopen(url.group(1) + "api/domains", timeout=10) as answer:
            domains = json.load(answer)
        result["console"] = {"line": line, "domains": sorted(d.get("name") for d in domains)}
    finally:
        console.terminate()
        result.setdefault("console", {})["exit"] = console.wait(10)

    # Bytecode is shipped (unchecked-hash): nothing ran so far wrote under /usr/lib/pyxenfb
    result["written"] = written_under_usr_lib(marker)

    # 4. an upgrade (the same .deb again: dpkg runs prerm upgrade, unpacks
    # over the running files, postinst configure OLD-VERSION), then removal,
    # both with both device models running
    pids = {"cold": d1["pid"], "standin": d2["standin"], "child": d2["child"]}
    before = {1: vnc_capture(d1["port"]), 2: vnc_capture(d2["port"])}
    done = run("dpkg", "-i", sys.argv[1], timeout=300)
    result["upgrade"] = {
        "rc": done.returncode,
        "output": done.stdout[-2000:] + done.stderr[-2000:],
        "alive": {k: alive(p) for k, p in pids.items()},
        "serving": {d: vnc_capture(p) == before[d] for d, p in ((1, d1["port"]), (2, d2["port"]))},
    }
    done = run("apt-get", "remove", "-y", "pyxenfb",
               env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"), timeout=300)
    result["remove"] = {
        "rc": done.returncode,
        "output": done.stdout[-2000:] + done.stderr[-2000:],
        "venv_left": os.path.exists("/usr/lib/pyxenfb/venv/bin/python"),
        "bin_left": os.path.lexists("/usr/bin/pyqemu-dm"),
        "alive": {k: alive(p) for k, p in pids.items()},
        "serving": {d: vnc_capture(p) == before[d] for d, p in ((1, d1["port"]), (2, d2["port"]))},
    }
    result["pids"] = sorted(set(pids.values()) | {host.pid, zygote.pid})


def report(main, result: dict) -> None:
    """Run main() and print `result` as one JSON object; if main failed, with
    its traceback under "error" (the JSON says how far it got)."""
    try:
        main()
    except BaseException as e:
        import traceback
        result["error"] = "".join(traceback.format_exception(e))
    json.dump(result, sys.stdout)
    sys.stdout.flush()


if __name__ == "__main__":
    report(main, result)
