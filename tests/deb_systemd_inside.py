"""Run inside a Debian 12 root booted with systemd as PID 1 (systemd-nspawn
-b), where the pyxenfb .deb is installed: tests/test_deb.py enters it with
nsenter and runs this with the package's own interpreter.  Prints one JSON
object with what it saw; the host side asserts on it.

What only a running systemd shows (deb_inside.py runs the rest in a plain
root): the socket and service units as systemd starts them at boot, with
their hardening; device models forked by the unit's zygote, in the unit's
cgroup, plain and under dm_restrict (the child joins the stand-in's mount
namespace from the unit's own); `systemctl restart` of the zygote and
`apt-get remove pyxenfb` (prerm's `deb-systemd-invoke stop`) leaving the
running device models alone, as KillMode=process promises.
"""
from __future__ import annotations

import asyncio
import http.cookiejar
import json
import os
import re
import select
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from deb_inside import (FORKED, RUN_DIR, ZYGOTE_SOCK, _dm_pid, alive, create, ppid,  # noqa: E402
                        read_line, report, run, same_picture, vnc_capture)
from pyxenfb.zygote.standin import DEFAULT_SOCKET  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

SERVICE = "pyxenfb-zygote.service"
CONSOLE = "pyxenfb-console.service"
CONSOLE_PORT = 8080
CONSOLE_PASSWORD = "console-test-password"
SOCKET = "pyxenfb-zygote.socket"
result: dict = {}


def show(unit: str, *props: str) -> dict:
    done = run("systemctl", "show", unit, *[f"--property={p}" for p in props])
    return dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)


