"""Builds pyqemu-dm's stand-in in C: pyxenfb/zygote/standin.c -> pyxenfb/bin/pyqemu-dm,
and the encoders' kernel: pyxenfb/rfb/enc_kernel.c -> pyxenfb/rfb/_enc_kernel.so.

Run by hatchling for wheels and editable installs (pyproject.toml), and by
scripts/setup as `python3 hatch_build.py [PYTHON]`, which also names the
interpreter the stand-in execs for a cold start.  Without a C compiler the
package still works: the Python launcher and forwarder stand in (docs/zygote.md),
and the encoders use their numpy twins (docs/vnc.md).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

SOURCE = os.path.join("pyxenfb", "zygote", "standin.c")
REQUIRE_ENV = "PYXENFB_REQUIRE_C_LAUNCHER"
TARGET = os.path.join("pyxenfb", "bin", "pyqemu-dm")
KERNEL_SOURCE = os.path.join("pyxenfb", "rfb", "enc_kernel.c")
KERNEL_TARGET = os.path.join("pyxenfb", "rfb", "_enc_kernel.so")


def _compile(cc: str, command_tail: list[str], target: str, last: tuple[str, ...] = ()) -> str | None:
    partial = target + ".partial"
    # $CFLAGS / $LDFLAGS as a C build takes them (debian/rules passes
    # dpkg-buildflags' hardening flags this way); `last` after them
    flags = os.environ.get("CFLAGS", "").split() + os.environ.get("LDFLAGS", "").split()
    try:
        done = subprocess.run([cc, "-O2", "-Wall", *flags, *last, "-o", partial, *command_tail],
                              capture_output=True, text=True)
    except OSError as e:                    # $CC names no program
        return f"no C compiler ({cc}: {e.strerror or e})"
    if done.returncode != 0:
        return f"{cc} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}"
    os.replace(partial, target)
    return None


def build_kernel(root: str, target: str | None = None) -> str | None:
    """Compile the encoders' kernel (a shared library needing only libc) to
    target (default: under root); None when built, else why not (one line)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return "no C compiler (cc)"
    # -O3 even under a packager's -O2: it vectorises the gradient filter (5x)
    return _compile(cc, ["-shared", "-fPIC", os.path.join(root, KERNEL_SOURCE)],
                    target or os.path.join(root, KERNEL_TARGET), last=("-O3",))


def build(root: str, python: str | None = None, target: str | None = None) -> str | None:
    """Compile root's stand-in to target (default: under root); None when
    built, else why not (one line)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return "no C compiler (cc)"
    target = target or os.path.join(root, TARGET)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    return _compile(cc, [*([f'-DPYTHON="{python}"'] if python else []), os.path.join(root, SOURCE)], target)


try:
    from hatchling.builders.hooks.plugin.interface import BuildHookInterface
except ImportError:                         # run by scripts/setup, outside a build
    BuildHookInterface = object


class StandInBuildHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict) -> None:
        if self.target_name != "wheel":
            return
        # An editable install runs the tree itself: the programs go there
        # (scripts/setup then rebuilds the launcher naming the venv's
        # interpreter).  A real wheel gets them built aside: building a wheel
        # must not replace the checkout's own.
        editable = version == "editable"
        self._scratch = None if editable else tempfile.mkdtemp(prefix="pyxenfb-build-")
        require = os.environ.get(REQUIRE_ENV) == "1"      # a wheel to publish must carry both
        built = False
        for name, make, relpath, instead in (
                ("the encoders' C kernel", build_kernel, KERNEL_TARGET, "their numpy twins serve instead"),
                ("pyqemu-dm's C stand-in", build, TARGET, "the Python stand-in serves instead")):
            target = os.path.join(self.root, relpath) if editable else \
                os.path.join(self._scratch, os.path.basename(relpath))
            why = make(self.root, target=target)
            if why:
                if require:
                    raise RuntimeError(f"{name} not built: {why} (${REQUIRE_ENV}=1)")
                self.app.display_warning(f"{name} not built ({why}); {instead}")
                continue
            built = True
            if editable:
                build_data["artifacts"].append(relpath)
            else:
                build_data["force_include"][target] = relpath
        if built and not editable:
            # Programs inside, linked to libc alone and to no Python (the kernel
            # is dlopen'ed through cffi's ABI mode): any Python 3 of this
            # platform (auditwheel then proves and names the manylinux level:
            # scripts/build-wheel).
            build_data["pure_python"] = False
            build_data["tag"] = "py3-none-" + sysconfig.get_platform().replace("-", "_").replace(".", "_")

    def finalize(self, version: str, build_data: dict, artifact_path: str) -> None:
        if getattr(self, "_scratch", None):
            shutil.rmtree(self._scratch, ignore_errors=True)


if __name__ == "__main__":
    root = os.path.dirname(os.path.abspath(__file__))
    why = build(root, sys.argv[1] if len(sys.argv) > 1 else None)
    why_kernel = build_kernel(root)
    if why_kernel:
        print(f"hatch_build: the encoders' C kernel not built: {why_kernel}", file=sys.stderr)
    if why:
        print(f"hatch_build: pyqemu-dm's C stand-in not built: {why}", file=sys.stderr)
    if why or why_kernel:
        sys.exit(1)
