"""Syscalls per delivered update of pyqemu-dm while one vnc-rate client
watches a full-screen animation: in a PV dom0 every syscall and every
thread wake-up goes through Xen, so what is cheap here is dear in the lab.

    uv run python -m bench.syscalls_dm [--size 800x600] [--encoding Tight] [--seconds 6]

Needs strace (Debian's `strace`) and ptrace rights on the DM (root, or
kernel.yama.ptrace_scope=0).  Prints the client's figures and strace's
summary for all the DM's threads, then the calls per update.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys

from .procs import Procs, SimHost, wait_desktop
from .suite import anchor


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="800x600")
    ap.add_argument("--encoding", default="Tight")
    ap.add_argument("--seconds", type=float, default=6)
    args = ap.parse_args(argv)
    w, h = map(int, args.size.split("x"))
    if not shutil.which("strace") or anchor("vnc-rate") is None:
        sys.exit("needs strace and ../shared/bench/vnc-rate")
    procs = Procs()
    try:
        sim = SimHost(procs)
        port = sim.create(1, width=w, height=h, animate="full", memory=128)
        wait_desktop(port, w, h)
        dm = sim.pid(1, "dm")
        summary = os.path.join(sim.run_dir, "strace.txt")
        tracer = procs.popen(["strace", "-c", "-f", "-p", str(dm), "-o", summary],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        # strace says when it is attached; the client starts after that
        for line in tracer.stderr:
            if "attached" in line:
                break
        client = procs.popen([sys.executable, str(anchor("vnc-rate")), f"127.0.0.1::{port}",
                              "--encoding", args.encoding, "--seconds", str(args.seconds)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        out = client.communicate(timeout=args.seconds + 60)[0].strip()
        tracer.terminate()
        tracer.wait(timeout=30)
        print(out)
        report = open(summary).read()
        print(report)
        updates = json.loads(out.splitlines()[-1])["updates"]
        total = re.search(r"^100\.00\s+\S+\s+\S+\s+(\d+)", report, re.M)
        if total and updates:
            print(f"pyqemu-dm, {args.size} {args.encoding}: {int(total.group(1)) / updates:.1f} syscalls "
                  f"per update ({updates} updates; strace's own overhead slows the DM)")
    finally:
        procs.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
