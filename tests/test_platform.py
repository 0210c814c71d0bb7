"""Platform detection and the sim/real bundle."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest

from pyxenfb.evtchn import SimEventChannel
from pyxenfb.platform.foreignmem import SimForeignMemory
from pyxenfb.platform.host import Platform, PlatformUnavailable, detect
from pyxenfb.sim.evtchn_broker import BrokerThread


@pytest.fixture
def run_dir():
    d = tempfile.mkdtemp(prefix="plat", dir="/tmp")   # short: socket paths
    yield d
    shutil.rmtree(d, ignore_errors=True)


def listening_socket(path: str, kind=socket.SOCK_STREAM) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, kind)
    s.bind(path)
    s.listen(1)
    return s


def test_no_xen_no_sim(tmp_path):
    with pytest.raises(PlatformUnavailable) as e:
        detect({}, dev_xen=str(tmp_path / "no-xen"))
    msg = str(e.value)
    assert "\n" not in msg
    assert "no Xen here" in msg and "PYXENFB_SIM" in msg and "pyxenfb-sim host" in msg


def test_sim_dir_missing(tmp_path):
    missing = str(tmp_path / "gone")
    with pytest.raises(PlatformUnavailable, match=f"PYXENFB_SIM={missing}: no such directory"):
        detect({"PYXENFB_SIM": missing})


def test_sim_sockets_missing_are_named(run_dir):
    xs = listening_socket(os.path.join(run_dir, "xenstored.sock"))
    try:
        with pytest.raises(PlatformUnavailable) as e:
            detect({"PYXENFB_SIM": run_dir})
        assert "evtchn.sock" in str(e.value) and "xenstored.sock" not in str(e.value)
    finally:
        xs.close()
    open(os.path.join(run_dir, "evtchn.sock"), "w").close()     # a file, not a socket
    with pytest.raises(PlatformUnavailable) as e:
        detect({"PYXENFB_SIM": run_dir})
    assert "evtchn.sock" in str(e.value)


def test_sim_platform_hands_out_sim_interfaces(run_dir):
    xs = listening_socket(os.path.join(run_dir, "xenstored.sock"))
    os.mkdir(os.path.join(run_dir, "dom0"))
    with BrokerThread(os.path.join(run_dir, "evtchn.sock")):
        # Even with a real Xen present, PYXENFB_SIM wins.
        p = detect({"PYXENFB_SIM": run_dir}, dev_xen="/")
        assert p == Platform("sim", os.path.join(run_dir, "xenstored.sock"), run_dir)
        ch = p.open_evtchn(5)
        try:
            assert isinstance(ch, SimEventChannel) and ch.domid == 5
            assert ch.alloc_unbound(0) == 1
        finally:
            ch.close()
        fm = p.foreign_memory()
        assert isinstance(fm, SimForeignMemory) and fm.run_dir == run_dir
    xs.close()


def test_real_platform_xenstore_path(tmp_path, monkeypatch):
    dev_xen = str(tmp_path)                         # "exists" stands in for /dev/xen
    p = detect({"XENSTORED_PATH": "/x/sock"}, dev_xen=dev_xen)
    assert (p.kind, p.xenstore_path, p.run_dir) == ("real", "/x/sock", None)
    expected = ("/var/run/xenstored/socket" if os.path.exists("/var/run/xenstored/socket")
                else "/dev/xen/xenbus")
    assert detect({}, dev_xen=dev_xen).xenstore_path == expected


@pytest.mark.skipif(os.path.exists("/dev/xen"), reason="a real Xen is present")
def test_real_platform_without_xen_fails_readably(tmp_path):
    p = detect({}, dev_xen=str(tmp_path))
    with pytest.raises(OSError, match="/dev/xen/evtchn"):
        p.open_evtchn()
    with pytest.raises(OSError, match="privcmd"):
        p.foreign_memory()


def fresh_python(code: str) -> str:
    """What `code` prints in a new interpreter (nothing imported before it)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=60).stdout.strip()


def test_imports_stay_lazy():
    assert fresh_python("import sys, pyxenfb.platform.host as p; print(sorted(m for m in "
                        "('pyxenfb.platform.xenstore', 'numpy', 'cffi') if m in sys.modules))") == "[]"


