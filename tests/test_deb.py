"""The Debian package (issue 23, docs/install.md) in a fresh Debian 12 root.

Not run by default (`-m deb`; scripts/deb-tier runs it).  Uses the .deb named
by $PYXENFB_DEB, else builds one with scripts/build-deb.  The root comes
from ../shared/tools/fresh-debian-root (mmdebstrap; needs root), the .deb is
installed there with apt from Debian's archive only, and tests/deb_inside.py
runs there with the package's own interpreter: `pyqemu-dm --help`, a
simulated host whose domain's device model is the installed pyqemu-dm (cold),
the zygote started as its socket unit starts it and a domain forked through
it (pictures compared: the guest's framebuffer against what VNC serves), the
console as its unit starts it, then an upgrade (the same .deb again) and
`apt-get remove pyxenfb`, with both device models running.  Then the same
root booted with systemd as PID 1 (systemd-nspawn), for what only a running
systemd shows: the units at boot, the unit's zygote forking device models in
its cgroup, restart, upgrade and removal leaving them serving
(tests/deb_systemd_inside.py).
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.deb, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parent.parent
VENV_PYTHON = "/usr/lib/pyxenfb/venv/bin/python"
UNITS = ["pyxenfb-zygote.socket", "pyxenfb-zygote.service", "pyxenfb-console.service"]


def _fresh_root_tool() -> str:
    for candidate in (os.environ.get("FRESH_DEBIAN_ROOT"), "/work/shared/tools/fresh-debian-root",
                      str(ROOT.parent / "shared" / "tools" / "fresh-debian-root")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.skip("no fresh-debian-root (../shared/tools)")


@pytest.fixture(scope="module")
def deb() -> Path:
    named = os.environ.get("PYXENFB_DEB")
    if named:
        return Path(named).resolve()
    subprocess.run([str(ROOT / "scripts" / "build-deb")], check=True, timeout=1500)
    version = subprocess.run(["dpkg-parsechangelog", "-S", "Version"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout.strip()
    return ROOT / "dist" / f"pyxenfb_{version}_amd64.deb"


def _processes_in(root: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                where = os.readlink(f"/proc/{entry}/root")
            except OSError:
                continue
            if where == root or where.startswith(root + "/"):
                pids.append(int(entry))
    return pids


@pytest.fixture
def debian_root():
    if os.geteuid() != 0:
        pytest.skip("fresh-debian-root needs root")
    tool = _fresh_root_tool()
    base = tempfile.mkdtemp(prefix="pyxenfb-deb-", dir="/var/tmp")
    root = os.path.join(base, "root")
    subprocess.run([tool, "make", root], check=True, stdout=subprocess.DEVNULL, timeout=600)

    def run(*argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([tool, "run", root, *argv], capture_output=True, text=True,
                              timeout=timeout)
    try:
        yield root, run
    finally:
        for pid in _processes_in(root):         # what the test started in there
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 20
        while _processes_in(root) and time.monotonic() < deadline:
            time.sleep(0.1)
        leftover = _processes_in(root)
        subprocess.run([tool, "rm", root], timeout=300)
        shutil.rmtree(base, ignore_errors=True)
        assert not leftover, f"processes left in the root: {leftover}"


def test_the_package_installs_runs_and_leaves_running_domains_on_removal(deb, debian_root):
    root, run = debian_root
    assert deb.is_file(), deb
    shutil.copy(deb, os.path.join(root, "tmp", deb.name))
    shutil.copy(ROOT / "tests" / "deb_inside.py", os.path.join(root, "tmp", "deb_inside.py"))

    # Installs from Debian's archive alone: every new package but ours has a
    # Debian candidate, and nothing is fetched from PyPI (no pip in the root).
    installed = ["dpkg-query", "-W", "-f", "${Package}\\n"]
    before = set(run(*installed).stdout.split())
    done = run("sh", "-c", "apt-get update -qq && DEBIAN_FRONTEND=noninteractive "
               f"apt-get install -y --no-install-recommends /tmp/{deb.name}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    names = sorted(set(run(*installed).stdout.split()) - before - {"pyxenfb"})
    assert "python3" in names and "libxenevtchn1" in names, names
    madison = run("apt-cache", "madison", *names).stdout
    from_debian = {line.split("|")[0].strip() for line in madison.splitlines()
                   if "debian" in line.split("|")[2]}
    assert set(names) <= from_debian, set(names) - from_debian
    assert run("sh", "-c", "command -v pip pip3").stdout == ""
    imports = run(VENV_PYTHON, "-c", "import numpy, PIL, pygame, zlib_ng, aiohttp, websockets, "
                  "Crypto, cffi, pyxs, pyxenfb.machine.cli, pyxenfb.zygote.server, pyxenfb.hostconsole.cli")
    assert imports.returncode == 0, imports.stderr

    # The man page, and the units as systemd reads them (systemd for
    # systemd-analyze and systemd-socket-activate, after our install).
    assert os.path.exists(os.path.join(root, "usr/share/man/man1/pyqemu-dm.1.gz"))
    done = run("sh", "-c", "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
               "--no-install-recommends systemd >/dev/null")
    assert done.returncode == 0, done.stderr[-3000:]
    verify = run("systemd-analyze", "verify", *[f"/lib/systemd/system/{u}" for u in UNITS])
    assert verify.returncode == 0 and verify.stdout + verify.stderr == "", verify.stdout + verify.stderr
    for unit in ("pyxenfb-zygote.socket", "pyxenfb-zygote.service"):     # enabled on install
        assert glob.glob(os.path.join(root, "etc/systemd/system/*.target.wants", unit)), unit
    assert not glob.glob(os.path.join(root, "etc/systemd/system/*/pyxenfb-console.service"))

    done = run(VENV_PYTHON, "/tmp/deb_inside.py", f"/tmp/{deb.name}", timeout=900)
    report = json.loads(done.stdout)
    assert "error" not in report, report["error"]
    assert report["help"] == {"rc": 0, "first": ["usage: pyqemu-dm [options]"]}
    assert report["pyqemu_dm"].startswith("/usr/lib/pyxenfb/venv/lib/python3.11/site-packages/")

    cold = report["cold"]                       # the C launcher's cold start: the package's Python
    assert cold["cmdline"][:3] == [VENV_PYTHON, "-m", "pyxenfb.machine.cli"], cold["cmdline"]
    assert "zygote" not in cold["log"]
    assert cold["picture"]["equal"] and cold["picture"]["size"] == [800, 600]
    assert cold["picture"]["colours"] > 16, cold["picture"]

    assert report["zygote_listen"] == "/run/xen/pyxenfb-zygote.sock"
    assert report["zygote_ready"].startswith(
        "pyxenfb-zygote: ready on /run/xen/pyxenfb-zygote.sock (socket from systemd)")
    forked = report["zygote"]
    default, resolved = report["default_socket"]     # the launcher's default is the unit's socket
    assert resolved == report["zygote_listen"], report["default_socket"]
    assert f"zygote {default} forked" in forked["log"], forked["log"]
    assert forked["child"] and forked["child_ppid"] == report["zygote_pid"], forked["log"]
    assert forked["standin_cmdline"][0] == "/usr/bin/pyqemu-dm"
    assert forked["picture"]["equal"] and forked["picture"]["colours"] > 16, forked["picture"]

    console = report["console"]                 # ExecStart with /etc/default's options
    assert console["line"].startswith("pyxenfb-console: serving http://127.0.0.1:"), console
    assert "(2 domains with VNC, sim XenStore)" in console["line"], console
    assert console["domains"] == ["g1", "g2"] and console["exit"] == 0, console

    assert report["written"] == [], report["written"]     # no .pyc written at run time

    upgraded = report["upgrade"]
    assert upgraded["rc"] == 0, upgraded["output"]
    assert "Preparing to unpack" in upgraded["output"] and "Setting up pyxenfb" in upgraded["output"]
    assert upgraded["alive"] == {"cold": True, "standin": True, "child": True}
    assert upgraded["serving"] == {"1": True, "2": True}

    removed = report["remove"]
    assert removed["rc"] == 0, removed["output"]
    assert "Removing pyxenfb" in removed["output"]
    assert not removed["venv_left"] and not removed["bin_left"]
    assert removed["alive"] == {"cold": True, "standin": True, "child": True}
    assert removed["serving"] == {"1": True, "2": True}     # the same picture over VNC as before


@pytest.fixture(scope="module")
def wheel_and_sdist(tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run([str(ROOT / "scripts" / "build-wheel")], cwd=ROOT, capture_output=True,
                          text=True, env=dict(os.environ, DIST=str(out)), timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return next(out.glob("pyxenfb-*.whl")), next(out.glob("pyxenfb-*.tar.gz"))


def test_pipx_installs_the_wheel_and_the_sdist_on_plain_debian(wheel_and_sdist, debian_root):
    """The second way in (README): Debian's pipx, as root, from PyPI for the
    dependencies.  The manylinux wheel's C launcher cold-starts its own venv's
    interpreter; the sdist installs where there is no C compiler at all."""
    root, run = debian_root
    wheel, sdist = wheel_and_sdist
    for f in (wheel, sdist):
        shutil.copy(f, os.path.join(root, "tmp", f.name))
    done = run("sh", "-c", "apt-get update -qq && DEBIAN_FRONTEND=noninteractive "
               "apt-get install -y -qq --no-install-recommends pipx >/dev/null")
    assert done.returncode == 0, done.stderr[-3000:]
    assert run("sh", "-c", "command -v cc gcc").stdout == ""            # no compiler in here
    assert run("python3", "-c", "import pyxenfb").returncode != 0

    venv_launcher = "/root/.local/pipx/venvs/pyxenfb/lib/python3.11/site-packages/pyxenfb/bin/pyqemu-dm"
    done = run("pipx", "install", f"/tmp/{wheel.name}", timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for command in ("/root/.local/bin/pyqemu-dm", venv_launcher):
        helped = run("env", "PYXENFB_ZYGOTE=off", command, "--help")
        assert helped.returncode == 0 and helped.stdout.startswith("usage: pyqemu-dm [options]"), \
            (command, helped.stdout[:500], helped.stderr[-2000:])
    with open(os.path.join(root, venv_launcher.lstrip("/")), "rb") as f:
        assert f.read(4) == b"\x7fELF"                                  # the wheel's C launcher

    assert run("pipx", "uninstall", "pyxenfb").returncode == 0
    done = run("pipx", "install", f"/tmp/{sdist.name}", timeout=900)    # built here, with no cc
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not os.path.exists(os.path.join(root, venv_launcher.lstrip("/")))
    helped = run("/root/.local/bin/pyqemu-dm", "--help")
    assert helped.returncode == 0 and helped.stdout.startswith("usage: pyqemu-dm [options]"), helped.stderr
    assert run("pipx", "uninstall", "pyxenfb").returncode == 0


def _boot(root: str, notify: socket.socket, log, timeout: float = 120) -> tuple[subprocess.Popen, int]:
    """Boot `root` with systemd as PID 1 (systemd-nspawn --boot); return once
    the container's systemd says it is up (nspawn's own readiness message,
    --notify-ready), with the container's PID 1 as nspawn names it."""
    boot = subprocess.Popen(["systemd-nspawn", "--quiet", "--register=no", "--keep-unit",
                             "--directory", root, "--machine", "pyxenfb-deb", "--boot",
                             "--console=passive", "--notify-ready=yes"],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                            env=dict(os.environ, NOTIFY_SOCKET=notify.getsockname()))
    deadline = time.monotonic() + timeout
    leader = None
    try:
        while True:
            notify.settimeout(max(0.0, deadline - time.monotonic()))
            fields = dict(line.split("=", 1) for line in notify.recv(4096).decode().splitlines()
                          if "=" in line)
            if "X_NSPAWN_LEADER_PID" in fields:
                leader = int(fields["X_NSPAWN_LEADER_PID"])
            if fields.get("READY") == "1" and leader is not None:
                return boot, leader
    except (TimeoutError, OSError):
        _shut_down(boot)
        raise AssertionError(f"the container did not boot in {timeout} s: "
                             + open(log.name, errors="replace").read()[-3000:]) from None


