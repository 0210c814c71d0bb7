"""Where pyqemu-dm spends its time while one vnc-rate client watches a
full-screen animation (what limits the frames/s figures of `python -m bench`).

    uv run python -m bench.profile_dm [--size 800x600] [--encoding Tight] [--seconds 6]

Needs py-spy (`uvx py-spy`, from PyPI) and ptrace rights on the DM (root, or
kernel.yama.ptrace_scope=0).  Prints the top functions by own time and by
inclusive time, from py-spy's sampled stacks.
"""
from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys

from .procs import Procs, SimHost
from .suite import anchor


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="800x600")
    ap.add_argument("--encoding", default="Tight")
    ap.add_argument("--seconds", type=float, default=6)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args(argv)
    w, h = map(int, args.size.split("x"))
    pyspy = shutil.which("py-spy") and ["py-spy"] or (shutil.which("uvx") and ["uvx", "py-spy"])
    if not pyspy or anchor("vnc-rate") is None:
        sys.exit("needs py-spy (or uvx) and ../shared/bench/vnc-rate")
    procs = Procs()
    try:
        sim = SimHost(procs)
        port = sim.create(1, width=w, height=h, animate="full", memory=128)
        dm = sim.pid(1, "dm")
        raw = os.path.join(sim.run_dir, "prof.txt")
        client = procs.popen([sys.executable, str(anchor("vnc-rate")), f"127.0.0.1::{port}",
                              "--encoding", args.encoding, "--seconds", str(args.seconds + 2)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        subprocess.run([*pyspy, "record", "-p", str(dm), "-d", str(int(args.seconds)), "-f", "raw",
                        "-o", raw, "-r", "200", "--nonblocking"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
        print(client.communicate(timeout=60)[0].strip())
        own, incl, total = collections.Counter(), collections.Counter(), 0
        for line in open(raw):
            stack, _, n = line.rstrip().rpartition(" ")
            frames = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1] + ")"
                      if " (" in f else f for f in stack.split(";")]
            n = int(n)
            total += n
            own[frames[-1]] += n
            for f in set(frames):
                incl[f] += n
        print(f"pyqemu-dm, {args.size} {args.encoding}: {total} samples")
        for title, c in (("own time", own), ("inclusive", incl)):
            print(f"-- top by {title}")
            # frames on (nearly) every stack (event loop, main) say nothing
            for f, n in [(f, n) for f, n in c.most_common() if n < 0.95 * total][:args.top]:
                print(f"{100 * n / max(1, total):5.1f}%  {f}")
    finally:
        procs.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
