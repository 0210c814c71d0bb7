"""Benchmark contents beyond xanim's gradient: a Linux text console and a desktop.

Each content is a ring of frames (0x00RRGGBB uint32, (height, width)) with,
per frame, the rectangles that changed since the frame before it in the ring
(frame 0's against the last): the guest sends one UPDATE per rectangle, the
bench's X player (bench/xplay.c) XPutImages the same rectangles of the same
frames (written to a file by `write_frames_file`), so pyxenfb and the X-side
anchors serve identical pixels.

text: fbcon scrolling a boot log one line at a time, VGA-coloured text on
black in a PSF console font (Debian's console-setup-linux puts them in
/usr/share/consolefonts; PYXENFB_CONSOLE_FONT names another), a block
cursor after the last line.  Without a font file a built-in stand-in font of
the same size is used (`Font.name` says which).
desktop: a static desktop (wallpaper, panel, a terminal and a file window)
whose only changes are the panel clock and the terminal's blinking cursor.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .picture import XANIM_FRAMES, xanim_frames

CONTENTS = ("gradient", "text", "desktop")
FONT_DIR = Path("/usr/share/consolefonts")
# fbcon's default is the VGA 8x16 font; Latin-1 and Unicode variants of it
FONT_CANDIDATES = ("Lat15-VGA16.psf.gz", "Uni2-VGA16.psf.gz", "Lat15-Fixed16.psf.gz")
DESKTOP_FRAMES = 24

Rect = tuple[int, int, int, int]


# ---- PSF console fonts ----------------------------------------------------------
@dataclass
class Font:
    name: str
    width: int
    height: int
    glyphs: np.ndarray              # (n, height, width) bool
    index: dict[str, int]           # character -> glyph

    def glyph_indices(self, text: str) -> list[int]:
        fallback = self.index.get("?", 0)
        return [self.index.get(c, fallback) for c in text]


def _psf_unicode_psf1(table: bytes, n: int) -> dict[str, int]:
    """PSF1 table: per glyph, UCS-2 LE values, 0xFFFE starts sequences, 0xFFFF ends."""
    index: dict[str, int] = {}
    vals = struct.unpack(f"<{len(table) // 2}H", table[:len(table) // 2 * 2])
    glyph, in_seq = 0, False
    for v in vals:
        if glyph >= n:
            break
        if v == 0xFFFF:
            glyph, in_seq = glyph + 1, False
        elif v == 0xFFFE:
            in_seq = True
        elif not in_seq:
            index.setdefault(chr(v), glyph)
    return index


def _psf_unicode_psf2(table: bytes, n: int) -> dict[str, int]:
    """PSF2 table: per glyph, UTF-8 characters, 0xFE starts sequences, 0xFF ends."""
    index: dict[str, int] = {}
    for glyph, entry in enumerate(table.split(b"\xff")[:n]):
        for c in entry.split(b"\xfe")[0].decode("utf-8", "replace"):
            index.setdefault(c, glyph)
    return index


def load_psf(path: str | os.PathLike) -> Font:
    """A PSF1 or PSF2 font file (gzipped or not)."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if raw[:2] == b"\x36\x04":                       # PSF1: 8 px wide, 256 or 512 glyphs
        mode, height = raw[2], raw[3]
        n, width, stride, start = (512 if mode & 1 else 256), 8, height, 4
        has_table = bool(mode & 6)
    elif raw[:4] == b"\x72\xb5\x4a\x86":             # PSF2
        _, start, flags, n, stride, height, width = struct.unpack("<7I", raw[4:32])
        has_table = bool(flags & 1)
    else:
        raise ValueError(f"{path}: not a PSF font")
    row_bytes = (width + 7) // 8
    if not (0 < width <= 64 and 0 < height <= 64 and 0 < n <= 65536 and
            stride == row_bytes * height and start + n * stride <= len(raw)):
        raise ValueError(f"{path}: inconsistent PSF header")
    data = np.frombuffer(raw, np.uint8, n * stride, start).reshape(n, height, row_bytes)
    glyphs = np.unpackbits(data, axis=2)[:, :, :width].astype(bool)
    table = raw[start + n * stride:]
    if not has_table:
        index = {chr(i): i for i in range(min(n, 256))}
    elif raw[:2] == b"\x36\x04":
        index = _psf_unicode_psf1(table, n)
    else:
        index = _psf_unicode_psf2(table, n)
    return Font(Path(path).name, width, height, glyphs, index)


