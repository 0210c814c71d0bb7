"""Real-Xen tier: boots the xenlab once per session and hands its results to the tests.

The lab (/work/shared/xenlab, or $XENLAB_HOME) boots Xen 4.17 + a Debian dom0
under QEMU/TCG and runs tests/xen/dom0/tier.sh there. This fixture prepares
the share the dom0 sees on /host:
    site/   the runtime wheels (numpy, cffi, pyxs, pycryptodome, pillow, websockets)
            for dom0's Python 3.11, installed from uv.lock; redone when it changes
    src/    a copy of the pyxenfb package (with bytecode)
    deb/    the Debian package (scripts/build-deb's dist/pyxenfb_*.deb) and any of
            its Debian dependencies dom0's image lacks, fetched with apt-get download:
            dom0 installs them with dpkg, offline, as an admin would
    xen/    tier.sh, rfbclient.py, the pyqemu-dm launcher, pictures, action lists
then runs the lab with a bounded timeout and parses out/results.tsv.

Environment:
    XENLAB_HOME          the lab (default /work/shared/xenlab, else ../shared/xenlab)
    PYXENFB_XEN_SHARE    share folder (default /var/tmp/pyxenfb-xen-share)
    PYXENFB_XEN_TIMEOUT  seconds for the whole boot (default 560)
    PYXENFB_XEN_REUSE=1  do not boot: judge the results of the last run in the share
    PYXENFB_XEN_ARGS     extra Xen command line (default: cpuid=no-xsave, see LAB_XEN_ARGS)
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import plan  # noqa: E402
from bench.suite import anchor  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
# The project's uv: the one on PATH, else the copy scripts/uv installs (a fresh
# machine has no uv on PATH; CI calls the tier through scripts/uv run).
UV = str(ROOT / "scripts" / "uv")
HERE = Path(__file__).resolve().parent


def xenlab_home() -> Path | None:
    for candidate in (os.environ.get("XENLAB_HOME"), "/work/shared/xenlab",
                      str(ROOT.parent / "shared" / "xenlab")):
        if candidate and (Path(candidate) / "run").is_file():
            return Path(candidate)
    return None


# QEMU 7.2's TCG loses vector registers when Xen switches a pCPU between dom0
# and a domU with XSAVE in use: dom0 processes then see another process's
# XMM/YMM values (measured with tests/xen/dom0/fpu-stress.sh: ~60 corrupted
# 1 MiB copies a minute with a domU running, none without one).  That is what
# made `xl` segfault and bash mangle words in earlier runs, whatever the DM.
# Without XSAVE, Xen and both kernels switch FPU state with FXSAVE: 0 corrupt.
LAB_XEN_ARGS = "cpuid=no-xsave"
ANIM_FRAMES = 4          # the steady-state guest's frames (~0.2 MB each gzipped in its initrd)


def write_ppm(path: Path, rgb: np.ndarray) -> None:
    h, w, _ = rgb.shape
    path.write_bytes(b"P6\n%d %d\n255\n" % (w, h) + rgb.astype(np.uint8).tobytes())


def read_ppm(path: Path) -> np.ndarray:
    data = path.read_bytes()
    fields, pos = [], 0
    while len(fields) < 4:
        while data[pos:pos + 1].isspace():
            pos += 1
        if data[pos:pos + 1] == b"#":
            pos = data.index(b"\n", pos)
            continue
        end = pos
        while not data[end:end + 1].isspace():
            end += 1
        fields.append(data[pos:end])
        pos = end
    assert fields[0] == b"P6" and fields[3] == b"255", f"{path}: not a P6/255 PPM"
    w, h = int(fields[1]), int(fields[2])
    return np.frombuffer(data[pos + 1:pos + 1 + w * h * 3], np.uint8).reshape(h, w, 3)


def noise_picture() -> np.ndarray:
    """Picture B: seeded noise with a few flat blocks (raw tiles and runs for every encoder)."""
    rng = np.random.default_rng(8)
    rgb = rng.integers(0, 256, (600, 800, 3), dtype=np.uint8)
    rgb[100:300, 100:420] = (12, 200, 77)
    rgb[350:600, 500:800] = rng.integers(0, 4, (250, 300, 1), dtype=np.uint8) * 60
    return rgb


def _uv_requirements() -> str:
    return subprocess.run([UV, "export", "--no-dev", "--no-hashes", "--no-emit-project",
                           "--format", "requirements-txt", "-q"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout


def prepare_share(share: Path, lab: Path) -> None:
    share.mkdir(parents=True, exist_ok=True)
    reqs = _uv_requirements()
    stamp = hashlib.sha256(reqs.encode()).hexdigest()
    site = share / "site"
    old_stamp = (site / ".stamp").read_text() if (site / ".stamp").exists() else ""
    if old_stamp != stamp:
        shutil.rmtree(site, ignore_errors=True)
        (share / "requirements.txt").write_text(reqs)
        # dom0: Debian 12, CPython 3.11, glibc 2.36
        subprocess.run([UV, "pip", "install", "-q", "--target", str(site), "--python-version",
                        "3.11", "--python-platform", "x86_64-manylinux_2_28", "--compile-bytecode",
                        "-r", str(share / "requirements.txt")], cwd=ROOT, check=True)
        (site / ".stamp").write_text(stamp)
    src = share / "src"
    shutil.rmtree(src, ignore_errors=True)

    shutil.copytree(ROOT / "pyxenfb", src / "pyxenfb",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    # dom0's CPython 3.11 reads 3.11 bytecode: saves it compiling over 9p under TCG
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(src)], check=True)
    deb = built_deb()
    if deb is None:
        raise RuntimeError("no dist/pyxenfb_*.deb: scripts/xen-tier builds it (scripts/build-deb)")
    dom0_root = Path(os.environ.get("XENLAB_DIR")
                     or os.path.join(os.environ.get("TMPDIR", "/var/tmp"), "xenlab")) / "dom0root"
    fetched = stage_package(share / "deb", deb, dom0_root)
    print(f"\nxen tier: dom0 installs {deb.name}"
          + (f" with {', '.join(fetched)} from Debian" if fetched else " (its dependencies are in dom0)"))
    xen = share / "xen"
    shutil.rmtree(xen, ignore_errors=True)
    shutil.copytree(HERE / "dom0", xen, ignore=shutil.ignore_patterns("__pycache__"))
    # The steady-state client: the anchors' vnc-rate (stdlib; skips payloads
    # without decoding them, so the client in dom0 is never what limits the
    # frame rate: our own decoding client undid Tight's gradient filter pixel
    # by pixel in Python, 8 s a frame under TCG).
    rate = anchor("vnc-rate")            # found as the benchmarks find it
    if rate is not None:
        shutil.copy(rate, xen / "vnc-rate")
    subprocess.run([sys.executable, str(lab / "dom0" / "pic.py"), "pattern", "800", "600",
                    str(xen / "picture-a.ppm")], check=True)
    write_ppm(xen / "picture-b.ppm", noise_picture())
    # The steady-state guest's frames (guest-run.sh animates them): xanim's gradient, as the
    # benchmarks' content, in the framebuffer's own bytes (BGRX, 3200-byte rows),
    # gzipped: libxl's domain builder inflates a ramdisk whose last gzip member
    # claims a size it can hold, losing the members after the first (the base
    # initrd is ~4 MB unpacked; 7.7 MB of raw frames made it drop /guest).
    from pyxenfb.sim.picture import xanim_frames
    (xen / "anim").mkdir()
    for i, frame in enumerate(xanim_frames(800, 600, ANIM_FRAMES)):
        (xen / "anim" / f"frame-{i}.raw.gz").write_bytes(gzip.compress(frame.astype("<u4").tobytes(), 9))
    for name, keys in (("keys-us.actions", plan.us_keys()), ("keys-de.actions", plan.de_keys())):
        (xen / name).write_text("".join(f"{n}\t{' '.join(acts)}\n" for n, acts in keys.chunks()))
    (xen / "pointer.actions").write_text(" ".join(plan.pointer_actions()) + "\n")
    (xen / "encodings.txt").write_text(" ".join(plan.ENCODINGS) + "\n")
    (xen / "vncpasswd.txt").write_text(plan.VNC_PASSWORD)
    (xen / "wrongpasswd.txt").write_text(plan.WRONG_PASSWORD)


def built_deb() -> Path | None:
    """dist/pyxenfb_<version>_<arch>.deb as scripts/build-deb leaves it (scripts/xen-tier
    builds it first; a package of other sources than these is not ours to test)."""
    version = subprocess.run(["dpkg-parsechangelog", "-S", "Version"], cwd=ROOT,
                             capture_output=True, text=True).stdout.strip()
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True,
                          text=True).stdout.strip()
    deb = ROOT / "dist" / f"pyxenfb_{version}_{arch}.deb"
    return deb if version and deb.is_file() else None


def _installed(status: Path) -> set[str]:
    names, name = set(), None
    for line in status.read_text(errors="replace").splitlines():
        if line.startswith("Package: "):
            name = line.split()[1]
        elif line.startswith("Status: ") and line.endswith(" installed") and name:
            names.add(name)
    return names


def _depends(deb: Path) -> list[list[str]]:
    """The Depends/Pre-Depends of a .deb as alternatives of package names."""
    fields = subprocess.run(["dpkg-deb", "-f", str(deb), "Pre-Depends", "Depends"],
                            capture_output=True, text=True, check=True).stdout
    groups = []
    for line in fields.splitlines():
        _key, _, value = line.partition(":")
        for group in value.split(","):
            names = [alt.split("(")[0].split(":")[0].strip() for alt in group.split("|")]
            if names and names[0]:
                groups.append(names)
    return groups


def stage_package(deb_dir: Path, deb: Path, dom0_root: Path) -> list[str]:
    """Copies the .deb to deb_dir with the dependencies dom0's image lacks (and
    theirs); returns their names.  Version constraints are not re-checked: dom0
    is the same Debian release the package was built on."""
    shutil.rmtree(deb_dir, ignore_errors=True)
    deb_dir.mkdir(parents=True)
    shutil.copy2(deb, deb_dir / deb.name)
    have = _installed(dom0_root / "var" / "lib" / "dpkg" / "status")
    fetched: list[str] = []
    todo = [deb_dir / deb.name]
    while todo:
        for names in _depends(todo.pop()):
            if any(n in have for n in names):
                continue
            name = names[0]
            subprocess.run(["apt-get", "download", "-q", name], cwd=deb_dir, check=True,
                           capture_output=True)
            have.add(name)
            fetched.append(name)
            todo.append(max(deb_dir.glob(f"{name}_*.deb"), key=lambda p: p.stat().st_mtime))
    return fetched


@dataclass
class Lab:
    share: Path
    rc: int
    seconds: float
    run_log: Path
    results: dict
    decode_errors: dict

    @property
    def out(self) -> Path:
        return self.share / "out"

    def get(self, key: str, default=None):
        return self.results.get(key, default)

    def need(self, key: str):
        if key not in self.results:
            pytest.fail(f"the dom0 run recorded no '{key}' ({self.where()})")
        return self.results[key]

    def where(self) -> str:
        return (f"lab exit {self.rc}; logs: {self.run_log}, {self.out}/run.log, "
                f"{self.out}/serial.log")

    def picture(self, name: str) -> np.ndarray:
        return read_ppm(self.share / "xen" / name)

    def ppm(self, name: str) -> np.ndarray:
        path = self.out / name
        if not path.exists():
            pytest.fail(f"{path} was not written; VNC capture decoding: "
                        f"{self.decode_errors or 'no errors'} ({self.where()})")
        return read_ppm(path)

    def json(self, name: str) -> dict:
        path = self.out / name
        if not path.exists():
            pytest.fail(f"{path} was not written ({self.where()})")
        return json.loads(path.read_text())

    def text(self, name: str) -> str:
        path = self.out / name
        return path.read_text(errors="replace") if path.exists() else ""


def decode_captures(out: Path) -> dict[str, str]:
    """dom0 only captured the VNC updates: decode them here (tests/xen/dom0/rfbclient.py)."""
    sys.path.insert(0, str(HERE / "dom0"))
    import rfbclient
    errors = {}
    for path in sorted(out.glob("*.json")):
        try:
            if json.loads(path.read_text()).get("grabs"):
                rfbclient.decode(str(path))
        except Exception as e:  # noqa: BLE001 - a bad capture must fail a test, not the session
            errors[path.name] = f"{type(e).__name__}: {e}"
    return errors


def parse_results(path: Path) -> dict:
    results = {}
    if path.exists():
        for line in path.read_text().splitlines():
            key, _, value = line.partition("\t")
            try:
                results[key] = json.loads(value)
            except json.JSONDecodeError:
                results[key] = value
    return results


@pytest.fixture(scope="session")
def lab() -> Lab:
    home = xenlab_home()
    if home is None:
        pytest.skip("xenlab not found (set XENLAB_HOME)")
    share = Path(os.environ.get("PYXENFB_XEN_SHARE", "/var/tmp/pyxenfb-xen-share"))
    timeout = int(os.environ.get("PYXENFB_XEN_TIMEOUT", "1000"))
    run_log = share / "tier-run.log"
    if os.environ.get("PYXENFB_XEN_REUSE") == "1" and (share / "out" / "results.tsv").exists():
        rc = int((share / "out" / "rc").read_text()) if (share / "out" / "rc").exists() else 125
        return Lab(share, rc, 0.0, run_log, parse_results(share / "out" / "results.tsv"),
                   decode_captures(share / "out"))
    prepare_share(share, home)
    t0 = time.monotonic()
    with open(run_log, "w") as log:
        # the lab's own timeout kills QEMU; ours is a backstop 60 s later
        proc = subprocess.run([str(home / "run"), str(HERE / "dom0" / "tier.sh"), "--share",
                               str(share), "--timeout", str(timeout), "--xen-args",
                               os.environ.get("PYXENFB_XEN_ARGS", LAB_XEN_ARGS)],
                              stdout=log, stderr=subprocess.STDOUT, timeout=timeout + 60)
    seconds = time.monotonic() - t0
    lab = Lab(share, proc.returncode, seconds, run_log,
              parse_results(share / "out" / "results.tsv"), decode_captures(share / "out"))
    print(f"\nxen tier: lab run took {seconds:.0f} s, exit {proc.returncode}; {lab.where()}")
    if proc.returncode == 124:
        print(f"xen tier: TIMEOUT after {timeout} s: the dom0 script did not finish")
    return lab


def pytest_collection_modifyitems(config, items):
    # The first test pays for the lab boot (minutes under TCG); the project-wide
    # 120 s per-test timeout would cut it off.
    budget = int(os.environ.get("PYXENFB_XEN_TIMEOUT", "1000")) + 120
    for item in items:
        if item.get_closest_marker("xen") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(budget))
