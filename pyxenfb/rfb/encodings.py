"""RFB rectangle encoders: Raw, RRE, Hextile, Zlib, Tight, TightPNG, ZRLE.

Input is always a private, C-contiguous (h, w * bytes_per_pixel) uint8 array
already in the client's pixel format (`convert.convert_rect` makes it), so an
encoder never sees guest memory and never reads outside its rectangle.

Pixels are analysed as integers through a little-endian view of their bytes
(`_values`); writing such a value back with the same dtype reproduces the
client's byte order, so no encoder cares about endianness.

One `Encoder` per client: it owns that client's zlib streams (Zlib, ZRLE and
Tight's four), which RFB requires to persist for the whole connection.

The per-tile and per-pixel loops (Hextile, ZRLE's tiles, Tight's palette and
gradient filter) run in a C kernel (`enc_kernel`) when it is built; each has
a numpy twin here (`hextile_plan`, `zrle_plan`, `_few_colours` +
searchsorted, `gradient24_plan`) giving the same bytes, used without it.
"""
from __future__ import annotations

import io
import struct
# zlib-ng: the same deflate streams as zlib (any client's inflater reads
# them), made 2-3x faster with SIMD; python-zlib-ng mirrors zlib's API.
from zlib_ng import zlib_ng as zlib

import numpy as np

from ..util.pixelformat import PixelFormat
from . import enc_kernel

# The encoding numbers live in states.py (the client shares them); re-exported.
from .states import (COMPRESS_LEVEL_MAX, COMPRESS_LEVEL_MIN, CONTINUOUS_UPDATES, COPYRECT,  # noqa: F401
                     DESKTOP_SIZE, EXT_DESKTOP_SIZE, FENCE, HEXTILE, JPEG_QUALITY_MAX, JPEG_QUALITY_MIN,
                     POINTER_TYPE_CHANGE, QEMU_EXT_KEY, QEMU_LED_STATE, RAW, RRE, TIGHT, TIGHT_PNG,
                     ZLIB, ZRLE)

SUPPORTED = (RAW, RRE, HEXTILE, ZLIB, TIGHT, ZRLE, TIGHT_PNG)
NAMES = {RAW: "Raw", RRE: "RRE", HEXTILE: "Hextile", ZLIB: "Zlib", TIGHT: "Tight",
         ZRLE: "ZRLE", TIGHT_PNG: "TightPNG"}

_DTYPES = {1: np.dtype("<u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4")}
_JPEG_QUALITY = (10, 20, 30, 40, 50, 60, 70, 80, 88, 95)  # per client level 0..9
TIGHT_MAX_WIDTH = 2048
TIGHT_MAX_AREA = 65536
TIGHT_MIN_TO_COMPRESS = 12
# A big rectangle is sent as bands of this many pixels at most (whole
# 64-row bands: ZRLE's and Hextile's tile grids stay where they were), so
# that a server can write the first while it encodes the next: on a slow
# link the transfer then overlaps the encoding instead of following it
# (TigerVNC cuts every encoding's rectangles at 65536 pixels too).
BAND_PIXELS = 65536
BAND_ROWS_MULTIPLE = 64


def rect_header(x: int, y: int, w: int, h: int, encoding: int) -> bytes:
    return struct.pack(">HHHHi", x, y, w, h, encoding)


