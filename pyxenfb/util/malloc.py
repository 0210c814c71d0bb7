"""glibc malloc settings that keep a device model's resident memory down.

Each thread that allocates gets a glibc arena of its own, and memory freed
in an arena mostly stays resident: with the encoder threads, a DM serving a
few clients one after another grew by ~20 MB that way (measured on the
sim: 46 -> 66 MB over five encodings; 55 MB with one arena).  Nothing here
allocates fast enough from several threads for one arena's lock to matter.
Without glibc (or ctypes) these are no-ops.
"""
from __future__ import annotations

import ctypes
import functools
import time

M_ARENA_MAX = -8            # mallopt parameter (malloc.h)


@functools.cache
def _libc():
    """The C library already in the process (no file lookup: this also runs
    inside a dm_restrict chroot)."""
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def limit_arenas(count: int = 1) -> bool:
    """Before any thread starts: all threads share `count` arenas."""
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    return bool(mallopt and mallopt(M_ARENA_MAX, count) == 1)


def trim() -> None:
    """Give freed heap memory back to the system (after a client has gone:
    its frame-sized buffers and zlib streams)."""
    libc = _libc()
    malloc_trim = getattr(libc, "malloc_trim", None)
    if malloc_trim is not None:
        malloc_trim(0)


class PeriodicTrim:
    """`trim()` at most once per `interval` seconds while updates flow.

    An update's temporaries (pixel bytes, deflate output: tens to hundreds
    of KiB each, sizes varying with the picture) fragment the heap: freed
    but resident memory grew by ~2 MB/s to ~12 MB in a DM serving one
    animating Tight client.  Trimming once a second returns it; what the
    next updates need is faulted back in, which costs far less than the
    per-allocation mmap/munmap a low M_MMAP_THRESHOLD would mean (Hextile
    3 -> 11 ms per 1024x768 update measured that way)."""

    def __init__(self, interval: float = 1.0, clock=time.monotonic):
        self.interval = interval
        self.clock = clock
        self.trims = 0
        self._last = clock()

    def __call__(self) -> bool:
        now = self.clock()
        if now - self._last < self.interval:
            return False
        self._last = now
        trim()
        self.trims += 1
        return True
