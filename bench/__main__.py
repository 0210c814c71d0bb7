"""pyxenfb's benchmark suite.

    uv run python -m bench [--quick] [--only GROUP[,GROUP]] [--out FILE.jsonl]
                           [--encodings Raw,Hextile] [--sizes 1920x1080]
    uv run python -m bench --plot FILE.jsonl OUTDIR     (PNGs)
    uv run python -m bench --table FILE.jsonl           (Markdown table)

Prints one JSON line per metric (also appended to --out): name, value, unit,
baseline, baseline_value, ratio (= our cost / the baseline's; < 1 is better)
and extra fields.  Groups, in order: convert, libvncserver, encoders, vnc_rate,
vnc_content, slow_link, latency, idle, lifecycle, memory, multi, zygote.
--quick takes ~7 minutes on a 2-core VM (vnc_rate with both anchors ~2,
vnc_content and slow_link ~1.5 each), the full run longer (1080p contents).
Side files (latency samples) go next to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback


def main(argv=None) -> int:
    from . import suite
    from .procs import Procs
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter runs, fewer domains and sizes (~7 min)")
    ap.add_argument("--only", help=f"comma-separated groups: {','.join(suite.GROUPS)}")
    ap.add_argument("--out", help="also append the JSON lines to this file")
    ap.add_argument("--encodings", help="vnc_rate and vnc_content: only these encodings "
                                        f"(comma-separated, of {','.join(suite.ENCODINGS)})")
    ap.add_argument("--sizes", help="vnc_rate and vnc_content: only these sizes (e.g. 1920x1080; "
                                    f"of {','.join(f'{w}x{h}' for w, h in suite.SIZES)})")
    ap.add_argument("--plot", nargs=2, metavar=("FILE.jsonl", "OUTDIR"),
                    help="draw the PNGs from a previous run's JSON lines and exit")
    ap.add_argument("--table", metavar="FILE.jsonl",
                    help="print a previous run's figures as a Markdown table and exit")
    ap.add_argument("--wire-table", metavar="FILE.jsonl",
                    help="print the wire groups' figures (vnc_rate, vnc_content, slow_link) as "
                         "Markdown tables, ours beside Xvnc and x11vnc, and exit")
    ap.add_argument("--before", metavar="FILE.jsonl",
                    help="with --table: an earlier run whose ratios go beside")
    args = ap.parse_args(argv)
    if args.wire_table:
        from .plot import wire_tables
        print(wire_tables(args.wire_table))
        return 0
    if args.table:
        from .plot import markdown_table
        print(markdown_table(args.table, args.before))
        return 0
    if args.plot:
        from .plot import plot
        for path in plot(*args.plot):
            print(path)
        return 0
    groups = list(suite.GROUPS)
    if args.only:
        groups = [g.strip() for g in args.only.split(",") if g.strip()]
        unknown = [g for g in groups if g not in suite.GROUPS]
        if unknown:
            ap.error(f"unknown group(s) {', '.join(unknown)}; known: {', '.join(suite.GROUPS)}")
    if args.encodings:
        encs = [e.strip() for e in args.encodings.split(",") if e.strip()]
        unknown = [e for e in encs if e not in suite.ENCODINGS]
        if unknown or not encs:
            ap.error(f"unknown encoding(s) {', '.join(unknown)}; known: {', '.join(suite.ENCODINGS)}")
        suite.ENCODINGS[:] = encs          # the anchors are asked for the same ones
    if args.sizes:
        known = {f"{w}x{h}": (w, h) for w, h in suite.SIZES}
        sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
        unknown = [s for s in sizes if s not in known]
        if unknown or not sizes:
            ap.error(f"unknown size(s) {', '.join(unknown)}; known: {', '.join(known)}")
        suite.SIZES[:] = [known[s] for s in sizes]

    class Ctx:
        pass
    ctx = Ctx()
    ctx.quick = args.quick
    ctx.procs = Procs()
    ctx.out_dir = os.path.dirname(os.path.abspath(args.out)) if args.out else None
    out = open(args.out, "a") if args.out else None

    def emit(d: dict) -> None:
        line = json.dumps(d)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    # Ctrl-C and SIGTERM both stop the run and clean up; SIGINT explicitly, as
    # a shell's background job starts with it ignored.
    def interrupted(*_):
        raise KeyboardInterrupt
    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)

    def cleanup():
        # a second Ctrl-C must not cut the cleanup short
        old = [signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)]
        try:
            ctx.procs.cleanup()
        finally:
            for s, h in zip((signal.SIGINT, signal.SIGTERM), old):
                signal.signal(s, h)
    t0 = time.monotonic()
    try:
        for g in groups:
            try:
                for d in suite.GROUPS[g](ctx):
                    d.setdefault("group", g)
                    emit(d)
            except KeyboardInterrupt:
                raise
            except Exception as exc:              # one broken group must not hide the others
                traceback.print_exc(file=sys.stderr)
                emit({"name": g, "value": None, "unit": None, "baseline": None,
                      "baseline_value": None, "ratio": None, "group": g,
                      "skipped": f"{type(exc).__name__}: {exc}"})
            finally:
                cleanup()                         # each group starts from a clean machine
    except KeyboardInterrupt:
        print("bench: interrupted, cleaning up", file=sys.stderr)
        return 130
    finally:
        cleanup()
        if out:
            out.close()
    print(f"bench: {len(groups)} group(s) in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
