"""`pyqemu-dm` as the toolstack execs it: a warm zygote's child if one
answers (docs/zygote.md), else a cold start.

Nothing but standin.py (the standard library) is imported before the
zygote answers: pyxenfb.machine.cli (logging, dataclasses, the option tables) takes
~36 ms to import here and is paid again for every domain, many times over
in an emulated or busy dom0, before the hand-over could even begin.  The
arguments are not checked here: the zygote's child parses them exactly as
a cold start would and reports to the same stderr and exit status.
"""
from __future__ import annotations

import sys

PROG = "pyqemu-dm"


def log_prefix(argv: list[str]) -> str:
    """"pyqemu-dm[N]" for -d N / -xen-domid N, as the device model's own lines."""
    for flag in ("-d", "-xen-domid"):
        if flag in argv[:-1]:
            value = argv[argv.index(flag) + 1]
            if value.isdigit():
                return f"{PROG}[{int(value)}]"
    return PROG


def main() -> int:
    argv = sys.argv[1:]
    from .standin import try_zygote
    code = try_zygote(argv, log_prefix(argv))
    if code is not None:
        return code
    from ..machine.cli import main as cold_start
    return cold_start(argv)


if __name__ == "__main__":
    sys.exit(main())