def _shut_down(boot: subprocess.Popen) -> None:
    """nspawn halts the container on SIGTERM, and ends it at once on a second one."""
    for _ in range(2):
        boot.terminate()
        try:
            boot.wait(60)
            return
        except subprocess.TimeoutExpired:
            pass
    boot.kill()
    boot.wait(10)


def test_the_units_under_a_running_systemd(deb, debian_root):
    """What deb_inside.py's plain root cannot show: the root booted with
    systemd as PID 1 (systemd-nspawn -b), the units started at boot with
    their hardening, device models forked by the unit's zygote (plain and
    dm_restrict) in the unit's cgroup, the console unit (a login, the
    domains, a thumbnail, a WebSocket relayed to VNC), then `systemctl
    restart`, a crash of the zygote, an upgrade and `apt-get remove`, each
    leaving the running device models serving."""
    if shutil.which("systemd-nspawn") is None:
        pytest.skip("no systemd-nspawn (Debian's systemd-container; scripts/deb-tier installs it)")
    root, run = debian_root
    here = os.path.join(root, "srv", "pyxenfb-test")     # not /tmp: the booted root mounts a tmpfs there
    os.makedirs(here)
    for f in (deb, ROOT / "tests" / "deb_inside.py", ROOT / "tests" / "deb_systemd_inside.py"):
        shutil.copy(f, here)
    done = run("sh", "-c", "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
               f"--no-install-recommends systemd systemd-sysv dbus /srv/pyxenfb-test/{deb.name} >/dev/null")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    base = os.path.dirname(root)
    with open(os.path.join(base, "nspawn.log"), "wb") as log, \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(os.path.join(base, "notify.sock"))
        boot, init = _boot(root, notify, log)

        def inside(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
            return subprocess.run(["nsenter", "--target", str(init), "--all", *argv],
                                  capture_output=True, text=True, timeout=timeout)
        try:
            done = inside(VENV_PYTHON, "/srv/pyxenfb-test/deb_systemd_inside.py",
                          f"/srv/pyxenfb-test/{deb.name}", timeout=900)
            report = json.loads(done.stdout or "{}")
            failed = inside("systemctl", "--failed", "--no-legend", "--plain").stdout
        finally:
            _shut_down(boot)
    assert report and "error" not in report, \
        (report.get("error") or done.stderr[-3000:], {k: report.get(k) for k in ("restart", "crash")})

    assert report["system"] == "running", failed       # no unit failed at boot, ours included
    assert report["socket_unit"] == {"ActiveState": "active", "SubState": "running"}
    unit = report["service_unit"]
    assert (unit["ActiveState"], unit["KillMode"], unit["NoNewPrivileges"], unit["ProtectSystem"]) == \
        ("active", "process", "yes", "full"), unit
    assert report["socket_file"] == {"socket": True, "mode": "0o600", "uid": 0, "gid": 0}
    assert "(socket from systemd)" in report["journal_ready"], report["journal_ready"]

    for name in ("plain", "restricted", "after_restart"):
        d = report[name]
        assert d["child"], (name, d["log"])                     # forked by the zygote, not cold
        assert d["child_cgroup"] == "/system.slice/pyxenfb-zygote.service", (name, d["child_cgroup"])
        assert d["picture"]["equal"] and d["picture"]["colours"] > 16, (name, d["picture"])
    assert report["plain"]["child_ppid"] == report["zygote_pid"]
    assert report["plain"]["child_root"] == "/"
    restricted = report["restricted"]
    assert restricted["child_root"] == f"{report['run_dir']}/qemu-root-2"   # chrooted after the fork
    ns = restricted["mnt_ns"]               # left the unit's mount namespace for the stand-in's
    assert ns["child"] == ns["standin"] != ns["zygote"], ns

    restarted = report["restart"]
    assert restarted["rc"] == 0 and restarted["new_pid"] != report["zygote_pid"], restarted
    assert restarted["main_pid"] == restarted["new_pid"]      # the one systemd runs is the one ready
    assert restarted["alive"] == {"plain": True, "restricted": True}
    assert restarted["serving"] == {"plain": True, "restricted": True}
    crashed = report["crash"]              # SIGKILLed: systemd starts it again, the children stay
    assert crashed["main_pid"] == crashed["new_pid"] and crashed["restarts"] == "1", crashed
    assert crashed["alive"] == {"plain": True, "restricted": True}
    assert crashed["serving"] == {"plain": True, "restricted": True}
    assert report["after_restart"]["child_ppid"] == crashed["new_pid"]

    console = report["console"]             # the console unit under its own hardening
    assert console["start_rc"] == 0 and console["unit"]["ProtectSystem"] == "strict", console["unit"]
    assert "(3 domains with VNC, sim XenStore)" in console["serving_line"], console["serving_line"]
    assert console["before_login"] == 401 and console["login"]["status"] == 200, console
    assert console["domains"] == [1, 2, 3] and console["thumbnail"], console
    assert console["relayed"] == "RFB 003.008\n", console      # a WebSocket relayed to the VNC port
    assert console["still_active"] == "active"

    everyone = {"plain": True, "restricted": True, "after_restart": True}
    upgraded = report["upgrade"]
    assert upgraded["rc"] == 0, upgraded["output"]
    assert upgraded["new_pid"] != crashed["new_pid"]        # postinst restarted the zygote
    assert upgraded["alive"] == everyone and upgraded["serving"] == everyone

    removed = report["remove"]
    assert removed["rc"] == 0 and "Removing pyxenfb" in removed["output"], removed["output"]
    assert (removed["service"], removed["socket"], removed["console"]) == ("inactive",) * 3   # prerm
    assert not removed["socket_file_left"]                  # RemoveOnStop=yes
    assert removed["alive"] == everyone and removed["serving"] == everyone
