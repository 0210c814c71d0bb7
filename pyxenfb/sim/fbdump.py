"""Dump a simulated guest's framebuffer straight from its RAM file.

Independent of the backend (pyxenfb/xenfb.py) on purpose: this is the
ground truth tests compare a VNC or SDL picture against.  It reads the vfb
frontend's `page-ref` and `protocol` from XenStore (a blocking one-shot
client, so it works from sync code and from inside a running loop), the
shared page from DIR/dom<N>/memory, walks pd[] for the guest's ABI, gathers
the framebuffer frames and converts the picture to RGB.

Everything read from the guest is checked: this is a tool, so bad values
raise `FbdumpError` with a readable reason rather than a wrong picture.
"""
from __future__ import annotations

import os
import socket
import struct

import numpy as np

from ..convert import GUEST_FORMATS, to_rgb
from ..xenfb_abi import FB_HEADER, PAGE_SIZE, abi_for_protocol
from ..xs_wire import Message, MessageDecoder, XsType, errno_from_name, join_strings
from .guestmem import GuestMemory
from .toolstack import ToolstackError, resolve_run_dir

MAX_DIMENSION = 16384          # a guest claiming more is lying
XS_TIMEOUT = 5.0


class FbdumpError(ToolstackError):
    """Why no picture could be read; str() is one line for the user."""


def xenstore_read_sync(sock_path: str, path: str) -> str | None:
    """One blocking XS_READ over a fresh connection; None if the node is missing."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(XS_TIMEOUT)
            sock.connect(sock_path)
            sock.sendall(Message(XsType.READ, 1, 0, join_strings(path)).encode())
            decoder = MessageDecoder()
            while True:
                data = sock.recv(8192)
                if not data:
                    raise FbdumpError(f"XenStore at {sock_path} closed the connection")
                for msg in decoder.feed(data):
                    if msg.req_id != 1 or msg.type == XsType.WATCH_EVENT:
                        continue
                    if msg.type == XsType.ERROR:
                        name = msg.payload.rstrip(b"\0").decode("ascii", "replace")
                        if name == "ENOENT":
                            return None
                        raise FbdumpError(f"XenStore read {path}: {name} "
                                          f"(errno {errno_from_name(name)})")
                    return msg.payload.decode("utf-8", "replace")
    except OSError as exc:
        raise FbdumpError(f"cannot read {path} from XenStore at {sock_path}: {exc}") from exc


def fbdump_array(run_dir: str | os.PathLike | None, domid: int) -> np.ndarray:
    """The guest's visible framebuffer as an (height, width, 3) uint8 RGB array."""
    run_dir = resolve_run_dir(run_dir)
    fe = f"/local/domain/{domid}/device/vfb/0"
    sock_path = os.path.join(run_dir, "xenstored.sock")
    page_ref = xenstore_read_sync(sock_path, f"{fe}/page-ref")
    protocol = xenstore_read_sync(sock_path, f"{fe}/protocol")
    if page_ref is None:
        raise FbdumpError(f"domain {domid} has no {fe}/page-ref (frontend not initialised?)")
    if not page_ref.isdigit():
        raise FbdumpError(f"{fe}/page-ref is not a frame number: {page_ref[:40]!r}")
    mem_path = os.path.join(run_dir, f"dom{domid}", "memory")
    try:
        mem = GuestMemory.open(mem_path)
    except (OSError, ValueError) as exc:
        raise FbdumpError(f"cannot open guest memory {mem_path}: {exc}") from exc
    with mem:
        return read_framebuffer(mem, int(page_ref), protocol)


def _frames(mem: GuestMemory, frames) -> bytes:
    try:
        return mem.read_frames(frames)
    except (IndexError, ValueError) as exc:
        raise FbdumpError(f"guest framebuffer points outside its memory: {exc}") from exc


def read_framebuffer(mem: GuestMemory, page_ref: int, protocol: str | None) -> np.ndarray:
    """Walk the shared page's pd[] and return the picture as RGB (h, w, 3)."""
    page = _frames(mem, [page_ref])
    abi = abi_for_protocol(protocol, page)
    (_ic, _ip, _oc, _op, width, height, line_length, mem_length, depth) = \
        FB_HEADER.unpack_from(page, 0)
    fmt = GUEST_FORMATS.get(depth)
    if fmt is None:
        raise FbdumpError(f"unsupported depth {depth}")
    if not (0 < width <= MAX_DIMENSION and 0 < height <= MAX_DIMENSION):
        raise FbdumpError(f"bad framebuffer size {width}x{height}")
    if line_length < width * fmt.bytes_per_pixel:
        raise FbdumpError(f"line_length {line_length} too short for {width} px at {depth} bpp")
    fb_len = line_length * height
    if fb_len > mem_length or mem_length > abi.max_fb_len():
        raise FbdumpError(f"framebuffer of {fb_len} bytes does not fit mem_length "
                          f"{mem_length} (at most {abi.max_fb_len()} for {abi.name})")
    # pd[] describes the whole mem_length; we only need the visible part.
    n_pages = -(-fb_len // PAGE_SIZE)
    n_dirs = -(-n_pages * abi.entry_size // PAGE_SIZE)
    pd = struct.unpack_from(f"<{n_dirs}{'I' if abi.entry_size == 4 else 'Q'}",
                            page, abi.pd_offset)
    directory = np.frombuffer(_frames(mem, pd), dtype=f"<u{abi.entry_size}")[:n_pages]
    pixels = np.frombuffer(_frames(mem, [int(f) for f in directory]), dtype=np.uint8)
    rows = pixels[:fb_len].reshape(height, line_length)
    return to_rgb(rows, fmt, width, height)


def write_png(rgb: np.ndarray, out_path: str) -> None:
    from PIL import Image
    Image.fromarray(np.ascontiguousarray(rgb)).save(out_path, format="PNG")

