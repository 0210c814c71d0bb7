"""dm_restrict end to end on the simulated host: the sim's toolstack starts
pyqemu-dm as libxl 4.17 does with dm_restrict=1 (chroot dir mode 0000,
pre-opened QMP fd, -xen-domid-restrict -chroot, unshare + rlimits before
exec), and everything still works: VNC picture, guest reboot (frames mapped
again through the restricted handle), QMP screendump (written inside the
chroot, as QEMU does), a hostile VNC storm under RLIMIT_FSIZE.

chroot, unshare and -runas need root: skipped otherwise.
"""
from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pyxenfb.sim import toolstack
from pyxenfb.sim.fbdump import fbdump_array
from simkit import HostThread, short_run_dir, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chroot, unshare and -runas need root")

HERE = os.path.dirname(os.path.abspath(__file__))
DM = [sys.executable, "-m", "pyxenfb.machine.cli"]


@pytest.fixture
def sim():
    """An in-process sim host (so the test can ask its broker about handles)."""
    run_dir = short_run_dir()
    host = HostThread(run_dir)
    host.start()
    yield host
    host.stop()
    shutil.rmtree(run_dir, ignore_errors=True)


def _create(sim, domid: int, vfb_extra: str = "", **kw) -> toolstack.CreateResult:
    return asyncio.run(toolstack.create_domain(
        sim.run_dir, domid, f"rst{domid}", vfb=f"vnc=1,vncdisplay={60 + domid},vncunused=1{vfb_extra}",
        width=320, height=240, dm_restrict=True, **kw))


def _destroy(sim, domid: int) -> None:
    asyncio.run(toolstack.destroy_domain(sim.run_dir, domid))


def _log(res) -> str:
    with open(res.dm_log, errors="replace") as f:
        return f.read()


def _wait_log(res, text: str, count: int = 1, timeout: float = 30) -> None:
    wait_until(lambda: _log(res).count(text) >= count, timeout,
               lambda: f"{count} x {text!r} in the DM log:\n{_log(res)[-3000:]}")


def _restrictions(sim) -> list[int]:
    async def ask():
        return sim.broker.restrictions(0)
    return sim._call(ask())


def _vnc_picture(port: int, password: str | None = None) -> np.ndarray:
    from vncdotool import api
    client = api.connect(f"127.0.0.1::{port}", password=password, timeout=20)
    try:
        return np.asarray(client.refreshScreen().screen.convert("RGB"))
    finally:
        client.disconnect()


def _qmp(sim, domid: int, *commands):
    """Run QMP commands on the libxenstat socket; returns the replies (or the QmpError)."""
    async def talk():
        qmp = await toolstack.QmpClient.connect(toolstack.qmp_paths(sim.run_dir, domid)[1], "test")
        out = []
        try:
            await qmp.execute("qmp_capabilities")
            for command, args in commands:
                try:
                    out.append(await qmp.execute(command, args))
                except toolstack.QmpError as e:
                    out.append(e)
        finally:
            qmp.close()
        return out
    return asyncio.run(talk())


def _same_dir(proc_link: str, path: str) -> bool:
    """/proc/PID/root or cwd is `path`: compared by inode, since readlink
    names it as seen from the root of whoever reads it (in a chroot, not us)."""
    a, b = os.stat(proc_link), os.stat(path)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _limits(pid: int) -> dict[str, tuple[str, str]]:
    out = {}
    with open(f"/proc/{pid}/limits") as f:
        for line in f.readlines()[1:]:
            name, soft, hard = line[:26].strip(), *line[26:].split()[:2]
            out[name] = (soft, hard)
    return out


def _status(pid: int, key: str) -> list[str]:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return line.split()[1:]
    raise AssertionError(key)


def _read_ppm(path: str) -> np.ndarray:
    with open(path, "rb") as f:
        data = f.read()
    magic, w, h, maxval, rest = data.split(maxsplit=4)
    assert (magic, maxval) == (b"P6", b"255")
    return np.frombuffer(rest, np.uint8).reshape(int(h), int(w), 3)


