"""Dump a simulated guest's framebuffer straight from its RAM file.

Independent of the backend (pyxenfb/xenfb.py) on purpose: this is the
ground truth tests compare a VNC or SDL picture against.  It reads the vfb
frontend's `page-ref` and `protocol` through the project's XenStore client
(on a loop of its own, so it works from sync code and from inside a running
loop), the shared page from DIR/dom<N>/memory, walks pd[] for the guest's
ABI, gathers the framebuffer frames and converts the picture to RGB.

Everything read from the guest is checked: this is a tool, so bad values
raise `FbdumpError` with a readable reason rather than a wrong picture.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import os
import struct

import numpy as np

from ..convert import GUEST_FORMATS, to_rgb
from ..devices.xenfb_abi import FB_HEADER, PAGE_SIZE, abi_for_protocol
from ..platform.xenstore import XenStore
from .guestmem import GuestMemory
from .rundir import ToolstackError, resolve_run_dir

MAX_DIMENSION = 16384          # a guest claiming more is lying
XS_TIMEOUT = 5.0


class FbdumpError(ToolstackError):
    """Why no picture could be read; str() is one line for the user."""


async def read_frontend_keys(sock_path: str, fe: str) -> tuple[str | None, str | None]:
    """(page-ref, protocol) of the vfb frontend at `fe`; None where a node is missing."""
    try:
        xs = await asyncio.wait_for(XenStore.open(sock_path), XS_TIMEOUT)
    except (OSError, asyncio.TimeoutError) as exc:
        raise FbdumpError(f"cannot reach XenStore at {sock_path}: {exc}") from exc
    try:
        return await asyncio.wait_for(
            asyncio.gather(xs.read_str(f"{fe}/page-ref"), xs.read_str(f"{fe}/protocol")),
            XS_TIMEOUT)
    except (OSError, asyncio.TimeoutError) as exc:
        raise FbdumpError(f"cannot read {fe} from XenStore at {sock_path}: "
                          f"{exc or 'timed out'}") from exc
    finally:
        xs.close()


def _run_sync(coro_fn, *args):
    """Run an async read to completion from sync code, also when called from
    inside a running loop (a test's coroutine): then in a thread of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro_fn(*args))
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fbdump") as pool:
        return pool.submit(asyncio.run, coro_fn(*args)).result()


def fbdump_array(run_dir: str | os.PathLike | None, domid: int) -> np.ndarray:
    """The guest's visible framebuffer as an (height, width, 3) uint8 RGB array."""
    run_dir = resolve_run_dir(run_dir)
    fe = f"/local/domain/{domid}/device/vfb/0"
    sock_path = os.path.join(run_dir, "xenstored.sock")
    page_ref, protocol = _run_sync(read_frontend_keys, sock_path, fe)
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

