#!/usr/bin/env python3
"""Regenerate pyxenfb/_xen_ffi.py from pyxenfb/xen_cdefs.py (cffi out-of-line ABI mode).

    uv run python scripts/gen_cffi.py [OUTPUT]

Run it after changing xen_cdefs.py; tests/test_platform.py fails until you do.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def generate(out: Path) -> None:
    import cffi

    from pyxenfb import xen_cdefs
    ffi = cffi.FFI()
    ffi.cdef(xen_cdefs.ALL)
    ffi.set_source(xen_cdefs.MODULE, None)      # None: ABI mode, nothing to compile
    ffi.emit_python_code(str(out))


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "pyxenfb" / "_xen_ffi.py"
    generate(target)
    print(f"wrote {target}")