def test_restricted_dm_end_to_end(sim):
    res = _create(sim, 2)
    try:
        pid = res.dm_pid
        _wait_log(res, "vfb-0: backend -> Connected")
        # What libxl did before exec ...
        argv = open(f"/proc/{pid}/cmdline").read().split("\0")
        assert argv[argv.index("-chroot") + 1] == res.dm_root and "-xen-domid-restrict" in argv
        assert any(a.startswith("socket,id=libxl-cmd,fd=") for a in argv)
        assert "-runas" not in argv                     # libxl passes it for HVM only
        assert stat.S_IMODE(os.stat(res.dm_root).st_mode) == 0
        limits = _limits(pid)
        assert limits["Max file size"] == ("262144", "262144")
        for name in ("Max core file size", "Max msgqueue size", "Max file locks",
                     "Max locked memory"):
            assert limits[name] == ("0", "0"), (name, limits[name])
        for ns in ("mnt", "ipc"):
            assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}")
        # ... and what the device model did to itself.
        assert _same_dir(f"/proc/{pid}/root", res.dm_root)
        assert _same_dir(f"/proc/{pid}/cwd", res.dm_root)
        assert 2 in _restrictions(sim)
        assert f"restricted: event channels and foreign memory restricted to domain 2; " \
               f"chroot {res.dm_root}; uid 0" in _log(res)
        assert _status(pid, "Groups") == []

        # The picture over VNC.
        assert np.array_equal(_vnc_picture(res.vnc_port), fbdump_array(sim.run_dir, 2))

        # A guest reboot: frontends close and come back with new pages, mapped
        # through the restricted handle (the run dir is outside the chroot).
        os.kill(res.guest_pid, signal.SIGUSR1)
        # (state-change lines are budgeted: a reboot makes ~10 of them, so the
        # wait is on the map of the new frame, logged once per connection)
        _wait_log(res, "vfb-0: connected", count=2)
        wait_until(lambda: np.array_equal(_vnc_picture(res.vnc_port), fbdump_array(sim.run_dir, 2)),
                   20, "the picture after the reboot")

        # screendump: QEMU opens the file from inside its chroot, so does the DM.
        outside = os.path.join(sim.run_dir, "outside.ppm")
        replies = _qmp(sim, 2, ("screendump", {"filename": "/shot.ppm"}),
                       ("screendump", {"filename": "/shot.png", "format": "png"}),
                       ("screendump", {"filename": outside}))
        assert replies[:2] == [{}, {}]
        assert isinstance(replies[2], toolstack.QmpError) and "failed to write" in str(replies[2])
        assert not os.path.exists(outside)
        want = fbdump_array(sim.run_dir, 2)
        assert np.array_equal(_read_ppm(os.path.join(res.dm_root, "shot.ppm")), want)
        assert np.array_equal(np.asarray(Image.open(os.path.join(res.dm_root, "shot.png"))), want)
        assert "Traceback" not in _log(res) and "ImportError" not in _log(res)
    finally:
        _destroy(sim, 2)
    for name in ("shot.ppm", "shot.png"):
        os.unlink(os.path.join(res.dm_root, name))


def test_restricted_dm_as_another_user(sim):
    """device_model_user= (-runas): uid/gid switched, groups dropped, and the
    picture (behind a VNC password: DES inside the chroot) and a guest reboot
    still work; a screendump into the root-owned mode-0000 chroot is refused,
    as QEMU's would be."""
    nobody = pwd.getpwnam("nobody")
    res = _create(sim, 3, vfb_extra=",vncpasswd=s3cret", dm_user="nobody")
    try:
        pid = res.dm_pid
        _wait_log(res, "vfb-0: backend -> Connected")
        assert _status(pid, "Uid") == [str(nobody.pw_uid)] * 4
        assert _status(pid, "Gid") == [str(nobody.pw_gid)] * 4
        assert _status(pid, "Groups") == []
        assert _same_dir(f"/proc/{pid}/root", res.dm_root)
        assert f"running as nobody (uid {nobody.pw_uid}, gid {nobody.pw_gid})" in _log(res)
        assert np.array_equal(_vnc_picture(res.vnc_port, "s3cret"), fbdump_array(sim.run_dir, 3))
        os.kill(res.guest_pid, signal.SIGUSR1)
        _wait_log(res, "vfb-0: connected", count=2)      # the new frame mapped (see above)
        wait_until(lambda: np.array_equal(_vnc_picture(res.vnc_port, "s3cret"),
                                          fbdump_array(sim.run_dir, 3)),
                   20, "the picture after the reboot")
        (reply,) = _qmp(sim, 3, ("screendump", {"filename": "/shot.ppm"}))
        assert isinstance(reply, toolstack.QmpError) and "Permission denied" in str(reply)
    finally:
        _destroy(sim, 3)


