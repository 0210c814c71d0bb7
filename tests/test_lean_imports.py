"""util/lean_imports.py: asyncio without OpenSSL, DES without cffi's parser,
in a fresh interpreter each (what a device model's process starts as)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from pyxenfb.util.lean_imports import modules_hidden


def run_fresh(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_modules_hidden_restores_what_was_there():
    import json
    with modules_hidden("json", "pyxenfb_no_such_module"):
        with pytest.raises(ImportError):
            import json  # noqa: F811
    assert sys.modules["json"] is json
    assert "pyxenfb_no_such_module" not in sys.modules


def test_asyncio_without_ssl_and_ssl_still_importable_after():
    out = run_fresh(
        "import sys\n"
        "from pyxenfb.util.lean_imports import import_asyncio_without_ssl\n"
        "first = import_asyncio_without_ssl()\n"
        "loaded = 'ssl' in sys.modules or '_ssl' in sys.modules\n"
        "second = import_asyncio_without_ssl()\n"
        "import asyncio\n"
        "async def main(): return 7\n"
        "ran = asyncio.run(main())\n"
        "import ssl\n"
        "print(first, loaded, second, ran, ssl.OPENSSL_VERSION.startswith('OpenSSL'))\n")
    assert out.split() == ["True", "False", "False", "7", "True"]


def test_des_through_ctypes_gives_the_rfb_response():
    """A fresh process's VNC response equals this process's (whose DES is
    checked against a published vector in tests/test_rfb_auth.py), with
    neither cffi's parser nor OpenSSL loaded."""
    from pyxenfb.rfb.auth import vnc_response
    want = vnc_response("password", bytes(range(16))).hex()
    out = run_fresh(
        "import sys\n"
        "from pyxenfb.rfb.auth import check_response, vnc_response\n"
        "got = vnc_response('password', bytes(range(16)))\n"
        "ok = check_response('password', bytes(range(16)), got)\n"
        "bad = check_response('password', bytes(range(16)), bytes(16))\n"
        "gone = [m for m in ('pycparser', 'cffi', '_hashlib', 'hmac', 'ssl') if m in sys.modules]\n"
        "print(got.hex(), ok, bad, gone)\n")
    assert out.split() == [want, "True", "False", "[]"]
