"""RFB rectangle encoders: Raw, RRE, Hextile, Zlib, Tight, TightPNG, ZRLE.

Input is always a private, C-contiguous (h, w * bytes_per_pixel) uint8 array
already in the client's pixel format (`convert.convert_rect` makes it), so an
encoder never sees guest memory and never reads outside its rectangle.

Pixels are analysed as integers through a little-endian view of their bytes
(`_values`); writing such a value back with the same dtype reproduces the
client's byte order, so no encoder cares about endianness.

One `Encoder` per client: it owns that client's zlib streams (Zlib, ZRLE and
Tight's four), which RFB requires to persist for the whole connection.
"""
from __future__ import annotations

import io
import struct
# zlib-ng: the same deflate streams as zlib (any client's inflater reads
# them), made 2-3x faster with SIMD; python-zlib-ng mirrors zlib's API.
from zlib_ng import zlib_ng as zlib

import numpy as np

from ..util.pixelformat import PixelFormat

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


def rect_header(x: int, y: int, w: int, h: int, encoding: int) -> bytes:
    return struct.pack(">HHHHi", x, y, w, h, encoding)


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
def encode_raw(pixels: np.ndarray) -> bytes:
    return pixels.tobytes()


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


def encode_hextile(vals: np.ndarray, fmt: PixelFormat) -> bytes:
    """Hextile with every tile classified at once (numpy, no per-tile Python
    except copying raw tiles):

    - one colour: background only, omitted when the client still has it;
    - two colours: background (the majority) + foreground + one subrectangle
      per horizontal run of the foreground, unless raw would be smaller;
    - more colours: raw.
    Only the background is carried between tiles, and never past a raw tile
    (the client forgets it there); the foreground is always sent.
    """
    h, w = vals.shape
    bpp = fmt.bytes_per_pixel
    dtype = _DTYPES[bpp]
    rows_t, cols_t = -(-h // _TILE), -(-w // _TILE)
    n = rows_t * cols_t
    padded = _pad_edge(vals, rows_t * _TILE, cols_t * _TILE)
    # Tile-major order, moving each tile row (16 pixels) as one block.
    row_block = np.dtype((np.void, _TILE * bpp))
    tiles = (np.ascontiguousarray(padded).view(row_block).reshape(rows_t, _TILE, cols_t)
             .swapaxes(1, 2).copy().view(vals.dtype).reshape(n, _TILE, _TILE))
    tile_h = np.minimum(_TILE, h - np.arange(rows_t) * _TILE).repeat(cols_t)
    tile_w = np.tile(np.minimum(_TILE, w - np.arange(cols_t) * _TILE), rows_t)
    inside = ((np.arange(_TILE)[None, :, None] < tile_h[:, None, None]) &
              (np.arange(_TILE)[None, None, :] < tile_w[:, None, None]))

    # A tile whose top row and left column already show three colours is
    # raw: only the others (flat areas, text) need the full analysis, which
    # on a photo-like picture is a small minority.
    edge = np.concatenate((tiles[:, 0, :], tiles[:, 1:, 0]), axis=1)
    edge_other = edge != edge[:, :1]
    edge_second = edge[np.arange(n), edge_other.argmax(axis=1)]
    cand = np.flatnonzero(~(edge_other & (edge != edge_second[:, None])).any(axis=1))

    sub, sub_inside = tiles[cand], inside[cand]
    first = sub[:, 0, 0]
    is_first = sub == first[:, None, None]
    sub_other = ~is_first.all(axis=(1, 2))
    flat = (len(cand), _TILE * _TILE)
    second = sub.reshape(flat)[np.arange(len(cand)), (~is_first).reshape(flat).argmax(axis=1)]
    is_second = sub == second[:, None, None]
    sub_two = sub_other & (is_first | is_second).all(axis=(1, 2))
    # Background = the majority colour: fewer subrectangles.
    second_wins = (is_second & sub_inside).sum(axis=(1, 2)) > (is_first & sub_inside).sum(axis=(1, 2))
    has_other = np.ones(n, bool)
    has_other[cand] = sub_other
    two = np.zeros(n, bool)
    two[cand] = sub_two
    bg = tiles[:, 0, 0].copy()
    bg[cand] = np.where(sub_two & second_wins, second, first)
    fg = np.zeros(n, vals.dtype)
    fg[cand] = np.where(second_wins, first, second)

    # Foreground runs of every two-colour tile: (tile, y, x0, x1).
    two_idx = np.flatnonzero(two)
    fg_mask = (tiles[two_idx] == fg[two_idx, None, None]) & inside[two_idx]
    left = np.zeros_like(fg_mask)
    left[:, :, 1:] = fg_mask[:, :, :-1]
    right = np.zeros_like(fg_mask)
    right[:, :, :-1] = fg_mask[:, :, 1:]
    run_t, run_y, run_x0 = np.nonzero(fg_mask & ~left)
    run_x1 = np.nonzero(fg_mask & ~right)[2] + 1          # same order as the starts
    runs = np.bincount(run_t, minlength=len(two_idx))
    raw_size = 1 + tile_h * tile_w * bpp
    two_size = 1 + bpp + bpp + 1 + 2 * runs               # upper bound (bg always)
    too_big = two_size >= raw_size[two_idx]
    two[two_idx[too_big]] = False
    keep_run = ~too_big[run_t]
    run_t, run_y, run_x0, run_x1 = (a[keep_run] for a in (run_t, run_y, run_x0, run_x1))
    runs[too_big] = 0
    raw = has_other & ~two

    prev_raw = np.concatenate(([True], raw[:-1]))
    prev_bg = np.concatenate(([bg[0]], bg[:-1]))
    send_bg = ~raw & (prev_raw | (bg != prev_bg))
    count = np.zeros(n, np.int64)
    count[two_idx] = runs
    size = np.where(raw, raw_size, 1 + send_bg * bpp + two * (bpp + 1) + 2 * count)
    # Headers and subrectangles of the tiles that are not raw go into fixed
    # slots (mask, background, foreground, count and at most 8 runs in each
    # of 16 rows); raw tiles are sent from one copy of their pixels.  The
    # output is joined from memoryview slices: a run of raw tiles is one slice.
    slot = 2 + 2 * bpp + 2 * (_TILE * _TILE // 2)
    slots = np.zeros((n, slot), np.uint8)
    offs = np.arange(n) * slot
    out = slots.reshape(-1)
    mask = np.where(send_bg, _HT_BG, 0) | np.where(two, _HT_FG | _HT_ANY, 0)
    out[offs] = mask
    span = np.arange(bpp)
    sel = np.flatnonzero(send_bg)
    out[(offs[sel] + 1)[:, None] + span] = bg[sel].astype(dtype).view(np.uint8).reshape(-1, bpp)
    fg_at = offs + 1 + send_bg * bpp
    sel = np.flatnonzero(two)
    out[fg_at[sel][:, None] + span] = fg[sel].astype(dtype).view(np.uint8).reshape(-1, bpp)
    out[fg_at[sel] + bpp] = count[sel]
    if len(run_t):
        tile_of_run = two_idx[run_t]
        first_run = np.concatenate(([0], np.cumsum(runs)[:-1]))
        rank = np.arange(len(run_t)) - first_run[run_t]
        at = fg_at[tile_of_run] + bpp + 1 + 2 * rank
        out[at] = (run_x0 << 4 | run_y).astype(np.uint8)
        out[at + 1] = ((run_x1 - run_x0 - 1) << 4).astype(np.uint8)

    full = (tile_h == _TILE) & (tile_w == _TILE)
    raw_full = raw & full
    raw_rows = np.flatnonzero(raw_full)
    raw_slot = 1 + _TILE * _TILE * bpp
    raw_slots = np.empty((len(raw_rows), raw_slot), np.uint8)
    raw_slots[:, 0] = _HT_RAW
    raw_slots[:, 1:] = tiles[raw_rows].reshape(len(raw_rows), _TILE * _TILE).view(np.uint8)
    raw_mv, hdr_mv = memoryview(raw_slots.reshape(-1)), memoryview(out)
    sizes = size.tolist()

    def piece(t: int):
        if not raw[t]:
            return hdr_mv[t * slot:t * slot + sizes[t]]
        r, c = divmod(t, cols_t)                 # a raw edge tile: its real pixels only
        return b"\x01" + np.ascontiguousarray(vals[r * _TILE:(r + 1) * _TILE,
                                                   c * _TILE:(c + 1) * _TILE]).tobytes()
    edges = np.diff(np.concatenate(([0], raw_full.view(np.int8), [0])))
    pieces, pos, row = [], 0, 0
    for start, end in zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()):
        pieces += [piece(t) for t in range(pos, start)]
        pieces.append(raw_mv[row * raw_slot:(row + end - start) * raw_slot])
        row, pos = row + end - start, end
    pieces += [piece(t) for t in range(pos, n)]
    return b"".join(pieces)


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


def zrle_tiles(vals: np.ndarray, fmt: PixelFormat) -> bytes:
    """The uncompressed ZRLE tile stream for a rectangle.

    Tiles are classified at once: a tile whose first row already has more
    than 16 colours is raw; the others are sorted (numpy's SIMD sort) and
    distinct = 1 + changes between neighbours.  Full raw tiles are sent from
    one tile-major copy of the CPIXELs; Python only loops over the tiles to
    join their pieces.
    """
    sel = _cpixel_bytes(fmt)
    h, w = vals.shape
    rows_t, cols_t = -(-h // 64), -(-w // 64)
    n = rows_t * cols_t
    # Edge padding repeats existing pixels: it adds no colour to a tile.
    padded = _pad_edge(vals, rows_t * 64, cols_t * 64)
    tile_view = padded.reshape(rows_t, 64, cols_t, 64).swapaxes(1, 2)
    # A first row and column that show 17 colours make a tile raw.
    sample = np.sort(np.concatenate((tile_view[:, :, 0, :], tile_view[:, :, 1:, 0]),
                                    axis=2).reshape(n, 127), axis=1)
    few = np.count_nonzero(sample[:, 1:] != sample[:, :-1], axis=1) < 16
    cand = np.flatnonzero(few)
    ncol = np.full(n, 17)
    palettes: dict[int, np.ndarray] = {}
    if len(cand):
        sub = tile_view[cand // cols_t, cand % cols_t].reshape(len(cand), 4096)
        sub.sort(axis=1)
        change = sub[:, 1:] != sub[:, :-1]
        ncol[cand] = 1 + np.count_nonzero(change, axis=1)
        for j, i in enumerate(cand.tolist()):
            if ncol[i] <= 16:
                palettes[i] = sub[j, np.concatenate(([True], change[j]))]   # sorted, distinct

    if sel is None:
        cpix = np.ascontiguousarray(vals).view(np.uint8).reshape(h, -1)
    else:                       # 3 bytes of each 4: copied as one 3-byte field
        field = np.dtype({"names": ["c"], "formats": ["V3"], "offsets": [sel[0]], "itemsize": 4})
        cpix = np.ascontiguousarray(vals).view(field)["c"].copy().view(np.uint8).reshape(h, -1)
    cb = cpix.shape[1] // w
    full_rows, full_cols = h // 64, w // 64
    # Tile-major copy of the whole tiles, moving each 64-pixel tile row as one block.
    block = np.dtype((np.void, 64 * cb))
    tiled = memoryview(np.ascontiguousarray(
        cpix[:full_rows * 64, :full_cols * 64 * cb].view(block)
        .reshape(full_rows, 64, full_cols).swapaxes(1, 2)).reshape(-1).view(np.uint8))
    tile_bytes = 64 * 64 * cb
    pieces: list = []
    for i in range(n):
        r, c = divmod(i, cols_t)
        ty, tx = r * 64, c * 64
        palette = palettes.get(i)
        if palette is not None and len(palette) == 1:
            pieces += [b"\x01", _cpixels(palette, fmt, sel)]
        elif palette is not None:
            k = len(palette)
            bits = 1 if k == 2 else 2 if k <= 4 else 4
            pieces += [bytes([k]), _cpixels(palette, fmt, sel),
                       _pack_indices(np.searchsorted(palette, vals[ty:ty + 64, tx:tx + 64]), bits)]
        elif r < full_rows and c < full_cols:
            at = (r * full_cols + c) * tile_bytes
            pieces += [b"\x00", tiled[at:at + tile_bytes]]
        else:                                   # an edge tile: its real pixels only
            pieces += [b"\x00", cpix[ty:ty + 64, tx * cb:(tx + 64) * cb].tobytes()]
    return b"".join(pieces)


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
    """Tight's gradient filter for 3-byte TPIXELs: each component minus the
    prediction clamp(left + up - upleft, 0, 255), mod 256; neighbours outside
    the rectangle count as 0."""
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
_TIGHT_DEFAULT = 1
# Tight client level -> zlib level for the (mono, indexed, full-colour)
# streams: the TightVNC family's progression (QEMU uses the same one);
# full-colour data gains least from effort, so it gets the lower levels.
_TIGHT_ZLIB = ((0, 0, 0), (1, 1, 1), (3, 3, 2), (5, 5, 2), (6, 6, 3), (7, 7, 4), (7, 7, 5),
               (8, 8, 6), (9, 9, 7), (9, 9, 9))
_TIGHT_STREAM_KIND = (2, 0, 1, 2)   # stream 0 full colour, 1 mono, 2 indexed (3 unused)
_WINDOW = 32768                     # deflate's window: all a continuation can refer to
_MEM_LEVEL = 9                      # bigger hash table: ~15% faster here, same output size


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
    """

    def __init__(self, level: int, continues: bool = True):
        self.level = level
        self._z = zlib.compressobj(level, memLevel=_MEM_LEVEL)
        self._continues = continues
        self._tail = b""

    def deflate(self, data, level: int) -> list[bytes]:
        """data (bytes-like) compressed and sync-flushed, as one or two pieces."""
        if level != self.level:
            if not self._continues:
                raise ValueError("a stream without a tail cannot change level")
            self.level = level
            self._z = zlib.compressobj(level, zlib.DEFLATED, -15, _MEM_LEVEL,
                                       **({"zdict": self._tail} if self._tail else {}))
        out = [self._z.compress(data), self._z.flush(zlib.Z_SYNC_FLUSH)]
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
        self._scratch = np.empty(0, np.uint8)     # Tight's full-colour pixel bytes

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
               x: int, y: int, w: int, h: int, *, jpeg_quality: int | None = None) -> tuple[int, bytes]:
        """Encode one rectangle; returns (number of rectangles, bytes with headers)."""
        count, chunks = self.encode_chunks(encoding, fmt, pixels, x, y, w, h, jpeg_quality=jpeg_quality)
        return count, b"".join(chunks)

    def encode_chunks(self, encoding: int, fmt: PixelFormat, pixels: np.ndarray,
                      x: int, y: int, w: int, h: int, *,
                      jpeg_quality: int | None = None) -> tuple[int, list[bytes]]:
        """`encode` as a list of byte strings to send in order: a server
        writes them as they are instead of copying megabytes into one."""
        if encoding in (TIGHT, TIGHT_PNG):
            return self._tight_rects(encoding, fmt, pixels, x, y, w, h, jpeg_quality)
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
                    self._zrle = _Stream(level)
                z = self._zrle.deflate(zrle_tiles(vals, fmt), level)
            size = sum(map(len, z))
            return 1, [rect_header(x, y, w, h, encoding) + struct.pack(">I", size), *z]
        return 1, [rect_header(x, y, w, h, encoding), data]

    # Tight -----------------------------------------------------------
    def _tight_rects(self, encoding, fmt, pixels, x, y, w, h, jpeg_quality):
        vals = _values(pixels, fmt, w, h)
        chunks, count = [], 0
        for cx in range(0, w, TIGHT_MAX_WIDTH):
            cw = min(TIGHT_MAX_WIDTH, w - cx)
            rows = max(1, TIGHT_MAX_AREA // cw)
            for cy in range(0, h, rows):
                ch = min(rows, h - cy)
                sub = vals[cy:cy + ch, cx:cx + cw]
                head, *data = self._tight_body(encoding == TIGHT_PNG, fmt, sub, jpeg_quality)
                chunks += [rect_header(x + cx, y + cy, cw, ch, encoding) + head, *data]
                count += 1
        return count, chunks

    def _tight_body(self, png: bool, fmt: PixelFormat, vals: np.ndarray, jpeg_quality) -> list[bytes]:
        """One Tight rectangle after its header: [control and lengths, data...]."""
        palette = _few_colours(vals, 256)
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
            if self._level != 0 and tight_pixel24(fmt) and vals.size > 1:
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
            # fresh inflater, so a new zlib stream at the new level is exact.
            if st is not None:
                head[0] |= 1 << stream
            st = self._tight[stream] = _Stream(level, continues=False)
        z = st.deflate(data, level)
        return [bytes(head + compact_length(sum(map(len, z)))), *z]
