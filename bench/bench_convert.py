"""Pixel conversion throughput against a memcpy baseline measured in the same run.

    uv run python bench/bench_convert.py [--repeat N]

For each size and conversion it prints MPix/s for convert_rect (allocating a
new result, and writing into a preallocated `out=`), the MPix/s of a numpy
copy of the same source bytes (the floor any conversion is measured against;
pixman is used as a second baseline only if a Python binding is importable),
and the ratio conversion / memcpy.
"""
from __future__ import annotations

import argparse
import importlib.util
import time

import numpy as np

from pyxenfb.convert import GUEST_32, PixelFormat, convert_rect

TARGETS = {
    "copy (32->32 match)": GUEST_32,
    "32->16 (565)": PixelFormat(16, 16, False, 31, 63, 31, 11, 5, 0),
    "32->8 (BGR233)": PixelFormat(8, 8, False, 7, 7, 3, 0, 3, 6),
    "32->32 swapped (RGBX)": PixelFormat(32, 24, False, 255, 255, 255, 0, 8, 16),
}
SIZES = [(800, 600), (1920, 1080)]


def best_of(fn, repeat: int) -> float:
    """Best wall time of `repeat` runs (the least disturbed by the machine)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args()
    have_pixman = importlib.util.find_spec("pixman") is not None
    print(f"numpy {np.__version__}; pixman binding: {'yes' if have_pixman else 'not importable, memcpy baseline only'}")
    print(f"{'size':>10} {'conversion':24} {'MPix/s':>9} {'out= MPix/s':>12} {'memcpy MPix/s':>14} {'ratio':>6}")
    rng = np.random.default_rng(1)
    for w, h in SIZES:
        src = rng.integers(0, 256, (h, w * 4), dtype=np.uint8)
        mpix = w * h / 1e6
        memcpy = mpix / best_of(lambda: src.copy(), args.repeat)
        for name, dst in TARGETS.items():
            out = np.empty((h, w * dst.bytes_per_pixel), np.uint8)
            alloc = mpix / best_of(lambda: convert_rect(src, GUEST_32, dst, 0, 0, w, h), args.repeat)
            into = mpix / best_of(lambda: convert_rect(src, GUEST_32, dst, 0, 0, w, h, out=out), args.repeat)
            print(f"{w:>5}x{h:<4} {name:24} {alloc:9.0f} {into:12.0f} {memcpy:14.0f} {alloc / memcpy:6.2f}")


if __name__ == "__main__":
    main()
