"""Pixel conversion throughput against pixman in C and memcpy, in the same run.

    uv run python bench/bench_convert.py [--quick]

Builds /work/shared/bench/pixbench.c (pixman SRC x8r8g8b8 -> each target and
memcpy of the same bytes, best of N, over a preallocated destination) with gcc
and pkg-config, runs it, then times `convert_rect(..., out=)` on the same
source pattern and size.  One JSON line per conversion:

    {"name", "value": MPix/s, "unit", "baseline", "baseline_value", "ratio"}

ratio = our time / the baseline's time (< 1 is better): the format-match copy
is measured against memcpy, conversions against pixman in C; the "numpy ..."
lines time our numpy path (libpixman hidden) against the same pixman figure.
`run(quick)` returns the rows for `python -m bench`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time

import numpy as np

from pyxenfb.displays import pixman
from pyxenfb.util.lazylib import LazyLibrary
from pyxenfb.convert import GUEST_8, GUEST_16, GUEST_32, PixelFormat, conversion_path, convert_rect

PIXBENCH = os.environ.get("PIXBENCH_C", "/work/shared/bench/pixbench.c")

# pixbench's targets (its "what" names) and our formats for them.
TARGETS = {
    "x8r8g8b8(copy)": ("copy 32->32", GUEST_32),
    "r5g6b5": ("32->16 (565)", GUEST_16),
    "x8b8g8r8": ("32->32 swapped (RGBX)", PixelFormat(32, 24, False, 255, 255, 255, 0, 8, 16)),
    "x1r5g5b5": ("32->16 (555)", PixelFormat(16, 15, False, 31, 31, 31, 10, 5, 0)),
    "b2g3r3": ("32->8 (BGR233)", PixelFormat(8, 8, False, 7, 7, 3, 0, 3, 6)),
    "r3g3b2": ("32->8 (RGB332)", GUEST_8),
}


def best_of(fn, repeat: int) -> float:
    """Best wall time of `repeat` runs (the least disturbed by the machine)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def c_baselines(w: int, h: int, reps: int) -> dict[str, float]:
    """{"memcpy" | pixman target name: best milliseconds} from pixbench.c, or {} if it cannot be built."""
    if not (shutil.which("gcc") and shutil.which("pkg-config") and os.path.exists(PIXBENCH)):
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        exe = os.path.join(tmp, "pixbench")
        flags = subprocess.run(["pkg-config", "--cflags", "--libs", "pixman-1"],
                               capture_output=True, text=True)
        if flags.returncode != 0:
            return {}
        subprocess.run(["gcc", "-O2", "-o", exe, PIXBENCH, *flags.stdout.split()], check=True)
        out = subprocess.run([exe, str(w), str(h), str(reps)], capture_output=True, text=True,
                             check=True, timeout=300).stdout
    result = {}
    for line in out.splitlines():
        row = json.loads(line)
        result[row["what"].removeprefix("pixman ")] = row["ms"]
    return result


def _time_numpy_path(fn, repeat: int) -> float:
    """`fn` timed with libpixman reported missing (the fallback path)."""
    saved = pixman.library
    pixman.library = LazyLibrary(lambda: (None, None))
    try:
        return best_of(fn, repeat)
    finally:
        pixman.library = saved


def run(quick: bool = False) -> list[dict]:
    w, h, reps = (800, 600, 10) if quick else (1920, 1080, 30)
    mpix = w * h / 1e6
    before = c_baselines(w, h, reps)
    # pixbench's source pattern, so both sides convert the same pixels
    src = (np.arange(w * h, dtype=np.uint32) * np.uint32(2654435761)).astype("<u4")
    src = src.view(np.uint8).reshape(h, w * 4)
    ours = []          # (row name, our ms, baseline name, pixbench key)
    for what, (name, dst) in TARGETS.items():
        out = np.empty((h, w * dst.bytes_per_pixel), np.uint8)

        def fn():
            convert_rect(src, GUEST_32, dst, 0, 0, w, h, out=out)
        path = conversion_path(GUEST_32, dst)
        ms = best_of(fn, reps) * 1e3
        if path == "copy":
            ours.append((f"{name} [copy]", ms, "memcpy (C)", "memcpy"))
            continue
        ours.append((f"{name} [{path}]", ms, "pixman (C)", what))
        if path == "pixman":
            ours.append((f"{name} [numpy]", _time_numpy_path(fn, reps) * 1e3, "pixman (C)", what))
    # The machine is shared: the C side runs again after ours and keeps its
    # better time, so a ratio is never flattered by one slow baseline run.
    after = c_baselines(w, h, reps)
    rows = []
    for name, ms, baseline, key in ours:
        times = [t[key] for t in (before, after) if key in t]
        base = min(times) if times else None
        rows.append({"name": f"{name} {w}x{h}", "value": round(mpix / ms * 1e3, 1), "unit": "MPix/s",
                     "baseline": baseline,
                     "baseline_value": round(mpix / base * 1e3, 1) if base else None,
                     "ratio": round(ms / base, 3) if base else None})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="800x600, 10 repeats")
    args = ap.parse_args()
    for r in run(args.quick):
        print(json.dumps(r))


if __name__ == "__main__":
    main()
