"""What pip and pipx users get (issue 23, docs/install.md): scripts/build-wheel's
manylinux wheel with the C launcher, and an sdist that installs without a C
compiler.  (pipx on a plain Debian 12 is tests/test_deb.py's, in a fresh root.)"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile

ROOT = Path(__file__).resolve().parent.parent
UV = str(ROOT / "scripts" / "uv")


def _tree_launcher() -> bytes | None:
    path = ROOT / "pyxenfb" / "bin" / "pyqemu-dm"
    return path.read_bytes() if path.exists() else None


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("dist")
    before = _tree_launcher()              # scripts/setup's, naming this venv's interpreter
    done = subprocess.run([str(ROOT / "scripts" / "build-wheel")], cwd=ROOT, capture_output=True,
                          text=True, env=dict(os.environ, DIST=str(out)), timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert _tree_launcher() == before, "building the wheel replaced the checkout's launcher"
    wheels, sdists = list(out.glob("pyxenfb-*.whl")), list(out.glob("pyxenfb-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in out.iterdir())
    return wheels[0], sdists[0]


def _needed(elf_bytes_path: Path) -> list[str]:
    with open(elf_bytes_path, "rb") as f:
        elf = ELFFile(f)
        return [tag.needed for section in elf.iter_sections() if isinstance(section, DynamicSection)
                for tag in section.iter_tags() if tag.entry.d_tag == "DT_NEEDED"]


def test_the_wheel_is_manylinux_and_its_programs_need_only_glibc(built, tmp_path):
    wheel, _ = built
    m = re.fullmatch(r"pyxenfb-[\d.]+-py3-none-manylinux_(\d+)_(\d+)_x86_64\.whl", wheel.name)
    assert m, wheel.name
    assert (int(m[1]), int(m[2])) <= (2, 36), "must install on Debian 12 (glibc 2.36)"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        assert "pyxenfb/bin/pyqemu-dm" in names and "pyxenfb/rfb/_enc_kernel.so" in names
        assert f"Tag: py3-none-manylinux_{m[1]}_{m[2]}_x86_64" in z.read(
            next(n for n in names if n.endswith(".dist-info/WHEEL"))).decode()
        mode = z.getinfo("pyxenfb/bin/pyqemu-dm").external_attr >> 16
        assert mode & 0o111 == 0o111, oct(mode)          # installed executable
        z.extractall(tmp_path)
        elves = [n for n in names if z.read(n)[:4] == b"\x7fELF"]
    assert len(elves) == 2, elves  # the launcher and the encoders' kernel, nothing bundled
    for name in elves:             # nothing needed but glibc itself
        assert set(_needed(tmp_path / name)) <= {"libc.so.6", "ld-linux-x86-64.so.2"}, \
            (name, _needed(tmp_path / name))
    shown = subprocess.run([UV, "run", "--frozen", "auditwheel", "show", str(wheel)], cwd=ROOT,
                           capture_output=True, text=True)
    assert shown.returncode == 0 and f'"manylinux_{m[1]}_{m[2]}_x86_64"' in shown.stdout, shown.stdout


def test_the_sdist_builds_without_a_compiler_and_falls_back_to_the_python_launcher(built, tmp_path):
    _, sdist = built
    with tarfile.open(sdist) as t:
        members = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert {"hatch_build.py", "pyxenfb/zygote/standin.c", "pyxenfb/zygote/standin.py"} <= members
    assert not any(n.startswith("pyxenfb/bin/") for n in members)   # built, never shipped
    no_cc = dict(os.environ, CC="/nonexistent/cc")
    done = subprocess.run([UV, "build", "--wheel", "-o", str(tmp_path), str(sdist)],
                          cwd=tmp_path, capture_output=True, text=True, env=no_cc, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "C stand-in not built (no C compiler" in done.stderr, done.stderr
    wheel = next(tmp_path.glob("pyxenfb-*.whl"))
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry_points = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert not any(n.startswith("pyxenfb/bin/") or n.endswith(".so") for n in names)
    assert "pyqemu-dm = pyxenfb.zygote.launch:main" in entry_points, entry_points
    # The pure wheel's Python launcher runs the device model from that wheel.
    target = tmp_path / "site"
    subprocess.run([UV, "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, cwd=tmp_path)
    ran = subprocess.run([sys.executable, "-c", "import sys, pyxenfb.zygote.launch as l; "
                          "print(l.__file__); sys.argv = ['pyqemu-dm', '--help']; l.main()"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=str(target), PYXENFB_ZYGOTE="off"))
    assert ran.stdout.splitlines()[0] == str(target / "pyxenfb" / "zygote" / "launch.py"), ran.stdout
    assert "usage: pyqemu-dm [options]" in ran.stdout, ran.stdout + ran.stderr


def test_a_wheel_to_publish_refuses_to_build_without_the_launcher(tmp_path):
    done = subprocess.run([UV, "build", "--wheel", "-o", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, CC="/nonexistent/cc", PYXENFB_REQUIRE_C_LAUNCHER="1"))
    assert done.returncode != 0
    assert "not built: no C compiler" in done.stderr, done.stderr
    assert not list(tmp_path.glob("*.whl"))