def test_libxenevtchn_is_loaded_only_when_a_real_handle_is_made():
    assert fresh_python("import sys, pyxenfb.evtchn as e; "
                        "print(not e._load_libxenevtchn.loaded and 'cffi' not in sys.modules)") == "True"


# ---- the generated cffi module (pyxenfb/platform/_xen_ffi.py) ------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("flags, folder, name, cdefs", [([], "platform", "_xen_ffi.py", "xen_cdefs.py"),
                                                         (["--pixman"], "displays", "_pixman_ffi.py", "pixman_cdefs.py"),
                                                         (["--enc"], "rfb", "_enc_ffi.py", "enc_cdefs.py")])
def test_generated_ffi_module_matches_the_declarations(tmp_path, flags, folder, name, cdefs):
    out = tmp_path / name
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gen_cffi.py"), *flags, str(out)],
                   check=True, capture_output=True, timeout=60)
    with open(os.path.join(ROOT, "pyxenfb", folder, name), "rb") as f:
        committed = f.read()
    assert out.read_bytes() == committed, \
        f"pyxenfb/{folder}/{name} is stale: run scripts/gen_cffi.py after editing {cdefs}"


def test_libraries_load_without_cffis_parser():
    """A start loads _cffi_backend only: cffi's C parser cost seconds in a TCG dom0."""
    code = ("import sys, pyxenfb.evtchn as e, pyxenfb.platform.foreignmem as f; "
            "e._load_libxenevtchn(); f._load_libxenforeignmemory(); ffi, libc = f._load_libc(); "
            "p = libc.mmap(0, 4096, 3, 0x22, -1, 0); assert libc.munmap(ffi.cast('void *', p), 4096) == 0; "
            "print(sorted(m for m in ('cffi', 'pycparser') if m in sys.modules))")
    assert fresh_python(code) == "[]"


def test_encoder_kernel_loads_without_cffis_parser():
    code = ("import sys, numpy as np; from pyxenfb.rfb import enc_kernel as k, encodings as e; "
            "from pyxenfb.convert import GUEST_32; "
            "e.Encoder().encode(e.HEXTILE, GUEST_32, np.zeros((4, 16), np.uint8), 0, 0, 4, 4); "
            "print(k.load() is not None, sorted(m for m in ('cffi', 'pycparser') if m in sys.modules))")
    assert fresh_python(code) == "True []"


def test_pixman_loads_without_cffis_parser():
    code = ("import sys, numpy as np; from pyxenfb import convert as c; from pyxenfb.displays import pixman; "
            "assert not pixman.library.loaded; "
            "out = c.convert_rect(np.zeros((2, 8), np.uint8), c.GUEST_32, c.GUEST_16, 0, 0, 2, 2); "
            "print(c.conversion_path(c.GUEST_32, c.GUEST_16) if pixman.available() else 'pixman', "
            "sorted(m for m in ('cffi', 'pycparser') if m in sys.modules))")
    assert fresh_python(code) == "pixman []"


def test_declarations_agree_with_libxen_headers(tmp_path):
    """gcc rejects a prototype that conflicts with Debian's libxen-dev headers."""
    from pyxenfb.platform import xen_cdefs
    # we pass NULL for the logger, so the cdef keeps it an opaque void *
    ours = (xen_cdefs.EVTCHN + xen_cdefs.FOREIGNMEMORY).replace(
        "void *logger", "struct xentoollog_logger *logger")
    src = tmp_path / "agree.c"
    src.write_text("#include <xenevtchn.h>\n#include <xenforeignmemory.h>\n" + ours)
    gcc = subprocess.run(["gcc", "-std=c11", "-Werror", "-fsyntax-only", str(src)],
                         capture_output=True, text=True, timeout=60)
    assert gcc.returncode == 0, gcc.stderr
    src.write_text("#include <xenevtchn.h>\nint xenevtchn_notify(xenevtchn_handle *, uint16_t);\n")
    assert subprocess.run(["gcc", "-std=c11", "-fsyntax-only", str(src)],
                          capture_output=True, timeout=60).returncode != 0   # the check can fail
