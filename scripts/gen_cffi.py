#!/usr/bin/env python3
"""Regenerate the cffi modules (out-of-line ABI mode) from their declarations:
pyxenfb/platform/_xen_ffi.py from xen_cdefs.py, pyxenfb/displays/_pixman_ffi.py from pixman_cdefs.py
and pyxenfb/rfb/_enc_ffi.py from enc_cdefs.py.

    uv run python scripts/gen_cffi.py [--pixman | --enc] [OUTPUT]

Without OUTPUT all are written in place.  Run it after changing a *_cdefs.py;
tests/test_platform.py fails until you do.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def generate(out: Path, which: str = "xen") -> None:
    import cffi

    from pyxenfb.displays import pixman_cdefs
    from pyxenfb.platform import xen_cdefs
    from pyxenfb.rfb import enc_cdefs
    cdefs = {"xen": xen_cdefs, "pixman": pixman_cdefs, "enc": enc_cdefs}[which]
    ffi = cffi.FFI()
    ffi.cdef(cdefs.ALL)
    ffi.set_source(cdefs.MODULE, None)      # None: ABI mode, nothing to compile
    ffi.emit_python_code(str(out))


if __name__ == "__main__":
    args = sys.argv[1:]
    which = "pixman" if "--pixman" in args else "enc" if "--enc" in args else "xen"
    args = [a for a in args if a not in ("--pixman", "--enc")]
    if args:
        generate(Path(args[0]), which)
        print(f"wrote {args[0]}")
    else:
        for which, folder, name in (("xen", "platform", "_xen_ffi.py"), ("pixman", "displays", "_pixman_ffi.py"),
                                    ("enc", "rfb", "_enc_ffi.py")):
            generate(ROOT / "pyxenfb" / folder / name, which)
            print(f"wrote pyxenfb/{folder}/{name}")