def test_restricted_dm_survives_a_hostile_storm_under_rlimit_fsize(sim):
    """5,000 hostile connections would be ~700 KB at two lines each: past
    RLIMIT_FSIZE (256 KiB), SIGXFSZ.  Budgeted, the DM lives and the log stays small."""
    res = _create(sim, 4)
    try:
        _wait_log(res, "vfb-0: backend -> Connected")
        r = subprocess.run([sys.executable, os.path.join(HERE, "hostile_vnc.py"), str(res.vnc_port),
                            "5000", "4"], capture_output=True, text=True, timeout=300)
        assert r.stdout.strip() == "done 5000", r.stderr[-2000:]
        assert np.array_equal(_vnc_picture(res.vnc_port), fbdump_array(sim.run_dir, 4))
        os.kill(res.dm_pid, 0)                             # still there
        with open(f"/proc/{res.dm_pid}/stat") as f:
            assert f.read().split(") ")[1][0] != "Z"
        size = os.path.getsize(res.dm_log)
        print(f"DM log after 5,000 hostile connections: {size} bytes")
        assert size < 64 * 1024
        # At exit the suppressed lines are summarised: the log says what happened.
        os.kill(res.dm_pid, signal.SIGTERM)
        _wait_log(res, "more VNC connections closed before ClientInit")
        summary = [line for line in _log(res).splitlines()
                   if "more VNC connections closed before ClientInit" in line]
        logged = sum(1 for line in _log(res).splitlines()
                     if "disconnected: " in line and " more " not in line)
        assert int(summary[0].split(": ", 1)[1].split(" more")[0].replace(",", "")) + logged >= 5000
    finally:
        _destroy(sim, 4)


def test_a_failed_restriction_is_fatal_in_one_line(sim):
    """-xen-domid-restrict when the guest's memory can't be opened: one line, exit 1."""
    asyncio.run(toolstack.create_domain(sim.run_dir, 5, "gone5", vfb="vnc=1", dm=None,
                                        start_guest=False))
    os.unlink(os.path.join(toolstack.dom_dir(sim.run_dir, 5), "memory"))
    root = os.path.join(sim.run_dir, "root5")
    os.mkdir(root, 0)
    env = {k: v for k, v in os.environ.items() if k != "PYXENFB_SIM"}
    env["PYXENFB_SIM"] = sim.run_dir
    try:
        r = subprocess.run(DM + ["-xen-domid", "5", "-vnc", "127.0.0.1:0,to=99",
                                 "-xen-domid-restrict", "-chroot", root, "-machine", "xenpv"],
                           env=env, capture_output=True, text=True, timeout=120)
    finally:
        _destroy(sim, 5)
    assert r.returncode == 1, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("pyqemu-dm: ")]
    assert len(errors) == 1, r.stderr
    assert errors[0].startswith("pyqemu-dm: cannot restrict foreign memory to domain 5: ")
    assert errors[0].endswith("No such file or directory")
    assert "Traceback" not in r.stderr