def journal_match(unit: str, pattern: str, timeout: float = 120.0) -> re.Match:
    """The first line of `unit`'s journal, old or new, that matches
    `pattern` (a compiled regex's search), waiting for it as it is written."""
    wanted = re.compile(pattern)
    follow = subprocess.Popen(["journalctl", "-u", unit, "-o", "cat", "--no-pager", "--follow",
                               "--lines=all"], stdout=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    pending = b""
    try:
        while True:
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if m := wanted.search(line.decode(errors="replace")):
                    return m
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([follow.stdout], [], [], remaining)[0]:
                raise AssertionError(f"no line matching {pattern!r} in {unit}'s journal in {timeout} s")
            chunk = os.read(follow.stdout.fileno(), 1 << 16)
            if not chunk:
                raise AssertionError(f"journalctl for {unit} ended without {pattern!r}")
            pending += chunk
    finally:
        follow.kill()
        follow.wait()


def zygote_ready(*known: int) -> re.Match:
    """The ready line of the first zygote not in `known` (its pid: group 1)."""
    skip = "|".join(str(pid) for pid in known) or "-"
    return journal_match(SERVICE, rf"ready on .* pid (?!(?:{skip})\))(\d+)\)")


def cgroup(pid: int) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        lines = f.read().splitlines()
    # the unified line (0::) where there is one, else systemd's named hierarchy
    for prefix in ("0::", "1:name=systemd:"):
        for line in lines:
            if line.startswith(prefix):
                return line[len(prefix):]
    return lines[0].split(":", 2)[2] if lines else ""


def serving(ports: dict, before: dict) -> dict:
    """Per device model: does its VNC port still serve the picture it did?"""
    def same(port: int, picture) -> bool:
        try:
            return vnc_capture(port) == picture
        except (OSError, AssertionError, ValueError):     # gone: refused, closed, cut short
            return False
    return {k: same(p, before[k]) for k, p in ports.items()}


def main_pid() -> int:
    return int(show(SERVICE, "MainPID")["MainPID"])


def through_zygote(domid: int, *extra: str) -> dict:
    """A domain whose device model the unit's zygote forks (extra: more
    `pyxenfb-sim create` options, such as --dm-restrict)."""
    d = create(domid, dict(os.environ, PYXENFB_ZYGOTE=DEFAULT_SOCKET), *extra)
    m = FORKED.search(d["log"])
    d["child"] = int(m.group(2)) if m else None
    if d["child"]:
        standin = asyncio.run(_dm_pid(domid))
        d["child_ppid"] = ppid(d["child"])
        d["child_cgroup"] = cgroup(d["child"])
        d["child_root"] = os.readlink(f"/proc/{d['child']}/root")
        d["mnt_ns"] = {who: os.readlink(f"/proc/{pid}/ns/mnt")
                       for who, pid in (("child", d["child"]), ("standin", standin),
                                        ("zygote", d["child_ppid"]))}
    d["picture"] = same_picture(domid, d["port"])
    return d


def console_session(domids: list[int]) -> dict:
    """The console unit, as an admin enables it (/etc/default's options, a
    password file from --hash-password), under its own hardening: log in,
    list the domains, a thumbnail, and a WebSocket relayed to a domain's VNC."""
    hashed = subprocess.run(["pyxenfb-console", "--hash-password"], input=f"{CONSOLE_PASSWORD}\n" * 2,
                            capture_output=True, text=True, timeout=60)
    assert hashed.returncode == 0, hashed.stderr
    os.makedirs("/etc/pyxenfb", exist_ok=True)
    with open("/etc/pyxenfb/console.pw", "w") as f:
        f.write(hashed.stdout)
    with open("/etc/default/pyxenfb-console", "w") as f:
        f.write(f'PYXENFB_CONSOLE_OPTS="--listen 127.0.0.1 --port {CONSOLE_PORT} --sim {RUN_DIR} '
                '--password-file /etc/pyxenfb/console.pw"\n')
    done = run("systemctl", "start", CONSOLE)
    out = {"start_rc": done.returncode,
           "unit": show(CONSOLE, "ActiveState", "ProtectSystem", "PrivateTmp", "NoNewPrivileges",
                        "RestrictNamespaces", "CapabilityBoundingSet")}
    out["serving_line"] = journal_match(CONSOLE, r"serving http://.*").group(0)
    base = f"http://127.0.0.1:{CONSOLE_PORT}"
    jar = http.cookiejar.CookieJar()
    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    try:
        browser.open(base + "/api/domains", timeout=10)
        out["before_login"] = 200
    except urllib.error.HTTPError as e:
        out["before_login"] = e.code
    form = urllib.parse.urlencode({"password": CONSOLE_PASSWORD, "next": "/"}).encode()
    with browser.open(urllib.request.Request(base + "/login", data=form, headers={"Origin": base}),
                      timeout=30) as answer:
        out["login"] = {"status": answer.status, "cookies": sorted(c.name for c in jar)}
    with browser.open(base + "/api/domains", timeout=10) as answer:
        out["domains"] = sorted(d["domid"] for d in json.load(answer))
    with browser.open(f"{base}/domain/{domids[0]}/thumbnail.png", timeout=30) as answer:
        out["thumbnail"] = answer.read(8) == b"\x89PNG\r\n\x1a\n"
    cookie = "; ".join(f"{c.name}={c.value}" for c in jar)
    with connect(f"ws://127.0.0.1:{CONSOLE_PORT}/domain/{domids[0]}/websockify", origin=base,
                 additional_headers={"Cookie": cookie}, subprotocols=["binary"], open_timeout=10) as ws:
        out["relayed"] = ws.recv(timeout=10)[:12].decode("latin-1")
    out["still_active"] = show(CONSOLE, "ActiveState")["ActiveState"]
    return out


def main() -> None:
    # 1. booted: both units up, the socket as the unit says
    result["system"] = run("systemctl", "is-system-running", "--wait", timeout=120).stdout.strip()
    result["socket_unit"] = show(SOCKET, "ActiveState", "SubState")
    result["service_unit"] = show(SERVICE, "ActiveState", "SubState", "KillMode", "NoNewPrivileges",
                                  "ProtectSystem")
    st = os.stat(ZYGOTE_SOCK)
    result["socket_file"] = {"socket": stat.S_ISSOCK(st.st_mode), "mode": oct(st.st_mode & 0o777),
                             "uid": st.st_uid, "gid": st.st_gid}
    ready = zygote_ready()
    result["journal_ready"] = ready.group(0)
    first = result["zygote_pid"] = int(ready.group(1))
    result["run_dir"] = RUN_DIR

    os.makedirs(RUN_DIR)
    host = subprocess.Popen(["pyxenfb-sim", "host", "--run-dir", RUN_DIR],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    result["host"] = read_line(host, 60).strip()

    # 2. device models forked by the unit's zygote: plain, then dm_restrict
    result["plain"] = through_zygote(1)
    result["restricted"] = through_zygote(2, "--dm-restrict")

    # 3. the zygote restarted by systemd: the running device models go on,
    # and the next domain is forked by the new zygote
    children = {"plain": result["plain"]["child"], "restricted": result["restricted"]["child"]}
    ports = {"plain": result["plain"]["port"], "restricted": result["restricted"]["port"]}
    before = {k: vnc_capture(p) for k, p in ports.items()}
    done = run("systemctl", "restart", SERVICE)
    second = int(zygote_ready(first).group(1))
    result["restart"] = {
        "rc": done.returncode,
        "stderr": done.stderr,
        "new_pid": second,
        "main_pid": main_pid(),
        "alive": {k: alive(p) for k, p in children.items()},
        "serving": serving(ports, before),
    }
    # ... and one that crashes (SIGKILL): Restart=on-failure brings it back
    os.kill(second, signal.SIGKILL)
    third = int(zygote_ready(first, second).group(1))
    result["crash"] = {
        "new_pid": third,
        "main_pid": main_pid(),
        "restarts": show(SERVICE, "NRestarts")["NRestarts"],
        "alive": {k: alive(p) for k, p in children.items()},
        "serving": serving(ports, before),
    }
    result["after_restart"] = through_zygote(3)
    children["after_restart"] = result["after_restart"]["child"]
    ports["after_restart"] = result["after_restart"]["port"]
    before["after_restart"] = vnc_capture(ports["after_restart"])

    # 4. the console unit, against these domains
    result["console"] = console_session([1, 2, 3])

    # 5. an upgrade (the same .deb again) under a running systemd: debhelper's
    # postinst restarts the zygote; the device models go on
    done = run("dpkg", "-i", sys.argv[1], timeout=300)
    result["upgrade"] = {
        "rc": done.returncode,
        "output": done.stdout[-2000:] + done.stderr[-2000:],
        "new_pid": int(zygote_ready(first, second, third).group(1)),
        "alive": {k: alive(p) for k, p in children.items()},
        "serving": serving(ports, before),
    }

    # 6. removal under a running systemd: prerm stops both units for real
    done = run("apt-get", "remove", "-y", "pyxenfb",
               env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"), timeout=300)
    result["remove"] = {
        "rc": done.returncode,
        "output": done.stdout[-2000:] + done.stderr[-2000:],
        "service": show(SERVICE, "ActiveState")["ActiveState"],
        "socket": show(SOCKET, "ActiveState")["ActiveState"],
        "socket_file_left": os.path.exists(ZYGOTE_SOCK),
        "console": show(CONSOLE, "ActiveState")["ActiveState"],
        "alive": {k: alive(p) for k, p in children.items()},
        "serving": serving(ports, before),
    }


if __name__ == "__main__":
    report(main, result)
