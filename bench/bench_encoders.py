"""Offline encoder efficiency: compression ratio and CPU per frame, before vs after.

    uv run python bench/bench_encoders.py [--size WxH ...] [--frames N]
                                          [--content xanim,text,desktop]
                                          [--before-tree DIR] [--encodings Tight,...]

Each content's frames (xanim: the 24 frames of the x11vnc/Xvnc anchors'
gradient, pyxenfb.sim.picture.xanim_frames; text: a scrolling text console
drawn with an 8x16 bitmap font in four colours; desktop: a desktop-like
picture with panels, windows, icons and a small change per frame) are
encoded as full-screen rectangles, 32 bpp depth 24 little-endian, one
Encoder per encoding (so the zlib streams persist as on a connection).

Printed per content, size and encoding: compression = raw bytes / encoded
bytes, and ms per frame (process CPU time: the encoders' own cost, not
the wall clock of a shared host).  --before-tree DIR also encodes the same
frames with the encodings module of another checkout (e.g. /work/main) in
the same run, interleaved frame by frame (taking turns at going first), and prints the after/before
ratios: trust those, not the absolute milliseconds.

`run(quick)` is the same for `python -m bench` (group "encoders"): all three contents at
800x600 (and 1920x1080 unless quick), before = $BENCH_ENCODERS_BEFORE if set.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pyxenfb.rfb import encodings as enc          # noqa: E402
from pyxenfb.sim.picture import xanim_frames      # noqa: E402
from pyxenfb.util.pixelformat import PixelFormat  # noqa: E402

FMT = PixelFormat(bpp=32, depth=24, big_endian=False, red_max=255, green_max=255,
                  blue_max=255, red_shift=16, green_shift=8, blue_shift=0)
ENCODINGS = {"Raw": enc.RAW, "RRE": enc.RRE, "Hextile": enc.HEXTILE, "Zlib": enc.ZLIB,
             "ZRLE": enc.ZRLE, "Tight": enc.TIGHT}


def load_encodings(tree: str):
    """The encodings module of another checkout, imported beside ours (it
    shares our unchanged pyxenfb.util / pyxenfb.rfb.states)."""
    path = Path(tree) / "pyxenfb" / "rfb" / "encodings.py"
    spec = importlib.util.spec_from_file_location("pyxenfb.rfb._encodings_before", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---- contents --------------------------------------------------------------------------
def _font(seed: int = 7) -> np.ndarray:
    """96 glyphs of 8x16 pixels: random strokes on a stable seed (a console
    font's statistics: thin strokes, lots of background)."""
    rng = np.random.default_rng(seed)
    glyphs = np.zeros((96, 16, 8), bool)
    for g in range(1, 96):
        for _ in range(rng.integers(3, 7)):
            if rng.random() < 0.5:
                y, x0, x1 = rng.integers(3, 14), rng.integers(0, 4), rng.integers(4, 8)
                glyphs[g, y, x0:x1] = True
            else:
                x, y0, y1 = rng.integers(1, 7), rng.integers(3, 8), rng.integers(8, 14)
                glyphs[g, y0:y1, x] = True
    return glyphs


def text_frames(width: int, height: int, n: int) -> np.ndarray:
    """A Linux text console scrolling one line per frame: grey text on black,
    some bold white and coloured words, a cursor."""
    rng = np.random.default_rng(3)
    font = _font()
    cols, rows = width // 8, height // 16
    colours = np.array([0xAAAAAA, 0xFFFFFF, 0x55FF55, 0x5555FF], np.uint32)
    lines = []
    for _ in range(rows + n):
        length = int(rng.integers(0, cols))
        chars = rng.integers(1, 96, length)
        chars[rng.random(length) < 0.15] = 0                       # spaces
        col = rng.choice(4, length, p=[0.85, 0.07, 0.05, 0.03])
        lines.append((chars, col))
    out = np.zeros((n, height, width), np.uint32)
    for f in range(n):
        for r in range(rows):
            chars, col = lines[f + r]
            for c, (ch, k) in enumerate(zip(chars.tolist(), col.tolist())):
                cell = out[f, r * 16:(r + 1) * 16, c * 8:(c + 1) * 8]
                cell[font[ch]] = colours[k]
        out[f, (rows - 1) * 16 + 14:(rows - 1) * 16 + 16, 0:8] = 0xAAAAAA   # cursor
    return out


def desktop_frames(width: int, height: int, n: int) -> np.ndarray:
    """A desktop: a vertical-gradient wallpaper, a panel, icons, two windows
    (a title bar gradient, text, a photo-like area), a clock that changes."""
    rng = np.random.default_rng(5)
    y = np.arange(height, dtype=np.uint32)[:, None]
    base = np.empty((height, width), np.uint32)
    base[:] = (0x20 + y * 0x40 // height) << 8 | (0x60 + y * 0x60 // height)
    base[:24] = 0x303030                                            # panel
    for i in range(6):                                              # icons
        icon = rng.integers(0, 1 << 24, (4, 4)).astype(np.uint32)
        base[60 + i * 70:108 + i * 70, 20:68] = np.kron(icon, np.ones((12, 12), np.uint32))
    font = _font()
    for wx, wy, ww, wh in ((120, 60, width // 2, height // 2), (width // 3, height // 3, width // 2, height // 2)):
        wx, wy = min(wx, width - ww), min(wy, height - wh)
        base[wy:wy + wh, wx:wx + ww] = 0xF0F0F0
        t = np.arange(ww, dtype=np.uint32)
        base[wy:wy + 22, wx:wx + ww] = (0x30 + t * 0x60 // ww) << 16 | 0x5080C0 & 0xFFFF
        for r in range(2, (wh - 30) // 16):
            for c in range(1, min(60, ww // 8 - 1)):
                if rng.random() < 0.7:
                    cell = base[wy + 20 + r * 16:wy + 36 + r * 16, wx + c * 8:wx + c * 8 + 8]
                    cell[font[rng.integers(1, 96)]] = 0x202020
    ph = base[height // 3 + 40:height // 3 + 40 + height // 5, width // 3 + 20:width // 3 + 20 + width // 5]
    yy, xx = np.mgrid[:ph.shape[0], :ph.shape[1]]
    noise = rng.integers(0, 24, ph.shape)
    ph[:] = (((xx * 3 + noise) & 255) << 16 | ((yy * 2 + noise) & 255) << 8 | ((xx + yy) & 255)).astype(np.uint32)
    out = np.repeat(base[None], n, axis=0)
    for f in range(n):                                             # the clock and a moving pointer
        out[f, 4:20, width - 60:width - 12] = 0x303030
        for c in range(6):
            out[f, 4:20, width - 60 + c * 8:width - 52 + c * 8][font[(f * 7 + c * 13) % 95 + 1]] = 0xFFFFFF
        px, py = (37 * f) % (width - 16), (23 * f) % (height - 16)
        out[f, py:py + 12, px:px + 8] = 0xFFFFFF
    return out


CONTENTS = {"xanim": lambda w, h, n: xanim_frames(w, h, n), "text": text_frames, "desktop": desktop_frames}


# ---- measuring --------------------------------------------------------------------------
def measure(frames: np.ndarray, encoding: int, modules: list) -> list[dict]:
    """Every frame encoded by each module's Encoder, interleaved frame by
    frame; per module: raw and wire bytes, CPU seconds."""
    n, h, w = frames.shape
    encoders = [m.Encoder() for m in modules]
    stats = [{"raw": 0, "wire": 0, "cpu": 0.0} for _ in modules]
    for f in range(n):
        pixels = np.ascontiguousarray(frames[f]).view(np.uint8).reshape(h, w * 4)
        turn = list(zip(modules, encoders, stats))
        # Who goes first finds the frame's pixels cold in the cache: take turns.
        for m, e, s in (turn if f % 2 == 0 else turn[::-1]):
            t0 = time.process_time()
            _, chunks = e.encode_chunks(encoding, FMT, pixels, 0, 0, w, h)
            s["cpu"] += time.process_time() - t0
            s["wire"] += sum(map(len, chunks))
            s["raw"] += 12 + 4 + w * h * 4
    for s in stats:
        s["ratio"] = s["raw"] / s["wire"]
        s["ms"] = 1000 * s["cpu"] / n
    return stats


def run(quick: bool = False, sizes=None, contents=tuple(CONTENTS), encodings=None, frames: int = 24,
        before_tree: str | None = None) -> list[dict]:
    before_tree = before_tree or os.environ.get("BENCH_ENCODERS_BEFORE")
    modules = [enc] + ([load_encodings(before_tree)] if before_tree else [])
    sizes = sizes or ([(800, 600)] if quick else [(800, 600), (1920, 1080)])
    rows = []
    for content in contents:
        for w, h in sizes:
            data = CONTENTS[content](w, h, frames)
            for name in encodings or ENCODINGS:
                stats = measure(data, ENCODINGS[name], modules)
                now = stats[0]
                row = {"name": f"encoders.{content}.{w}x{h}.{name}", "value": round(now["ms"], 3),
                       "unit": "ms/frame (CPU)", "compression": round(now["ratio"], 3),
                       "bytes_per_frame": now["wire"] // frames, "baseline": None,
                       "baseline_value": None, "ratio": None}
                if len(stats) > 1:
                    old = stats[1]
                    row.update(baseline="before-tree", baseline_value=round(old["ms"], 3),
                               ratio=round(now["ms"] / old["ms"], 3) if old["ms"] else None,
                               baseline_compression=round(old["ratio"], 3),
                               compression_gain=round(now["ratio"] / old["ratio"], 3))
                rows.append(row)
                line = f"{content:8} {w}x{h} {name:8} compression {now['ratio']:7.2f}  {now['ms']:8.2f} ms/frame"
                if len(stats) > 1:
                    line += (f"   before {old['ratio']:7.2f} {old['ms']:8.2f} ms   "
                             f"after/before: compression x{now['ratio'] / old['ratio']:.2f}, "
                             f"CPU x{now['ms'] / old['ms']:.2f}" if old["ms"] else "")
                print(line, flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", action="append", help="WxH (repeatable; default 800x600)")
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--content", default="xanim", help="comma-separated: " + ",".join(CONTENTS))
    ap.add_argument("--encodings", help="comma-separated: " + ",".join(ENCODINGS))
    ap.add_argument("--before-tree", help="a checkout whose encoders to measure beside ours")
    args = ap.parse_args(argv)
    sizes = [tuple(map(int, s.lower().split("x"))) for s in (args.size or ["800x600"])]
    run(sizes=sizes, contents=args.content.split(","), frames=args.frames, before_tree=args.before_tree,
        encodings=args.encodings.split(",") if args.encodings else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
