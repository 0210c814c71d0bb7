"""Wire layouts of the Xen vfb/vkbd shared pages and events, defined once.

Source of truth: Xen's public headers xen/io/fbif.h and xen/io/kbdif.h (checked
against Debian's libxen-dev by tests/test_abi_headers.py).  All fields are
little-endian (x86).  Used by the backends and by the simulated guest.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from ..platform.xenconst import PAGE_SIZE  # noqa: F401  (abi.PAGE_SIZE for the guest)

# ---- XenBus states (xen/io/xenbus.h) ------------------------------------
UNKNOWN, INITIALISING, INIT_WAIT, INITIALISED, CONNECTED, CLOSING, CLOSED = range(7)
STATE_NAMES = {0: "Unknown", 1: "Initialising", 2: "InitWait", 3: "Initialised",
               4: "Connected", 5: "Closing", 6: "Closed", 7: "Reconfiguring",
               8: "Reconfigured"}

# ---- struct xenfb_page ----------------------------------------------------
FB_IN_CONS, FB_IN_PROD, FB_OUT_CONS, FB_OUT_PROD = 0, 4, 8, 12
FB_WIDTH, FB_HEIGHT, FB_LINE_LENGTH, FB_MEM_LENGTH, FB_DEPTH = 16, 20, 24, 28, 32
FB_HEADER = struct.Struct("<IIIIiiIIB")          # the fields above, offsets 0..32
FB_PD_COUNT = 256

EVENT_SIZE = 40
FB_IN_RING_OFFS, FB_IN_RING_SIZE = 1024, 1024
FB_OUT_RING_OFFS, FB_OUT_RING_SIZE = 2048, 2048
FB_IN_RING_LEN = FB_IN_RING_SIZE // EVENT_SIZE      # 25
FB_OUT_RING_LEN = FB_OUT_RING_SIZE // EVENT_SIZE    # 51

XENFB_TYPE_UPDATE = 2
XENFB_TYPE_RESIZE = 3
XENFB_TYPE_REFRESH_PERIOD = 1
XENFB_NO_REFRESH = 0

FB_UPDATE = struct.Struct("<B3xiiii")     # type, x, y, width, height
FB_RESIZE = struct.Struct("<B3xiiiii")    # type, width, height, stride, depth, offset
FB_REFRESH = struct.Struct("<B3xI")       # type, period (ms)

# ---- struct xenkbd_page ---------------------------------------------------
KBD_IN_CONS, KBD_IN_PROD, KBD_OUT_CONS, KBD_OUT_PROD = 0, 4, 8, 12
KBD_IN_RING_OFFS, KBD_IN_RING_SIZE = 1024, 2048
KBD_OUT_RING_OFFS, KBD_OUT_RING_SIZE = 3072, 1024
KBD_IN_RING_LEN = KBD_IN_RING_SIZE // EVENT_SIZE    # 51
KBD_OUT_RING_LEN = KBD_OUT_RING_SIZE // EVENT_SIZE  # 25

XENKBD_TYPE_MOTION = 1
XENKBD_TYPE_KEY = 3
XENKBD_TYPE_POS = 4
XENKBD_TYPE_MTOUCH = 5

KBD_MOTION = struct.Struct("<B3xiii")     # type, rel_x, rel_y, rel_z
KBD_KEY = struct.Struct("<BB2xI")         # type, pressed, keycode
KBD_POS = struct.Struct("<B3xiii")        # type, abs_x, abs_y, rel_z

# Raw absolute pointer range: [0, 0x7fff] (kbdif.h, feature-raw-pointer).
XENKBD_ABS_MAX = 0x7FFF

U32 = struct.Struct("<I")


@dataclass(frozen=True)
class GuestAbi:
    """Where pd[] sits and how wide a frame number is, per guest ABI."""
    name: str
    pd_offset: int
    entry_size: int

    @property
    def entry_format(self) -> str:
        return "<I" if self.entry_size == 4 else "<Q"

    @property
    def usable_pd_entries(self) -> int:
        """pd[] overlaps the in ring at 1024: only entries before it are usable."""
        return (FB_IN_RING_OFFS - self.pd_offset) // self.entry_size

    @property
    def entries_per_page(self) -> int:
        return PAGE_SIZE // self.entry_size

    def max_fb_len(self) -> int:
        """Largest framebuffer the usable pd entries can describe."""
        return self.usable_pd_entries * self.entries_per_page * PAGE_SIZE


ABI_X86_32 = GuestAbi("x86_32-abi", 36, 4)
ABI_X86_64 = GuestAbi("x86_64-abi", 40, 8)
ABI_ARM = GuestAbi("arm-abi", 40, 8)
ABIS = {a.name: a for a in (ABI_X86_32, ABI_X86_64, ABI_ARM)}


def abi_for_protocol(protocol: str | None, page: bytes) -> GuestAbi:
    """QEMU's rule (pvfb.md section 3): explicit protocol, else guess from the page.

    With no `protocol` key, the u32 at offset 40 is pd[1] of a 32-bit guest
    or the low half of pd[0] of a 64-bit one: zero means 32-bit.
    """
    if protocol is not None:
        return ABIS.get(protocol, ABI_X86_64)
    return ABI_X86_32 if U32.unpack_from(page, 40)[0] == 0 else ABI_X86_64


def ring_slot(ring_offset: int, index: int, ring_len: int) -> int:
    """Byte offset of slot `index` (free-running u32) in a ring of ring_len slots."""
    return ring_offset + (index % ring_len) * EVENT_SIZE


def pack_event(st: struct.Struct, *fields) -> bytes:
    """A whole 40-byte slot, unused bytes zero."""
    return st.pack(*fields).ljust(EVENT_SIZE, b"\0")


# What each backend advertises in its XenStore directory.  Linux's
# xen-kbdfront reads feature-abs-pointer once, when it probes, so these must be
# there before the domain is unpaused (the machine writes them before
# `running`; the backends write them again on every re-initialisation).
BACKEND_FEATURES = {
    "vfb": {"feature-resize": "1"},
    "vkbd": {"feature-abs-pointer": "1", "feature-raw-pointer": "1"},
}
