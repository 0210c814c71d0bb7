"""The stand-in's last form: forward signals to its zygote child, exit with its status.

Once the zygote's child is committed (standin.py), the pyqemu-dm the
toolstack exec'd re-execs itself, same pid, as `python -S -I` running only
this loop.  It imports nothing but os, signal and sys: a bare interpreter
is ~3.5 MiB private, and socket + json would add ~0.8 MiB to each of the
stand-ins a dom0 keeps (measured with smaps_rollup).  Of the wire format
(wire.py, which imports only _struct) this side needs two messages: it
writes SIGNAL and reads EXIT, one per SOCK_SEQPACKET datagram.
"""
from __future__ import annotations

import os
import signal
import sys

from .wire import MAX_MESSAGE, encode_signal, exit_code

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def forward(fd: int, pid: int, prefix: str) -> int:
    """Forward the toolstack's signals over the control socket fd until the
    child reports its exit status (returned) or the socket closes (1)."""
    def on_signal(signum, _frame):
        try:
            os.write(fd, encode_signal(signum))
        except OSError:
            pass                            # the child is gone: the EOF below says so
    for sig in FORWARDED:
        signal.signal(sig, on_signal)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
    while True:
        try:
            message = os.read(fd, MAX_MESSAGE + 1)     # a handler runs, then the read resumes
        except OSError:
            message = b""
        if not message:
            print(f"{prefix}: device model pid {pid} died without an exit status "
                  "(killed by a signal?)", file=sys.stderr, flush=True)
            return 1
        code = exit_code(message)
        if code is not None:
            return code
        print(f"{prefix}: zygote child {pid}: bad message {message[:40]!r}; ignored",
              file=sys.stderr, flush=True)


def main(args: list[str]) -> int:
    """The re-exec'd stand-in: args are FD PID PREFIX -- ORIGINAL-ARGV."""
    return forward(int(args[0]), int(args[1]), args[2])
