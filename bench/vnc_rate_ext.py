"""../shared/bench/vnc-rate with Tight's JPEG asked for.

    python bench/vnc_rate_ext.py --jpeg-quality Q VNC-RATE-ARGS...

The shared client sends SetEncodings with its one encoding only (so Tight
never gets JPEG).  This runs it unchanged, but appends the JPEG quality
pseudo-encoding (-32 + Q, Q 0..9) to that one SetEncodings message.
BENCH_ANCHORS names the shared tools' directory (as for the suite).
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import socket
import struct
import sys
from pathlib import Path

ANCHORS = Path(os.environ.get("BENCH_ANCHORS",
                              Path(__file__).resolve().parent.parent.parent / "shared" / "bench"))
JPEG_QUALITY_0 = -32             # pseudo-encodings -32 .. -23: JPEG quality level 0 .. 9


class _AskJpeg:
    """A socket whose SetEncodings (type 2, one encoding) gains the quality pseudo-encoding."""

    def __init__(self, sock: socket.socket, extra: list[int]):
        self._sock, self._extra = sock, extra

    def __getattr__(self, name):
        return getattr(self._sock, name)

    def sendall(self, data, *args):
        data = bytes(data)
        if len(data) == 8 and data[0] == 2 and struct.unpack(">H", data[2:4])[0] == 1:
            data = (struct.pack(">BxH", 2, 1 + len(self._extra)) + data[4:8] +
                    b"".join(struct.pack(">i", e) for e in self._extra))
        return self._sock.sendall(data, *args)


class _SocketModule:
    def __init__(self, extra: list[int]):
        self._extra = extra

    def __getattr__(self, name):
        return getattr(socket, name)

    def create_connection(self, *args, **kw):
        return _AskJpeg(socket.create_connection(*args, **kw), self._extra)


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "--jpeg-quality" or not argv[1].isdigit() or int(argv[1]) > 9:
        print(__doc__, file=sys.stderr)
        return 2
    path = ANCHORS / "vnc-rate"
    loader = importlib.machinery.SourceFileLoader("vnc_rate", str(path))
    spec = importlib.util.spec_from_loader("vnc_rate", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    mod.socket = _SocketModule([JPEG_QUALITY_0 + int(argv[1])])
    sys.argv = [str(path), *argv[2:]]
    return mod.main()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
