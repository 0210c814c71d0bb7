"""Builds pyqemu-dm's stand-in in C: pyxenfb/zygote/standin.c -> pyxenfb/bin/pyqemu-dm.

Run by hatchling for wheels and editable installs (pyproject.toml), and by
scripts/setup as `python3 hatch_build.py [PYTHON]`, which also names the
interpreter the stand-in execs for a cold start.  Without a C compiler the
package still works: the Python launcher and forwarder stand in (docs/zygote.md).
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


def build(root: str, python: str | None = None, target: str | None = None) -> str | None:
    """Compile root's stand-in to target (default: under root); None when
    built, else why not (one line)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return "no C compiler (cc)"
    target = target or os.path.join(root, TARGET)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    partial = target + ".partial"
    # $CFLAGS / $LDFLAGS as a C build takes them (debian/rules passes
    # dpkg-buildflags' hardening flags this way)
    flags = os.environ.get("CFLAGS", "").split() + os.environ.get("LDFLAGS", "").split()
    command = [cc, "-O2", "-Wall", *flags, "-o", partial, os.path.join(root, SOURCE)]
    if python:
        command[1:1] = [f'-DPYTHON="{python}"']
    try:
        done = subprocess.run(command, capture_output=True, text=True)
    except OSError as e:                    # $CC names no program
        return f"no C compiler ({cc}: {e.strerror or e})"
    if done.returncode != 0:
        return f"{cc} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}"
    os.replace(partial, target)
    return None


try:
    from hatchling.builders.hooks.plugin.interface import BuildHookInterface
except ImportError:                         # run by scripts/setup, outside a build
    BuildHookInterface = object


class StandInBuildHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict) -> None:
        if self.target_name != "wheel":
            return
        # An editable install runs the tree itself: the launcher goes there
        # (scripts/setup then rebuilds it naming the venv's interpreter).  A
        # real wheel gets one built aside: building a wheel must not replace
        # the checkout's own launcher.
        editable = version == "editable"
        self._scratch = None if editable else tempfile.mkdtemp(prefix="pyxenfb-launcher-")
        built = os.path.join(self.root, TARGET) if editable else os.path.join(self._scratch, "pyqemu-dm")
        why = build(self.root, target=built)
        if why:
            if os.environ.get(REQUIRE_ENV) == "1":      # a wheel to publish must carry it
                raise RuntimeError(f"pyqemu-dm's C stand-in not built: {why} (${REQUIRE_ENV}=1)")
            self.app.display_warning(f"pyqemu-dm's C stand-in not built ({why}); "
                                     "the Python stand-in serves instead")
            return
        if editable:
            build_data["artifacts"].append(TARGET)
        else:
            build_data["force_include"][built] = TARGET
            # A program inside, linked to libc alone and to no Python: any
            # Python 3 of this platform (auditwheel then proves and names the
            # manylinux level: scripts/build-wheel).
            build_data["pure_python"] = False
            build_data["tag"] = "py3-none-" + sysconfig.get_platform().replace("-", "_").replace(".", "_")

    def finalize(self, version: str, build_data: dict, artifact_path: str) -> None:
        if getattr(self, "_scratch", None):
            shutil.rmtree(self._scratch, ignore_errors=True)


if __name__ == "__main__":
    root = os.path.dirname(os.path.abspath(__file__))
    why = build(root, sys.argv[1] if len(sys.argv) > 1 else None)
    if why:
        print(f"hatch_build: pyqemu-dm's C stand-in not built: {why}", file=sys.stderr)
        sys.exit(1)
