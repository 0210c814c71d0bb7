"""VNC encoder throughput against baselines measured in the same run.

    uv run python bench/bench_vnc.py [--repeat N]

For a full 800x600 frame of the reference guest's picture and for the
animation's dirty rectangle (about 55x53), it prints per encoding: time per
rectangle, MPix/s, output bytes, and two ratios against baselines taken on
the very same bytes in the same run:
  - memcpy: a numpy copy of the raw pixels (what Raw costs at least);
  - zlib-1: zlib.compress(raw, 1) (a plain general-purpose compressor).
The encoders run on the event loop, so time per full frame bounds how many
clients a device model can refresh at once.
"""
from __future__ import annotations

import argparse
import zlib

import numpy as np

from bench_convert import best_of   # same timing rule for every bench
from pyxenfb.convert import GUEST_32
from pyxenfb.rfb import encodings as enc
from pyxenfb.sim.picture import BOX, box_colour, test_picture

ENCODINGS = {"Raw": enc.RAW, "RRE": enc.RRE, "Hextile": enc.HEXTILE, "Zlib": enc.ZLIB,
             "ZRLE": enc.ZRLE, "Tight": enc.TIGHT, "TightPNG": enc.TIGHT_PNG}


def frames():
    pic = test_picture(800, 600)
    full = pic.astype("<u4").view(np.uint8).reshape(600, 800 * 4)
    anim = pic.copy()
    anim[100:100 + BOX, 200:200 + BOX] = box_colour(5)
    rect = anim[95:95 + BOX + 7, 195:195 + BOX + 7]
    small = np.ascontiguousarray(rect.astype("<u4").view(np.uint8).reshape(rect.shape[0], -1))
    return {"full 800x600": (full, 800, 600), "dirty 55x55": (small, rect.shape[1], rect.shape[0])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    print(f"{'rectangle':<14} {'encoding':<9} {'ms/rect':>9} {'MPix/s':>8} {'bytes':>9} "
          f"{'x memcpy':>9} {'x zlib-1':>9}")
    for label, (pixels, w, h) in frames().items():
        raw = pixels.tobytes()
        t_copy = best_of(lambda: np.copy(pixels), args.repeat)
        t_zlib = best_of(lambda: zlib.compress(raw, 1), args.repeat)
        print(f"{label:<14} {'(memcpy)':<9} {t_copy * 1e3:9.3f} {w * h / t_copy / 1e6:8.1f} "
              f"{len(raw):9d}")
        print(f"{label:<14} {'(zlib-1)':<9} {t_zlib * 1e3:9.3f} {w * h / t_zlib / 1e6:8.1f} "
              f"{len(zlib.compress(raw, 1)):9d}")
        for name, code in ENCODINGS.items():
            encoder = enc.Encoder()
            out = encoder.encode(code, GUEST_32, pixels, 0, 0, w, h)[1]
            t = best_of(lambda: enc.Encoder().encode(code, GUEST_32, pixels, 0, 0, w, h),
                        args.repeat)
            print(f"{label:<14} {name:<9} {t * 1e3:9.3f} {w * h / t / 1e6:8.1f} {len(out):9d} "
                  f"{t / t_copy:9.1f} {t / t_zlib:9.2f}")


if __name__ == "__main__":
    main()
