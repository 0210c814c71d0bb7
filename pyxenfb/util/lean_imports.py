"""Imports that would otherwise load far more than the device model uses.

- asyncio imports `ssl` as it is imported, for TLS transports of its own.
  The device model never uses them: its TLS (VeNCrypt, wss://) runs over
  memory buffers (rfb/tls.py), which import `ssl` only when TLS is
  configured.  OpenSSL costs a process ~5 MB resident at import.
- pycryptodome reaches its C code through cffi when cffi is installed (it
  is: our kernels use it), and cffi's ABI mode parses the C declarations
  with pycparser at import: ~1.6 MB of parser tables for one DES block.
  Without cffi it uses ctypes, which numpy has loaded already.

A module hidden here makes `import` raise ImportError for the time of one
import; the libraries above take that as "not available" and carry on.
Afterwards every module is importable again.  In a zygote these pages
would be counted once more for the whole host; in a cold start, once per
device model.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager, nullcontext

_ABSENT = object()


@contextmanager
def modules_hidden(*names: str):
    """Inside, `import NAME` raises ImportError for each of names.  For the
    whole process: meant for the start-up imports here, while no other
    thread imports these modules (none in a device model ever does)."""
    saved = {name: sys.modules.get(name, _ABSENT) for name in names}
    for name in names:
        sys.modules[name] = None
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is _ABSENT:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def import_asyncio_without_ssl() -> bool:
    """True when asyncio was imported here without ssl; False when either
    was imported already (a test process, a second call): nothing changes."""
    if "asyncio" in sys.modules or "ssl" in sys.modules:
        return False
    with modules_hidden("ssl"):
        import asyncio  # noqa: F401
    return True


def des_module():
    """pycryptodome's DES; through ctypes when this process loads
    pycryptodome's C access for the first time here."""
    first = "Crypto.Util._raw_api" not in sys.modules
    with modules_hidden("cffi") if first else nullcontext():
        from Crypto.Cipher import DES
    return DES