def pieces(encoding: int, x: int, y: int, w: int, h: int) -> list[tuple[int, int, int, int]]:
    """The rectangles `encoding` sends for the w x h one at (x, y), each
    encoded as one: Tight's own limits (2048 wide, 65536 pixels), and for
    the others bands of whole 64-row multiples near BAND_PIXELS (Raw, sent
    as the snapshot's bytes, stays whole)."""
    if encoding in (TIGHT, TIGHT_PNG):
        out = []
        for cx in range(0, w, TIGHT_MAX_WIDTH):
            cw = min(TIGHT_MAX_WIDTH, w - cx)
            rows = max(1, TIGHT_MAX_AREA // cw)
            out += [(x + cx, y + cy, cw, min(rows, h - cy)) for cy in range(0, h, rows)]
        return out
    if encoding == RAW or w * h <= BAND_PIXELS:
        return [(x, y, w, h)]
    rows = max(BAND_ROWS_MULTIPLE, BAND_PIXELS // w // BAND_ROWS_MULTIPLE * BAND_ROWS_MULTIPLE)
    return [(x, y + by, w, min(rows, h - by)) for by in range(0, h, rows)]


def _contiguous(pixels: np.ndarray):
    """pixels' bytes without a copy where they are one C-contiguous block."""
    return memoryview(pixels).cast("B") if pixels.flags.c_contiguous else pixels.tobytes()


def _values(pixels: np.ndarray, fmt: PixelFormat, w: int, h: int) -> np.ndarray:
    """(h, w) integer view of the pixels (bytes unchanged)."""
    return pixels.reshape(h, w * fmt.bytes_per_pixel).view(_DTYPES[fmt.bytes_per_pixel]).reshape(h, w)


def _pixel_bytes(value, fmt: PixelFormat) -> bytes:
    return np.array([value], _DTYPES[fmt.bytes_per_pixel]).tobytes()


def _channels(vals: np.ndarray, fmt: PixelFormat) -> np.ndarray:
    """(h, w, 3) uint8 RGB scaled to 0..255 from pixel values."""
    out = []
    # The integer view reads bytes little-endian: undo that for big-endian pixels.
    v = (vals.byteswap() if fmt.big_endian and fmt.bpp > 8 else vals).astype(np.uint32)
    for shift, cmax in ((fmt.red_shift, fmt.red_max), (fmt.green_shift, fmt.green_max),
                        (fmt.blue_shift, fmt.blue_max)):
        c = (v >> np.uint32(shift)) & np.uint32(cmax)
        if cmax != 255:
            c = c * np.uint32(255) // np.uint32(cmax)
        out.append(c.astype(np.uint8))
    return np.stack(out, axis=-1)


def _row_runs(vals: np.ndarray):
    """Horizontal runs of equal pixels: (ys, xs, lengths, colours), row by row."""
    h, w = vals.shape
    change = np.ones((h, w), bool)
    change[:, 1:] = vals[:, 1:] != vals[:, :-1]
    starts = np.flatnonzero(change)
    ends = np.append(starts[1:], h * w)
    flat = vals.reshape(-1)
    return starts // w, starts % w, ends - starts, flat[starts]


# ---------------------------------------------------------------- Raw, RRE
def encode_raw(pixels: np.ndarray) -> bytes | memoryview:
    """The pixels' bytes: a view of them, not a copy, where they are one
    block (a snapshot's: the server sends it before the snapshot's buffer can
    be reused, rfb/updates.py's BufferPool)."""
    return _contiguous(pixels)


def encode_rre(vals: np.ndarray, fmt: PixelFormat, limit: int | None = None) -> bytes | None:
    """Background = most frequent colour; one subrectangle per run of another colour.

    None when the encoding would take more than `limit` bytes (the caller
    sends Raw instead: each subrectangle costs a pixel plus 8 bytes, so a
    picture of short runs, a gradient say, is several times Raw's size)."""
    colours, counts = np.unique(vals, return_counts=True)
    bg = colours[np.argmax(counts)]
    ys, xs, lengths, cols = _row_runs(vals)
    keep = cols != bg
    n = int(keep.sum())
    if limit is not None and 4 + (n + 1) * fmt.bytes_per_pixel + 8 * n > limit:
        return None
    sub = np.empty(n, dtype=[("pix", _DTYPES[fmt.bytes_per_pixel]), ("x", ">u2"), ("y", ">u2"),
                             ("w", ">u2"), ("h", ">u2")])
    sub["pix"], sub["x"], sub["y"] = cols[keep], xs[keep], ys[keep]
    sub["w"], sub["h"] = lengths[keep], 1
    return struct.pack(">I", n) + _pixel_bytes(bg, fmt) + sub.tobytes()


# ---------------------------------------------------------------- Hextile
_HT_RAW, _HT_BG, _HT_FG, _HT_ANY, _HT_COLOURED = 1, 2, 4, 8, 16


_TILE = 16


def _pad_edge(vals: np.ndarray, height: int, width: int) -> np.ndarray:
    """`vals` grown to height x width by repeating its last row and column:
    the padding adds no colour to a tile (np.pad's "edge", without its cost)."""
    h, w = vals.shape
    if (h, w) == (height, width):
        return vals
    out = np.empty((height, width), vals.dtype)
    out[:h, :w] = vals
    out[:h, w:] = vals[:, w - 1:]
    out[h:] = out[h - 1]
    return out


def _tiles(vals: np.ndarray, size: int):
    """(n, size, size) tile-major copy of vals (edge tiles padded by repeating
    their last row and column), with each tile's real height and width."""
    h, w = vals.shape
    rows_t, cols_t = -(-h // size), -(-w // size)
    padded = _pad_edge(vals, rows_t * size, cols_t * size)
    row_block = np.dtype((np.void, size * vals.itemsize))   # one tile row moves as a block
    tiles = (np.ascontiguousarray(padded).view(row_block).reshape(rows_t, size, cols_t)
             .swapaxes(1, 2).copy().view(vals.dtype).reshape(rows_t * cols_t, size, size))
    tile_h = np.minimum(size, h - np.arange(rows_t) * size).repeat(cols_t)
    tile_w = np.tile(np.minimum(size, w - np.arange(cols_t) * size), rows_t)
    return tiles, tile_h, tile_w


def _most_heads(tile_of: np.ndarray, value: np.ndarray, n: int, dtype) -> np.ndarray:
    """Per tile, the value with the most entries (ties: the smallest);
    every tile of 0..n-1 must have one."""
    order = np.lexsort((value, tile_of))
    t, v = tile_of[order], value[order]
    new = np.ones(len(t), bool)
    new[1:] = (t[1:] != t[:-1]) | (v[1:] != v[:-1])
    at = np.flatnonzero(new)
    count = np.diff(np.append(at, len(t)))
    gt, gv = t[at], v[at]                               # groups: tile, then value ascending
    pick = np.lexsort((np.arange(len(at)), -count, gt))
    first = pick[np.searchsorted(gt[pick], np.arange(n))]
    return gv[first].astype(dtype)


def _hextile_cover(tiles: np.ndarray, tile_h: np.ndarray, tile_w: np.ndarray):
    """The subrectangles of every tile at once (see hextile_plan), as arrays
    (tile, y, x, width, height, colour) in tile order, then raster order."""
    n = len(tiles)
    ar = np.arange(_TILE)
    # right[t, y, x]: pixels of (x, y)'s colour from x on in its row; down: in its column
    right = np.ones(tiles.shape, np.int16)
    for x in range(_TILE - 2, -1, -1):
        right[:, :, x] += np.where((tiles[:, :, x] == tiles[:, :, x + 1]) & (x + 1 < tile_w)[:, None],
                                   right[:, :, x + 1], 0)
    down = np.ones(tiles.shape, np.int16)
    for y in range(_TILE - 2, -1, -1):
        down[:, y] += np.where((tiles[:, y] == tiles[:, y + 1]) & (y + 1 < tile_h)[:, None],
                               down[:, y + 1], 0)
    until = np.zeros((n, _TILE), np.int16)       # rows above this are covered, per column
    found = []
    for y in range(int(tile_h.max(initial=0))):
        live = np.flatnonzero(tile_h > y)
        next_x = np.zeros(n, np.int16)
        for x in range(int(tile_w[live].max(initial=0))):
            at = live[(tile_w[live] > x) & (next_x[live] <= x) & (until[live, x] <= y)]
            if not len(at):
                continue
            sw = right[at, y, x]
            cols = ar[None, :_TILE - x] < sw[:, None]            # columns x .. x + sw - 1
            sh = np.where(cols, down[at, y, x:], _TILE).min(axis=1)
            until[at, x:] = np.where(cols, np.maximum(until[at, x:], y + sh[:, None]), until[at, x:])
            next_x[at] = x + sw
            found.append((at, np.full(len(at), y), np.full(len(at), x), sw, sh))
    t, y, x, sw, sh = (np.concatenate(a) for a in zip(*found)) if found else [np.zeros(0, int)] * 5
    order = np.argsort(t, kind="stable")                       # found row by row: raster order kept
    t, y, x, sw, sh = t[order], y[order], x[order], sw[order], sh[order]
    return t, y, x, sw, sh, tiles[t, y, x]


def hextile_plan(vals: np.ndarray, fmt: PixelFormat) -> bytes:
    """Hextile in numpy (the C kernel's twin; byte-identical output).

    Per 16x16 tile, subrectangles in raster order of their corners: at
    each pixel none covers yet, one as wide as the pixel's colour runs to
    the right in its row (covered pixels included) and as tall as all those
    columns keep that colour downwards.  They may overlap (a decoder paints
    them in order; same colour), which takes fewer than a partition on glyph
    strokes.  The background is the colour with the most of them (ties:
    the smallest value), whose subrectangles are then not sent.  If all
    subrectangles have one colour the tile is mono (foreground + 2 bytes a
    subrectangle), else SubrectsColoured (a pixel + 2 bytes each).  Raw only
    when smaller than that (counting background and foreground as sent).
    Carried between tiles: the background, not past a raw tile; the
    foreground from one mono tile to the next mono tile with only one-colour
    tiles between (a raw or coloured tile leaves it undefined in decoders).
    """
    h, w = vals.shape
    bpp = fmt.bytes_per_pixel
    dtype = _DTYPES[bpp]
    tiles, tile_h, tile_w = _tiles(vals, _TILE)
    n = len(tiles)
    first = tiles[:, 0, 0]
    solid = (tiles == first[:, None, None]).all(axis=(1, 2))   # padding repeats real pixels
    bg = first.copy()
    multi = np.flatnonzero(~solid)
    all_t, all_y, all_x, all_w, all_h, all_c = _hextile_cover(tiles[multi], tile_h[multi], tile_w[multi])
    all_t = multi[all_t]
    if len(multi):
        remap = np.full(n, -1)
        remap[multi] = np.arange(len(multi))
        bg[multi] = _most_heads(remap[all_t], all_c, len(multi), vals.dtype)
    keep = all_c != bg[all_t]
    sub_t, sub_y, sub_x, sub_w, sub_h, sub_c = (a[keep] for a in (all_t, all_y, all_x, all_w, all_h, all_c))
    k = np.bincount(sub_t, minlength=n)
    first_sub = np.concatenate(([0], np.cumsum(k)[:-1]))
    fg = np.zeros(n, vals.dtype)
    has = k > 0
    fg[has] = sub_c[first_sub[has]]
    mono = has & (np.bincount(sub_t, sub_c != fg[sub_t], minlength=n) == 0)
    coloured = has & ~mono

    raw_size = 1 + tile_h * tile_w * bpp
    bound = np.where(coloured, 2 + bpp + (bpp + 2) * k, np.where(mono, 2 + 2 * bpp + 2 * k, 1 + bpp))
    raw = raw_size < bound

    prev_raw = np.concatenate(([True], raw[:-1]))
    prev_bg = np.concatenate(([bg[0]], bg[:-1]))
    send_bg = ~raw & (prev_raw | (bg != prev_bg))
    # The foreground state a tile finds: that of the last tile with subrectangles or raw.
    marks = np.flatnonzero(raw | has)
    last = np.full(n, -1)
    last[marks[1:]] = marks[:-1]
    before = np.maximum(last, 0)
    carry_fg = mono & ~raw & (last >= 0) & mono[before] & ~raw[before] & (fg[before] == fg)
    # (raw | has) only: a raw tile is in `marks`, so it breaks the chain.
    send_fg = mono & ~raw & ~carry_fg
    sub_on = has & ~raw

    per_sub = np.where(coloured, bpp + 2, 2)
    size = np.where(raw, raw_size, 1 + send_bg * bpp + send_fg * bpp + sub_on * (1 + per_sub * k))
    offs = np.concatenate(([0], np.cumsum(size)[:-1]))
    out = np.zeros(int(size.sum()), np.uint8)
    out[offs] = np.where(raw, _HT_RAW, np.where(send_bg, _HT_BG, 0) | np.where(send_fg, _HT_FG, 0)
                         | np.where(sub_on, _HT_ANY, 0) | np.where(sub_on & coloured, _HT_COLOURED, 0))
    span = np.arange(bpp)
    sel = np.flatnonzero(send_bg)
    out[(offs[sel] + 1)[:, None] + span] = bg[sel].astype(dtype).view(np.uint8).reshape(-1, bpp)
    fg_at = offs + 1 + send_bg * bpp
    sel = np.flatnonzero(send_fg)
    out[fg_at[sel][:, None] + span] = fg[sel].astype(dtype).view(np.uint8).reshape(-1, bpp)
    count_at = fg_at + send_fg * bpp
    sel = np.flatnonzero(sub_on)
    out[count_at[sel]] = k[sel]
    rank = np.arange(len(sub_t)) - first_sub[sub_t]
    keep = sub_on[sub_t]
    sub_t, sub_y, sub_x, sub_w, sub_h, sub_c, rank = (a[keep] for a in (sub_t, sub_y, sub_x, sub_w, sub_h,
                                                                          sub_c, rank))
    if len(sub_t):
        at = count_at[sub_t] + 1 + rank * per_sub[sub_t]
        col = coloured[sub_t]
        ci = np.flatnonzero(col)
        out[at[ci][:, None] + span] = sub_c[ci].astype(dtype).view(np.uint8).reshape(-1, bpp)
        at = at + col * bpp
        out[at] = (sub_x << 4 | sub_y).astype(np.uint8)
        out[at + 1] = ((sub_w - 1) << 4 | (sub_h - 1)).astype(np.uint8)
    sel = np.flatnonzero(raw)
    full = sel[(tile_h[sel] == _TILE) & (tile_w[sel] == _TILE)]
    if len(full):
        out[(offs[full] + 1)[:, None] + np.arange(_TILE * _TILE * bpp)] = \
            tiles[full].astype(dtype).view(np.uint8).reshape(len(full), -1)
    for t in np.setdiff1d(sel, full).tolist():      # raw edge tiles: their real pixels only
        th, tw = int(tile_h[t]), int(tile_w[t])
        out[offs[t] + 1:offs[t] + raw_size[t]] = tiles[t, :th, :tw].astype(dtype).view(np.uint8).reshape(-1)
    return out.tobytes()


def encode_hextile(vals: np.ndarray, fmt: PixelFormat) -> bytes | memoryview:
    """Hextile: the C kernel when it is built (its bytes as a memoryview),
    else its numpy twin."""
    if enc_kernel.load() is None:
        return hextile_plan(vals, fmt)
    h, w = vals.shape
    bpp = fmt.bytes_per_pixel
    return enc_kernel.hextile(np.ascontiguousarray(vals).view(np.uint8).reshape(h, w * bpp), w, h, bpp)


# ---------------------------------------------------------------- ZRLE
def _cpixel_bytes(fmt: PixelFormat):
    """Byte indices (within one PIXEL) that make a CPIXEL, or None for all."""
    if fmt.bpp != 32 or fmt.depth > 24:
        return None
    top = max(m << s for m, s in ((fmt.red_max, fmt.red_shift), (fmt.green_max, fmt.green_shift),
                                  (fmt.blue_max, fmt.blue_shift)))
    low = min(fmt.red_shift, fmt.green_shift, fmt.blue_shift)
    if top < 1 << 24:            # colour fits in the least significant 3 bytes
        return [1, 2, 3] if fmt.big_endian else [0, 1, 2]
    if low >= 8:                 # ... or in the most significant 3 bytes
        return [0, 1, 2] if fmt.big_endian else [1, 2, 3]
    return None


def _cpixels(vals: np.ndarray, fmt: PixelFormat, sel) -> bytes:
    raw = np.ascontiguousarray(vals).view(np.uint8).reshape(-1, fmt.bytes_per_pixel)
    return (raw[:, sel] if sel is not None else raw).tobytes()


def _pack_indices(idx: np.ndarray, bits: int) -> bytes:
    """Palette indices, `bits` each, MSB = leftmost, every row byte-aligned."""
    h, w = idx.shape
    per_byte = 8 // bits
    pad = (-w) % per_byte
    if pad:
        idx = np.pad(idx, ((0, 0), (0, pad)))
    groups = idx.astype(np.uint8).reshape(h, -1, per_byte)
    shifts = np.arange(per_byte - 1, -1, -1, dtype=np.uint8) * bits
    return (groups << shifts).sum(axis=2, dtype=np.uint8).tobytes()


def _len_bytes(runs: np.ndarray) -> np.ndarray:
    """Bytes of ZRLE's run lengths: run - 1 as 255, 255, ..., rest."""
    return (runs - 1) // 255 + 1


def _run_lengths(runs: np.ndarray) -> np.ndarray:
    """The length bytes of every run, run after run."""
    n = _len_bytes(runs)
    out = np.full(int(n.sum()), 255, np.uint8)
    out[np.cumsum(n) - 1] = (runs - 1) % 255
    return out


def _interleave(heads: list[np.ndarray], tails: np.ndarray, tail_len: np.ndarray) -> bytes:
    """Per run: its head bytes (a fixed-size row of heads) then its length
    bytes (tail_len of them, taken in order from tails)."""
    head = np.stack(heads, axis=1) if len(heads) > 1 else heads[0].reshape(-1, 1)
    hw = head.shape[1]
    size = hw + tail_len
    start = np.concatenate(([0], np.cumsum(size)[:-1]))
    out = np.empty(int(size.sum()), np.uint8)
    out[(start[:, None] + np.arange(hw)).reshape(-1)] = head.reshape(-1)
    tail_at = np.repeat(start + hw - np.concatenate(([0], np.cumsum(tail_len)[:-1])), tail_len)
    out[tail_at + np.arange(len(tails))] = tails
    return out.tobytes()


# A run-length form replaces the plain one (packed palette, else raw) only
# when it is this many times smaller: deflate compresses the plain forms
# better (rows repeat, shifted, at a fixed distance; run lengths break that
# up), so RLE pays only on big flat areas, where it also saves deflate's time.
# Measured on the xanim gradient, a text console and a desktop picture
# (bench/bench_encoders.py): choosing by uncompressed size, as TigerVNC does,
# gave 0.66x the ratio on the gradient and 0.9x on text after zlib-ng.
_RLE_GAIN = 8


def zrle_plan(vals: np.ndarray, fmt: PixelFormat) -> bytes:
    """The uncompressed ZRLE tile stream (the C kernel's numpy twin, the same
    bytes; slower: a loop over tiles).

    Per 64x64 tile: solid for one colour; else the plain form (packed
    palette for 2-16 colours, else or if smaller raw) unless plain RLE or palette RLE
    (2-127 colours) is _RLE_GAIN times smaller (the smaller of the two RLE
    forms, palette RLE on a tie).  Runs follow the tile's raster order
    across rows; palettes list colours in order of first appearance.
    """
    sel = _cpixel_bytes(fmt)
    bpp = fmt.bytes_per_pixel
    coff, cb = (sel[0], 3) if sel is not None else (0, bpp)
    h, w = vals.shape
    raw8 = np.ascontiguousarray(vals).view(np.uint8).reshape(h, w, bpp)[:, :, coff:coff + cb]
    pieces: list = []
    for ty in range(0, h, 64):
        for tx in range(0, w, 64):
            t = vals[ty:ty + 64, tx:tx + 64]
            th, tw = t.shape
            n = th * tw
            f = t.reshape(-1)
            cp = raw8[ty:ty + 64, tx:tx + 64].reshape(n, cb)
            starts = np.flatnonzero(np.concatenate(([True], f[1:] != f[:-1])))
            runs = np.diff(np.append(starts, n))
            distinct, first, inverse = np.unique(f, return_index=True, return_inverse=True)
            k = len(distinct)
            order = np.argsort(first)                    # colours by first appearance
            rank = np.empty(k, np.int64)
            rank[order] = np.arange(k)
            index = rank[inverse.reshape(-1)]
            palette = cp[first[order]]
            lb = _len_bytes(runs)
            bits = 1 if k <= 2 else 2 if k <= 4 else 4
            # the plain form: packed palette unless raw is smaller (tiny tiles)
            best, kind = 1 + n * cb, 0
            if k <= 16 and 1 + k * cb + th * ((tw * bits + 7) // 8) <= best:
                best, kind = 1 + k * cb + th * ((tw * bits + 7) // 8), 2
            rle = [(1 + len(runs) * cb + int(lb.sum()), 128)]
            if k <= 127:
                rle.append((1 + k * cb + len(runs) + int(lb[runs > 1].sum()), 130))
            for size, kd in rle:
                if size * _RLE_GAIN <= best:
                    best, kind = size * _RLE_GAIN, kd
            if k == 1:
                pieces += [b"\x01", cp[0].tobytes()]
            elif kind == 0:
                pieces += [b"\x00", cp.tobytes()]
            elif kind == 128:
                pieces += [b"\x80", _interleave([cp[starts, i] for i in range(cb)],
                                                 _run_lengths(runs), lb)]
            elif kind == 2:
                pieces += [bytes([k]), palette.tobytes(), _pack_indices(index.reshape(th, tw), bits)]
            else:
                long = runs > 1
                tails = _run_lengths(runs[long])
                pieces += [bytes([128 + k]), palette.tobytes(),
                           _interleave([(index[starts] | (long << 7)).astype(np.uint8)], tails,
                                       np.where(long, lb, 0))]
    return b"".join(pieces)


def zrle_tiles(vals: np.ndarray, fmt: PixelFormat, scratch: bytearray | None = None):
    """The uncompressed ZRLE tile stream: the C kernel when it is built,
    else its numpy twin.  With scratch (the C kernel only), a memoryview
    of it, valid until scratch is used again (enc_kernel.zrle_tiles)."""
    if enc_kernel.load() is None:
        return zrle_plan(vals, fmt)
    sel = _cpixel_bytes(fmt)
    bpp = fmt.bytes_per_pixel
    coff, cb = (sel[0], 3) if sel is not None else (0, bpp)
    h, w = vals.shape
    return enc_kernel.zrle_tiles(np.ascontiguousarray(vals).view(np.uint8).reshape(h, w * bpp),
                                 w, h, bpp, coff, cb, scratch)


# ---------------------------------------------------------------- Tight
def compact_length(n: int) -> bytes:
    out = bytearray([n & 0x7F])
    if n > 0x7F:
        out[0] |= 0x80
        out.append((n >> 7) & 0x7F)
        if n > 0x3FFF:
            out[1] |= 0x80
            out.append((n >> 14) & 0xFF)
    return bytes(out)


def tight_pixel24(fmt: PixelFormat) -> bool:
    """Tight's TPIXEL is 3 bytes R,G,B for 32bpp depth 24 8-bit-channel formats."""
    return (fmt.bpp == 32 and fmt.depth == 24 and fmt.red_max == fmt.green_max == fmt.blue_max == 255
            and all(s % 8 == 0 for s in (fmt.red_shift, fmt.green_shift, fmt.blue_shift)))


def _tpixels(vals: np.ndarray, fmt: PixelFormat, scratch: np.ndarray | None = None):
    """Tight's pixel bytes for vals: a memoryview into scratch (a reused
    uint8 buffer large enough) when one is given, else bytes."""
    if tight_pixel24(fmt):
        # Each channel is one whole byte of the pixel: copy the three bytes
        # (three strided copies beat a fancy-index gather or shifting ~2x).
        raw = np.ascontiguousarray(vals).view(np.uint8).reshape(vals.shape + (4,))
        n = vals.size * 3
        out = (np.empty(vals.shape + (3,), np.uint8) if scratch is None
               else scratch[:n].reshape(vals.shape + (3,)))
        for i, shift in enumerate((fmt.red_shift, fmt.green_shift, fmt.blue_shift)):
            out[..., i] = raw[..., 3 - shift // 8 if fmt.big_endian else shift // 8]
        return out.tobytes() if scratch is None else memoryview(scratch[:n])
    return np.ascontiguousarray(vals).tobytes() if scratch is None else memoryview(
        np.ascontiguousarray(vals)).cast("B")


def _gradient24(rgb: np.ndarray) -> bytes:
    """Tight's gradient filter for 3-byte TPIXELs: the C kernel when it is
    built, else its numpy twin."""
    if enc_kernel.load() is None or rgb.size == 0:
        return gradient24_plan(rgb)
    return enc_kernel.gradient24(rgb)


def gradient24_plan(rgb: np.ndarray) -> bytes:
    """Tight's gradient filter for 3-byte TPIXELs in numpy: each component
    minus the prediction clamp(left + up - upleft, 0, 255), mod 256;
    neighbours outside the rectangle count as 0."""
    v = rgb.astype(np.int16)
    pred = np.zeros_like(v)
    pred[:, 1:] += v[:, :-1]
    pred[1:] += v[:-1]
    pred[1:, 1:] -= v[:-1, :-1]
    np.clip(pred, 0, 255, out=pred)
    v -= pred
    return v.astype(np.uint8).tobytes()


def _few_colours(vals: np.ndarray, limit: int):
    """The sorted distinct pixel values if there are at most `limit`, else None.

    A strided sample is tried first: if it alone has more than `limit`
    colours, so has the rectangle, and the full sort is skipped (the usual
    case for photo-like or gradient content)."""
    flat = vals.reshape(-1)
    if flat.size > 4 * 1024:
        sample = np.sort(flat[::max(1, flat.size // 2048)])
        if 1 + np.count_nonzero(sample[1:] != sample[:-1]) > limit:
            return None
    s = np.sort(flat)
    distinct = s[np.concatenate(([True], s[1:] != s[:-1]))]
    return distinct if len(distinct) <= limit else None


def _palette(vals: np.ndarray, limit: int):
    """(the sorted distinct values, each pixel's index in them or None
    still to find) if there are at most `limit`, else (None, None): by the
    C kernel (one hashing pass, stopping at limit + 1 colours) when it is
    built, else by sorting."""
    if enc_kernel.load() is not None and vals.size:
        found = enc_kernel.palette(vals, limit)
        return found if found is not None else (None, None)
    return _few_colours(vals, limit), None


def _image_bytes(vals: np.ndarray, fmt: PixelFormat, kind: str, quality: int = 0) -> bytes:
    from PIL import Image
    img = Image.fromarray(_channels(vals, fmt), "RGB")
    buf = io.BytesIO()
    if kind == "JPEG":
        # Full chroma resolution at the high levels: text stays legible.
        img.save(buf, "JPEG", quality=_JPEG_QUALITY[quality], subsampling=0 if quality >= 7 else 2)
    else:
        img.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


# Default zlib levels when the client sends no CompressLevel: what
# libvncserver 0.9.14 uses (Zlib: zlibCompressLevel 5; ZRLE: deflateInit's
# default, 6; lossless Tight: its default level 6 is clamped to Tight level 1).
_DEFAULT_LEVEL = {ZLIB: 5, ZRLE: 6}
# A Tight client that names no CompressLevel gets TigerVNC's default, 2
# (zlib 3 for mono and indexed rects: text compresses 1.9x better than at
# libvncserver's 1, for little CPU; QEMU's default is 9).
_TIGHT_DEFAULT = 2
# Tight client level -> zlib level for the (mono, indexed, full-colour)
# streams: the TightVNC family's progression (QEMU uses the same one);
# full-colour data gains least from effort, so it gets the lower levels.
_TIGHT_ZLIB = ((0, 0, 0), (1, 1, 1), (3, 3, 2), (5, 5, 2), (6, 6, 3), (7, 7, 4), (7, 7, 5),
               (8, 8, 6), (9, 9, 7), (9, 9, 9))
_TIGHT_STREAM_KIND = (2, 0, 1, 2)   # stream 0 full colour, 1 mono, 2 indexed (3 unused)
_WINDOW = 32768                     # deflate's window: all a continuation can refer to
_MEM_LEVEL = 9                      # bigger hash table: ~15% faster here, same output size
# ZRLE's stream: memLevel also sizes deflate's symbol buffer, i.e. how many
# literals and matches go into one block before zlib-ng ends it and builds
# new Huffman codes (1 << (memLevel + 6)).  ZRLE's tile stream changes its
# statistics every few KiB (a raw tile of 3-byte CPIXELs is 12 KiB, a
# packed-palette tile a few hundred bytes), so smaller blocks fit their
# codes to it better: on the xanim gradient (bench/bench_encoders.py) memLevel
# 9 / 6 / 5 / 4 gave compression 7.93 / 8.74 / 9.03 / 9.19 at 800x600 and
# 9.30 / 10.33 / 10.66 / 10.83 at 1080p (TigerVNC's Xvnc, zlib 1.2 at level
# 6: 8.49 / 9.75), for 1 / ~1.08 / ~1.13 / ~1.21x deflate's time; text
# 153.9 / 153.2 / 152.8 / 152.1 (Xvnc 124), the desktop's small rects
# unchanged.  5 meets Xvnc's bytes with room, for the least time.
_ZRLE_MEM_LEVEL = 5


class _Stream:
    """One persistent deflate stream of a client connection.

    The client keeps one inflater per stream for the whole connection, so a
    new compression level cannot start a new zlib stream (Python's zlib has
    no deflateParams, nor has zlib-ng's binding).  Instead the stream continues with a fresh raw-deflate
    compressor: after Z_SYNC_FLUSH the output is byte-aligned at a block
    boundary, and blocks from a raw compressor are valid continuation blocks
    of the same stream (the adler32 trailer never comes: VNC streams never
    end).  It is primed with the last 32 KiB of input, which the client's
    inflater has in its window, so references back into it stay valid and
    the ratio does not drop.  Tight resets a stream instead (its control
    byte can), so its streams keep no tail (continues=False).

    partial=True ends each rectangle's data with Z_PARTIAL_FLUSH instead of
    Z_SYNC_FLUSH: the inflater can still produce every byte of it (zlib ends
    the block and adds an empty fixed-code block of 10 bits), but there is no
    empty stored block (3 bits, padding, 00 00 ff ff), so up to 7 bits of the
    flush are carried into the next rectangle's data instead.  ~4 bytes less
    per rectangle: what a small update (a cursor, a clock) is mostly made of.
    A level change first sync-flushes the old compressor (its bytes lead the
    rectangle's data), so the fresh one starts on a byte boundary.
    """

    def __init__(self, level: int, continues: bool = True, mem_level: int = _MEM_LEVEL,
                 partial: bool = False):
        self.level = level
        self._mem = mem_level
        self._z = zlib.compressobj(level, memLevel=mem_level)
        self._continues = continues
        self._flush = zlib.Z_PARTIAL_FLUSH if partial else zlib.Z_SYNC_FLUSH
        self._tail = b""

    def deflate(self, data, level: int) -> list[bytes]:
        """data (bytes-like) compressed and flushed (every byte of it
        decodable from the pieces), as one to three pieces."""
        out = []
        if level != self.level:
            if not self._continues:
                raise ValueError("a stream without a tail cannot change level")
            self.level = level
            if self._flush != zlib.Z_SYNC_FLUSH:
                out.append(self._z.flush(zlib.Z_SYNC_FLUSH))    # byte-aligned again
            self._z = zlib.compressobj(level, zlib.DEFLATED, -15, self._mem,
                                       **({"zdict": self._tail} if self._tail else {}))
        out += [self._z.compress(data), self._z.flush(self._flush)]
        if self._continues:
            # What the client's inflater window now holds (the last 32 KiB).
            tail = data[-_WINDOW:]
            self._tail = bytes(tail) if len(tail) == _WINDOW else (self._tail + bytes(tail))[-_WINDOW:]
        return [piece for piece in out if piece]


class Encoder:
    """Per-client encoder state: the persistent zlib streams and the
    client's CompressLevel.  No state is shared between Encoders; one
    Encoder is used by one thread at a time."""

    def __init__(self, compress_level: int | None = None):
        self._level = compress_level
        self._zlib: _Stream | None = None
        self._zrle: _Stream | None = None
        self._tight: list = [None] * 4
        self._tight_released = 0                  # bit N: stream N was let go, the client's is live
        self._scratch = np.empty(0, np.uint8)     # Tight's full-colour pixel bytes
        self._zrle_scratch = bytearray()          # ZRLE's tile stream, deflated at once

    def live_streams(self) -> int:
        """How many zlib streams this client's encoder holds now."""
        return sum(st is not None for st in (self._zlib, self._zrle, *self._tight))

    def release_idle_memory(self) -> None:
        """Let the reused pixel buffers go (up to 4 bytes a pixel of the
        largest rectangle so far), and Tight's zlib streams (~0.4 MB each):
        Tight can tell the client to reset a stream, so the next rectangle
        on a released stream starts a fresh one with its reset bit set.
        Zlib's and ZRLE's streams stay: the client's inflater holds their
        other half, and neither encoding can reset it.  Not while encoding."""
        self._scratch = np.empty(0, np.uint8)
        self._zrle_scratch = bytearray()
        for stream, st in enumerate(self._tight):
            if st is not None:
                self._tight_released |= 1 << stream
        self._tight = [None] * 4

    def set_compress_level(self, level: int | None) -> None:
        """The client's CompressLevel (0..9; None = server default).  Takes
        effect with the next rectangle, also on streams already running."""
        self._level = None if level is None else max(0, min(9, int(level)))

    @property
    def compress_level(self) -> int | None:
        return self._level

    @compress_level.setter
    def compress_level(self, level: int | None) -> None:
        self.set_compress_level(level)

    def _zlib_level(self, encoding: int) -> int:
        return _DEFAULT_LEVEL[encoding] if self._level is None else self._level

    def encode(self, encoding: int, fmt: PixelFormat, pixels: np.ndarray,
               x: int, y: int, w: int, h: int, *, jpeg_quality: int | None = None,
               gradient: bool = True) -> tuple[int, bytes]:
        """Encode one rectangle; returns (number of rectangles, bytes with headers)."""
        count, chunks = self.encode_chunks(encoding, fmt, pixels, x, y, w, h, jpeg_quality=jpeg_quality,
                                           gradient=gradient)
        return count, b"".join(chunks)

    def encode_chunks(self, encoding: int, fmt: PixelFormat, pixels: np.ndarray,
                      x: int, y: int, w: int, h: int, *, jpeg_quality: int | None = None,
                      gradient: bool = True) -> tuple[int, list[bytes]]:
        """`encode` as a list of byte strings to send in order: a server
        writes them as they are instead of copying megabytes into one.
        gradient=False: Tight never uses its gradient filter (for a client
        that cannot decode it)."""
        if encoding in (TIGHT, TIGHT_PNG):
            return self._tight_rects(encoding, fmt, pixels, x, y, w, h, jpeg_quality, gradient)
        if encoding not in (RRE, HEXTILE, ZLIB, ZRLE):
            return 1, [rect_header(x, y, w, h, RAW), encode_raw(pixels)]
        vals = _values(pixels, fmt, w, h)
        if encoding == RRE:
            data = encode_rre(vals, fmt, limit=w * h * fmt.bytes_per_pixel)
            if data is None:        # RRE never sends more than Raw would
                return 1, [rect_header(x, y, w, h, RAW), encode_raw(pixels)]
        elif encoding == HEXTILE:
            data = encode_hextile(vals, fmt)
        elif encoding in (ZLIB, ZRLE):
            level = self._zlib_level(encoding)
            if encoding == ZLIB:
                if self._zlib is None:
                    self._zlib = _Stream(level)
                z = self._zlib.deflate(_contiguous(pixels), level)
            else:
                if self._zrle is None:
                    self._zrle = _Stream(level, mem_level=_ZRLE_MEM_LEVEL, partial=True)
                z = self._zrle.deflate(zrle_tiles(vals, fmt, self._zrle_scratch), level)
            size = sum(map(len, z))
            return 1, [rect_header(x, y, w, h, encoding) + struct.pack(">I", size), *z]
        return 1, [rect_header(x, y, w, h, encoding), data]

    # Tight -----------------------------------------------------------
    def _tight_rects(self, encoding, fmt, pixels, x, y, w, h, jpeg_quality, gradient):
        vals = _values(pixels, fmt, w, h)
        chunks, count = [], 0
        for px, py, pw, ph in pieces(encoding, x, y, w, h):
            sub = vals[py - y:py - y + ph, px - x:px - x + pw]
            head, *data = self._tight_body(encoding == TIGHT_PNG, fmt, sub, jpeg_quality, gradient)
            chunks += [rect_header(px, py, pw, ph, encoding) + head, *data]
            count += 1
        return count, chunks

    def _tight_body(self, png: bool, fmt: PixelFormat, vals: np.ndarray, jpeg_quality,
                    gradient: bool = True) -> list[bytes]:
        """One Tight rectangle after its header: [control and lengths, data...]."""
        palette, idx = _palette(vals, 256)
        if palette is not None and len(palette) == 1:
            return [b"\x80" + _tpixels(palette, fmt)]
        jpeg_ok = jpeg_quality is not None and fmt.bpp == 32
        if jpeg_ok and (palette is None or len(palette) > 16):
            data = _image_bytes(vals, fmt, "JPEG", jpeg_quality)
            return [b"\x90" + compact_length(len(data)), data]
        if png:
            data = _image_bytes(vals, fmt, "PNG")
            return [b"\xa0" + compact_length(len(data)), data]
        if palette is not None and len(palette) * 2 < vals.size:
            if idx is None:
                idx = np.searchsorted(palette, vals)
            if len(palette) == 2:
                stream, data = 1, np.packbits(idx.astype(np.uint8), axis=1).tobytes()
            else:
                stream, data = 2, idx.astype(np.uint8).tobytes()
            head = bytearray([0x40 | stream << 4, 1, len(palette) - 1]) + _tpixels(palette, fmt)
        else:
            # Full colour: the pixel bytes go to deflate from a buffer reused
            # for every rectangle (no per-rectangle copies to allocate).
            if self._scratch.size < vals.size * 4:
                self._scratch = np.empty(vals.size * 4, np.uint8)
            stream, data, head = 0, _tpixels(vals, fmt, self._scratch), bytearray(b"\x00")
            if gradient and self._level != 0 and tight_pixel24(fmt) and vals.size > 1:
                # Many colours: the gradient filter (as the TightVNC family
                # does for lossless smooth data) turns smooth areas into
                # zeros; deflate then takes a fraction of the bytes and time.
                data = _gradient24(np.frombuffer(data, np.uint8).reshape(vals.shape + (3,)))
                head = bytearray(b"\x40\x02")
        if len(data) < TIGHT_MIN_TO_COMPRESS:
            return [bytes(head + data)]
        client_level = _TIGHT_DEFAULT if self._level is None else self._level
        level = _TIGHT_ZLIB[client_level][_TIGHT_STREAM_KIND[stream]]
        st = self._tight[stream]
        if st is None or st.level != level:
            # Tight can reset a stream (control bits 0-3): the client starts a
            # fresh inflater, so a new zlib stream (at a new level, or after
            # release_idle_memory) is exact.
            if st is not None or self._tight_released >> stream & 1:
                head[0] |= 1 << stream
                self._tight_released &= ~(1 << stream)
            # Partial flush, as ZRLE's: ~3 bytes less a rectangle, which is
            # most of a clock's; TigerVNC, noVNC (pako) and gtk-vnc decode it
            # (tests/test_vnc_clients.py, test_novnc.py), as zlib's inflate must.
            st = self._tight[stream] = _Stream(level, continues=False, partial=True)
        z = st.deflate(data, level)
        return [bytes(head + compact_length(sum(map(len, z)))), *z]