def test_restrict_steps_refuse_without_privilege():
    """chroot as an unprivileged user fails: a RestrictError, not a half-restricted process."""
    nobody = pwd.getpwnam("nobody")
    import tempfile
    tmp_path = tempfile.mkdtemp(prefix="pyxfb-root-", dir="/tmp")
    os.chmod(tmp_path, 0o755)                 # visible to nobody; chroot still needs privilege
    code = ("import os; from pyxenfb.machine import restrict; from pyxenfb.machine.cli import RestrictOptions\n"
            f"os.setgid({nobody.pw_gid}); os.setuid({nobody.pw_uid})\n"
            "try:\n"
            f"    restrict.apply(RestrictOptions(chroot={str(tmp_path)!r}), 1, None, None)\n"
            "except restrict.RestrictError as e:\n"
            "    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd="/")
    os.rmdir(tmp_path)
    assert r.stdout.strip() == f"cannot chroot to {tmp_path}: Operation not permitted", r.stderr


LAZY_AFTER_CHROOT = r'''
import io, os, sys
import numpy as np
from pyxenfb.machine import restrict
from pyxenfb.convert import GUEST_32, GUEST_16, convert_rect
from pyxenfb.rfb import auth, encodings
from pyxenfb.rfb.websocket import WebSocketStream
from pyxenfb.displays import pixman
from pyxenfb.rfb import tls
restrict.preload(tls=True, websocket=True)
server_ctx = tls.server_context(tls.TlsCredentials("anon"))   # as the DM does: before the chroot
import ssl
client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
client_ctx.check_hostname = False
client_ctx.verify_mode = ssl.CERT_NONE
client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
client_ctx.set_ciphers("AECDH:@SECLEVEL=0")
os.chroot(sys.argv[1]); os.chdir("/")
sys.path[:] = []                      # nothing can be found any more: imports must be done
vals = np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 2654435761 % (1 << 24)
jpeg = encodings._image_bytes(vals, GUEST_32, "JPEG", 5)
png = encodings._image_bytes(vals, GUEST_32, "PNG")
assert jpeg[:2] == b"\xff\xd8" and png[:8] == b"\x89PNG\r\n\x1a\n"
assert len(auth.vnc_response("s3cret", bytes(16))) == 16
ws = WebSocketStream()
_, reply = ws.receive(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
assert reply.startswith(b"HTTP/1.1 101"), reply
rows = np.zeros((16, 64), np.uint8)
convert_rect(rows, GUEST_32, GUEST_16, 0, 0, 16, 16)
from PIL import Image
buf = io.BytesIO(); Image.new("RGB", (4, 4)).save(buf, format="PNG")
# a whole anonymous TLS handshake and one record each way, in memory
server = tls.TlsStream(server_ctx)
c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
client = client_ctx.wrap_bio(c_in, c_out)
plain = b""
for _ in range(10):
    try:
        client.do_handshake()
        break
    except ssl.SSLWantReadError:
        pass
    plain, reply = server.receive(c_out.read())
    c_in.write(reply)
client.write(b"RFB 003.008\n")
plain, _ = server.receive(c_out.read())
assert server.established and plain == b"RFB 003.008\n", plain
c_in.write(server.send(b"hello"))
assert client.read(5) == b"hello"
from pyxenfb.rfb import enc_kernel
print("ok", pixman.available(), enc_kernel.load() is not None)
'''


def test_everything_imported_lazily_works_after_the_chroot(tmp_path):
    """What the DM imports on first use (JPEG/PNG, DES, the WebSocket, TLS,
    pixman, the encoders' kernel, codecs) is loaded by restrict.preload(tls=,
    websocket=): exercised inside an empty chroot with an empty sys.path,
    nothing is missing."""
    root = tmp_path / "root"
    root.mkdir()
    r = subprocess.run([sys.executable, "-c", LAZY_AFTER_CHROOT, str(root)], capture_output=True,
                       text=True, timeout=120, cwd="/")
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-3000:]
    from pyxenfb.displays import pixman
    from pyxenfb.rfb import enc_kernel
    # the encoders' C kernel too: dlopen'ed by path, which the chroot hides
    assert r.stdout.strip() == f"ok {pixman.available()} {enc_kernel.load() is not None}"


def test_restricted_dm_serves_vnc_over_tls(sim, tmp_path):
    """TLS credentials are read before the chroot: a restricted DM with
    tls-creds-x509 (verify-peer=on) still negotiates VeNCrypt and shows the picture."""
    from test_vnc_tls import X509_NONE, VencryptClient
    from tlscerts import make_pki
    pki = make_pki(str(tmp_path / "pki"))
    asyncio.run(toolstack.create_domain(sim.run_dir, 6, "tls6", vfb="vnc=1", width=320, height=240,
                                        dm=None))
    root = os.path.join(sim.run_dir, "qemu-root-6")
    toolstack.make_dm_root(root)
    env = dict(os.environ, PYXENFB_SIM=sim.run_dir)
    log_path = os.path.join(sim.run_dir, "tls6.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(DM + ["-xen-domid", "6", "-object",
                                      f"tls-creds-x509,id=tls0,dir={pki.dir},endpoint=server,verify-peer=on",
                                      "-vnc", "127.0.0.1:0,to=99,tls-creds=tls0",
                                      "-xen-domid-restrict", "-chroot", root, "-machine", "xenpv"],
                                env=env, stdout=log, stderr=log)
    text = lambda: open(log_path, errors="replace").read()   # noqa: E731
    try:
        wait_until(lambda: "vfb-0: backend -> Connected" in text() or proc.poll() is not None, 60,
                   lambda: text())
        assert proc.poll() is None, text()
        assert os.readlink(f"/proc/{proc.pid}/root") == root
        port = int(text().split("VNC server on 127.0.0.1:")[1].split()[0])
        want = fbdump_array(sim.run_dir, 6)

        def picture_matches() -> bool:
            c = VencryptClient(port)
            try:
                c.negotiate(X509_NONE, ca=pki.ca, cert=pki.client_cert, key=pki.client_key)
                w, h = c.finish_auth()
                got = c.raw_frame(w, h)
            finally:
                c.close()
            rgb = np.stack([(got >> 16) & 255, (got >> 8) & 255, got & 255], axis=-1).astype(np.uint8)
            return np.array_equal(rgb, want)
        wait_until(picture_matches, 20, "the picture over TLS")
    finally:
        proc.terminate()
        proc.wait(10)
        _destroy(sim, 6)
