"""Give back the file pages only the zygote's warm-up touched.

Importing and rehearsing maps pages of every library and extension module
a device model might use (libpython, numpy, Pillow's codecs...), many of
them for import-time code that no device model runs again.  They would stay
mapped in the zygote, and count in its memory, for as long as it lives.
So after the warm-up, before the first fork, the zygote asks the kernel to
reclaim the pages of its file mappings that no other process maps
(MADV_PAGEOUT, Linux 5.4+; pages another process maps are left alone).  A
child that needs one maps it again from the page cache, or reads it from
the file the first time.

Only mappings whose every resident page is the file's own (no copy-on-write
page of this process: smaps' Anonymous is 0) are advised, so nothing of the
zygote's own data is pushed to swap.  A kernel without MADV_PAGEOUT refuses
with EINVAL, and nothing changes.
"""
from __future__ import annotations

import ctypes
import os

MADV_PAGEOUT = 21               # linux/mman.h


def clean_file_mappings(smaps_text: str) -> list[tuple[int, int]]:
    """(start, end) of the file-backed mappings that hold no anonymous page."""
    out = []
    current = None              # (start, end) of the file mapping being read, or None
    for line in smaps_text.splitlines():
        head = line.split(maxsplit=5)
        if "-" in head[0] and len(head) >= 5:           # a mapping's first line
            current = None
            if len(head) == 6 and head[5].startswith("/"):
                start, end = (int(x, 16) for x in head[0].split("-"))
                current = (start, end)
        elif head[0] == "Anonymous:" and current is not None and head[1] == "0":
            out.append(current)
    return out


def page_out_file_mappings() -> tuple[int, int]:
    """Advise each clean file mapping; (mappings advised, refused)."""
    libc = ctypes.CDLL(None)
    madvise = libc.madvise
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    with open(f"/proc/{os.getpid()}/smaps") as f:
        ranges = clean_file_mappings(f.read())
    refused = sum(madvise(start, end - start, MADV_PAGEOUT) != 0 for start, end in ranges)
    return len(ranges), refused