def stand_in_font(width: int = 8, height: int = 16) -> Font:
    """A deterministic 8x16 glyph set for printable ASCII (blank space): not a
    real font, but text-like (sparse pixels inside a cell margin)."""
    glyphs = np.zeros((128, height, width), bool)
    for c in range(33, 127):
        bits = np.unpackbits(np.frombuffer(hashlib.sha256(bytes([c])).digest(), np.uint8))
        cell = bits[:(height - 6) * (width - 2)].reshape(height - 6, width - 2).astype(bool)
        glyphs[c, 3:height - 3, 1:width - 1] = cell & np.roll(cell, 1, axis=0)
    return Font("stand-in 8x16", width, height, glyphs, {chr(i): i for i in range(128)})


def console_font() -> Font:
    """PYXENFB_CONSOLE_FONT, else the first of FONT_CANDIDATES installed, else the stand-in."""
    env = os.environ.get("PYXENFB_CONSOLE_FONT")
    for path in ([Path(env)] if env else []) + [FONT_DIR / name for name in FONT_CANDIDATES]:
        if path.is_file():
            return load_psf(path)
    return stand_in_font()


def draw_text(img: np.ndarray, x: int, y: int, text: str, fg: int, bg: int, font: Font) -> Rect:
    """Draw `text` (one line, clipped at the image edges); returns the cells' rect."""
    h, w = img.shape
    n = min(len(text), max(0, (w - x) // font.width))
    rows = min(font.height, h - y)
    if n <= 0 or rows <= 0:
        return (x, y, 0, 0)
    cells = font.glyphs[font.glyph_indices(text[:n])]          # (n, fh, fw)
    block = cells.transpose(1, 0, 2).reshape(font.height, n * font.width)[:rows]
    img[y:y + rows, x:x + n * font.width] = np.where(block, np.uint32(fg), np.uint32(bg))
    return (x, y, n * font.width, rows)


# ---- the text console -------------------------------------------------------------
VGA_GREY, VGA_WHITE, VGA_GREEN, VGA_RED, VGA_YELLOW = 0xAAAAAA, 0xFFFFFF, 0x55FF55, 0xFF5555, 0xFFFF55
_DEVICES = ("usb 1-1", "ata2.00", "sd 0:0:0:0", "xen-blkfront", "e1000e 0000:00:19.0",
            "EXT4-fs (xvda1)", "xen_netfront", "systemd[1]", "input", "audit")
_MESSAGES = ("new high-speed USB device number {n} using xhci_hcd",
             "configured for UDMA/{n}", "[sda] {n} 512-byte logical blocks: (500 GB/466 GiB)",
             "mounted filesystem with ordered data mode. Quota mode: none.",
             "Initialising Xen virtual ethernet driver, {n} queues",
             "Started Journal Service (pid {n}).",
             "registered new interface driver usbhid",
             "type=1403 audit({n}.112:2): policy loaded auid=4294967295 ses=4294967295",
             "blkfront: xvda: flush diskcache: enabled; persistent grants: enabled;",
             "Reached target Local File Systems (Pre) after {n} ms.")


def console_line(i: int) -> tuple[str, int]:
    """Line i of the boot log the console shows, and its colour."""
    if i % 7 == 3:
        units = ("Network Time Synchronization", "Login Service", "Permit User Sessions",
                 "OpenBSD Secure Shell server", "Xen daemon")
        return f"[  OK  ] Started {units[i % len(units)]}.", VGA_GREEN
    t = 1.5 + i * 0.0371
    dev, msg = _DEVICES[(i * 3) % len(_DEVICES)], _MESSAGES[(i * 7) % len(_MESSAGES)]
    colour = VGA_YELLOW if i % 11 == 5 else VGA_GREY
    return f"[{t:12.6f}] {dev}: {msg.format(n=(i * 2654435761) % 100000)}", colour


def text_frames(width: int, height: int, font: Font | None = None,
                n: int | None = None) -> tuple[list[np.ndarray], list[list[Rect]]]:
    """fbcon scrolling: frame k shows log lines k .. k+R-1 (R text rows), the
    block cursor after the last; frame k+1 is frame k moved up one line with
    the next line at the bottom.  The log repeats every n lines (default R+1:
    no line twice on a screen) so the ring closes."""
    font = font or console_font()
    fw, fh = font.width, font.height
    rows = max(1, height // fh)
    n = n or rows + 1
    # every line of one period, once, on one tall strip; a frame is a window on it
    strip = np.zeros(((n + rows) * fh, width), np.uint32)
    ends = []
    for i in range(n + rows):
        text, colour = console_line(i % n)
        x, _, w, _ = draw_text(strip, 0, i * fh, text, colour, 0, font)
        ends.append(x + w)
    frames, rects = [], []
    for k in range(n):
        f = np.zeros((height, width), np.uint32)
        f[:rows * fh] = strip[k * fh:(k + rows) * fh]
        cx, cy = min(ends[k + rows - 1], width - fw), (rows - 1) * fh
        f[cy + fh - 2:cy + fh, cx:cx + fw] = VGA_GREY      # fbcon's underline cursor
        frames.append(f)
        rects.append([(0, 0, width, rows * fh)])           # a scroll redraws every text row
    return frames, rects


# ---- the desktop ------------------------------------------------------------------
def _desktop_background(width: int, height: int, font: Font) -> tuple[np.ndarray, dict]:
    y = np.arange(height, dtype=np.int64)[:, None]
    x = np.arange(width, dtype=np.int64)
    # wallpaper: a smooth two-way blend, the kind that costs encoders most among desktops
    r = (30 + 40 * y // max(1, height)) + 0 * x
    g = (70 + 60 * y // max(1, height) + 20 * x // max(1, width))
    b = (110 + 80 * x // max(1, width)) + 0 * y
    img = ((r << 16) | (g << 8) | b).astype(np.uint32)
    ph = font.height + 8
    img[:ph] = 0x2E3436                                              # top panel
    draw_text(img, 8, 4, "Applications   Places   System", 0xEEEEEC, 0x2E3436, font)
    places = {}

    def window(x0, y0, w, h, title, body_bg):
        w, h = min(w, width - x0 - 2), min(h, height - y0 - 2)
        if w < 4 * font.width or h < 3 * font.height:
            return None
        img[y0 + 4:y0 + h + 4, x0 + 4:x0 + w + 4] = 0x1A1A1A              # shadow
        img[y0:y0 + h, x0:x0 + w] = 0x888A85                              # frame
        img[y0 + 1:y0 + font.height + 7, x0 + 1:x0 + w - 1] = 0x3465A4      # title bar
        draw_text(img, x0 + 8, y0 + 4, title, 0xFFFFFF, 0x3465A4, font)
        img[y0 + font.height + 7:y0 + h - 1, x0 + 1:x0 + w - 1] = body_bg
        return x0 + 6, y0 + font.height + 10, w - 12, h - font.height - 14

    term = window(width // 20, height // 8, width // 2, height // 2, "user@domU: ~", 0x000000)
    if term:
        tx, ty, tw, th = term
        lines = ["user@domU:~$ uname -a",
                 "Linux domU 6.1.0-13-amd64 #1 SMP PREEMPT_DYNAMIC Debian x86_64 GNU/Linux",
                 "user@domU:~$ ls /etc/xen", "auto  scripts  xl.conf",
                 "user@domU:~$ "]
        for i, text in enumerate(lines[:th // font.height]):
            draw_text(img, tx, ty + i * font.height, text[:tw // font.width], 0xD3D7CF, 0, font)
        last = min(len(lines), th // font.height) - 1
        places["cursor"] = (tx + len(lines[last]) * font.width, ty + last * font.height)
    files = window(width * 11 // 20, height // 4, width * 2 // 5, height * 3 // 5,
                   "Files - /home/user", 0xFFFFFF)
    if files:
        fx, fy, fw_, fh_ = files
        names = ["Documents", "Downloads", "Music", "Pictures", "Public", "Templates",
                 "Videos", "notes.txt", "report.pdf", "xen-4.17.tar.gz"]
        for i, name in enumerate(names[:fh_ // (font.height + 6)]):
            yy = fy + i * (font.height + 6)
            img[yy + 2:yy + font.height - 2, fx + 2:fx + 14] = 0xC4A000 if i < 7 else 0x729FCF
            draw_text(img, fx + 20, yy, name, 0x2E3436, 0xFFFFFF, font)
    places["clock"] = (max(0, width - 9 * font.width - 8), 4)
    return img, places


def desktop_frames(width: int, height: int, font: Font | None = None,
                   n: int = DESKTOP_FRAMES) -> tuple[list[np.ndarray], list[list[Rect]]]:
    """A static desktop; per frame only the panel clock (HH:MM:SS) and the
    terminal's block cursor (on in even frames) change."""
    font = font or console_font()
    base, places = _desktop_background(width, height, font)
    frames, rects = [], []
    for k in range(n):
        f = base.copy()
        s = 9 * 3600 + 41 * 60 + k
        cx, cy = places["clock"]
        changed = [draw_text(f, cx, cy, f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}",
                             0xEEEEEC, 0x2E3436, font)]
        if "cursor" in places:
            x, y = places["cursor"]
            w, h = min(font.width, width - x), min(font.height, height - y)
            if k % 2 == 0:
                f[y:y + h, x:x + w] = 0xD3D7CF
            changed.append((x, y, w, h))
        frames.append(f)
        rects.append([r for r in changed if r[2] > 0 and r[3] > 0])
    return frames, rects


def content_frames(kind: str, width: int, height: int) -> tuple[list[np.ndarray], list[list[Rect]]]:
    """The frames and per-frame changed rects of one of CONTENTS."""
    if kind == "gradient":
        frames = list(xanim_frames(width, height, XANIM_FRAMES))
        return frames, [[(0, 0, width, height)] for _ in frames]
    if kind == "text":
        return text_frames(width, height)
    if kind == "desktop":
        return desktop_frames(width, height)
    raise ValueError(f"unknown content {kind!r}; known: {', '.join(CONTENTS)}")


# ---- the X side's copy ------------------------------------------------------------
FILE_MAGIC = b"PXBPLAY1"


def write_frames_file(path: str | os.PathLike, frames: list[np.ndarray],
                      rects: list[list[Rect]]) -> None:
    """bench/xplay.c's input: magic, u32 width height nframes maxrects, per frame
    u32 nrects + maxrects x (x y w h), zero padding to 4096, then the frames'
    pixels (little-endian 0x00RRGGBB words, row after row)."""
    h, w = frames[0].shape
    maxr = max(len(r) for r in rects)
    head = bytearray(FILE_MAGIC + struct.pack("<4I", w, h, len(frames), maxr))
    for rs in rects:
        head += struct.pack("<I", len(rs))
        for i in range(maxr):
            head += struct.pack("<4I", *(rs[i] if i < len(rs) else (0, 0, 0, 0)))
    head += bytes(-len(head) % 4096)
    with open(path, "wb") as f:
        f.write(head)
        for frame in frames:
            f.write(np.ascontiguousarray(frame, "<u4").tobytes())
