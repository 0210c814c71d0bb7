"""Map a list of guest frames into one contiguous, zero-copy numpy view.

* `RealForeignMemory` — libxenforeignmemory.so.1 (cffi ABI mode, dlopen-ed
  only when constructed); needs a privileged Xen domain.
* `SimForeignMemory` — the simulated host: the guest's RAM is the file
  DIR/dom<N>/memory (frame f at offset f*4096).  One address range is
  reserved (PROT_NONE), then each frame is mmap-ed over its slot with
  MAP_FIXED|MAP_SHARED: the same single contiguous result the real call
  gives, and guest writes show up live.

A `ForeignMapping.array` must not be touched after `close()`: the memory
behind it is gone and access would crash the process.
"""
from __future__ import annotations

import errno
import mmap
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from ..util.lazylib import LazyLibrary
from .xenconst import PAGE_SIZE

# Bounds the work (and the VMAs) of one map call: 1 GiB of guest memory.
MAX_FRAMES_PER_MAP = 262144
MAX_FRAME = (1 << 52) - 1          # x86-64 physical address width / page size

# Linux values missing from Python's mmap module (x86 and arm, Xen's arches).
MAP_FIXED = getattr(mmap, "MAP_FIXED", 0x10)
PROT_NONE = 0


class ForeignMemoryError(OSError):
    """A frame could not be mapped; the message names it."""


class ForeignMapping:
    """A contiguous mapping of guest frames; `array` is uint8, 4096*len(frames).

    `ptr` is a cffi pointer made with ffi.gc(): the memory is unmapped by
    close(), or else when the last view of it (array included) is garbage —
    so an array that outlives its mapping object never dangles.
    """

    def __init__(self, ffi, ptr, size: int, writable: bool, frames: Sequence[int]):
        self._ffi = ffi
        self._ptr = ptr
        self.frames = tuple(frames)
        self.writable = writable
        buf = ffi.buffer(ptr, size)           # keeps ptr (and the mapping) alive
        if not writable:
            # A read-only base buffer: numpy refuses writes and refuses to be
            # switched back to writeable.
            buf = memoryview(buf).toreadonly()
        self.array: np.ndarray = np.frombuffer(buf, dtype=np.uint8)

    @property
    def closed(self) -> bool:
        return self._ptr is None

    def close(self) -> None:
        """Unmap now (idempotent).  The array must not be used afterwards."""
        ptr, self._ptr = self._ptr, None
        if ptr is not None:
            self.array = np.empty(0, dtype=np.uint8)
            self._ffi.release(ptr)            # runs the unmap destructor once

    def __enter__(self) -> ForeignMapping:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ForeignMemory(ABC):
    @abstractmethod
    def map(self, domid: int, frames: Sequence[int], writable: bool = False) -> ForeignMapping:
        """Map `frames` of domain `domid`; raises ForeignMemoryError naming a bad frame."""

    def restrict(self, domid: int) -> None:
        """From now on map only frames of `domid` (xenforeignmemory_restrict;
        dm_restrict).  As privcmd: restricting again to the same domain is
        fine, to another EINVAL; mapping another domain's frames EPERM."""
        raise OSError(errno.ENOSYS, f"{type(self).__name__} cannot be restricted")

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_request(domid: int, frames: Sequence[int]) -> list[int]:
    if not isinstance(domid, int) or not 0 <= domid <= 0xFFFF:
        raise ForeignMemoryError(errno.EINVAL, f"bad domain id {domid!r}")
    frames = list(frames)
    if not frames:
        raise ForeignMemoryError(errno.EINVAL, "no frames to map")
    if len(frames) > MAX_FRAMES_PER_MAP:
        raise ForeignMemoryError(errno.E2BIG, f"{len(frames)} frames in one map, "
                                              f"at most {MAX_FRAMES_PER_MAP}")
    for i, f in enumerate(frames):
        if not isinstance(f, (int, np.integer)) or not 0 <= f <= MAX_FRAME:
            raise ForeignMemoryError(errno.EINVAL, f"dom{domid}: bad frame number {f!r} "
                                                   f"(entry {i})")
    return [int(f) for f in frames]


# ---- simulated host ----------------------------------------------------------

MAP_FAILED = (1 << 64) - 1
def _open_libc():
    from ._xen_ffi import ffi      # generated from xen_cdefs.LIBC
    return ffi, ffi.dlopen(None)


_load_libc = LazyLibrary(_open_libc)


class SimForeignMemory(ForeignMemory):
    """Foreign mappings of a simulated host's guests (run dir `run_dir`)."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self._ffi, self._libc = _load_libc()
        self._restricted: tuple[int, int] | None = None   # (domid, fd of its memory)

    def memory_path(self, domid: int) -> str:
        return os.path.join(self.run_dir, f"dom{domid}", "memory")

    def restrict(self, domid: int) -> None:
        """The sim's privcmd restriction: the one guest's memory file is
        opened now (before a chroot hides the run dir) and every later map
        goes through that fd; other domains are refused, as privcmd does."""
        if self._restricted is not None:
            if self._restricted[0] != domid:
                raise OSError(errno.EINVAL, f"foreign memory already restricted to "
                                            f"dom{self._restricted[0]}")
            return
        _check_request(domid, [0])
        path = self.memory_path(domid)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise OSError(e.errno, f"dom{domid}: cannot open guest memory {path}: "
                                   f"{e.strerror}") from None
        self._restricted = (domid, fd)

    def close(self) -> None:
        if self._restricted is not None:
            os.close(self._restricted[1])     # live mappings keep the file themselves
            self._restricted = None

    def map(self, domid: int, frames: Sequence[int], writable: bool = False) -> ForeignMapping:
        frames = _check_request(domid, frames)
        if self._restricted is not None:
            if domid != self._restricted[0]:
                raise ForeignMemoryError(errno.EPERM, f"dom{domid}: this handle is restricted "
                                                      f"to dom{self._restricted[0]}")
            fd = os.dup(self._restricted[1])
        else:
            path = self.memory_path(domid)
            try:
                fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
            except OSError as e:
                raise ForeignMemoryError(e.errno, f"dom{domid}: cannot open guest memory "
                                                  f"{path}: {e.strerror}") from None
        try:
            nr_frames = os.fstat(fd).st_size // PAGE_SIZE
            for i, f in enumerate(frames):
                if f >= nr_frames:
                    raise ForeignMemoryError(errno.EINVAL, f"dom{domid}: frame {f} (entry {i}) "
                                                           f"is outside guest memory "
                                                           f"({nr_frames} frames)")
            return self._stitch(fd, frames, writable)
        finally:
            os.close(fd)   # the mappings keep the file alive

    def _stitch(self, fd: int, frames: list[int], writable: bool) -> ForeignMapping:
        ffi, libc = self._ffi, self._libc
        size = len(frames) * PAGE_SIZE
        base = libc.mmap(0, size, PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        if base == MAP_FAILED:
            err = ffi.errno
            raise ForeignMemoryError(err, f"cannot reserve {size} bytes: {os.strerror(err)}")
        base_ptr = ffi.cast("void *", base)
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        try:
            for i, count in _runs(frames):
                want = base + i * PAGE_SIZE
                got = libc.mmap(want, count * PAGE_SIZE, prot, mmap.MAP_SHARED | MAP_FIXED,
                                fd, frames[i] * PAGE_SIZE)
                if got != want:
                    err = ffi.errno if got == MAP_FAILED else errno.EFAULT
                    raise ForeignMemoryError(err, f"cannot map frame {frames[i]} (entry {i}): "
                                                  f"{os.strerror(err)}")
        except BaseException:
            libc.munmap(base_ptr, size)
            raise
        ptr = ffi.gc(base_ptr, lambda p: libc.munmap(p, size))
        return ForeignMapping(ffi, ptr, size, writable, frames)


def _runs(frames: list[int]):
    """(start index, length) of runs of consecutive frame numbers: one mmap each."""
    start = 0
    for i in range(1, len(frames) + 1):
        if i == len(frames) or frames[i] != frames[i - 1] + 1:
            yield start, i - start
            start = i


# ---- real Xen ----------------------------------------------------------------

def _open_libxenforeignmemory():
    from ._xen_ffi import ffi      # generated from xen_cdefs.FOREIGNMEMORY
    return ffi, ffi.dlopen("libxenforeignmemory.so.1")


_load_libxenforeignmemory = LazyLibrary(_open_libxenforeignmemory)


class RealForeignMemory(ForeignMemory):
    """Foreign mappings through /dev/xen/privcmd (libxenforeignmemory).

    Mappings must be unmapped before the handle is closed, so close() only
    marks the handle; it is really closed once the last mapping is gone.
    """

    def __init__(self) -> None:
        self._ffi, self._lib = _load_libxenforeignmemory()
        handle = self._lib.xenforeignmemory_open(self._ffi.NULL, 0)
        if handle == self._ffi.NULL:
            err = self._ffi.errno
            raise OSError(err, "cannot open the Xen privileged command interface "
                               f"/dev/xen/privcmd (xenforeignmemory_open): {os.strerror(err)}")
        self._handle = handle
        self._closing = False
        self._live_mappings = 0

    def map(self, domid: int, frames: Sequence[int], writable: bool = False) -> ForeignMapping:
        if self._closing:
            raise ValueError("foreign memory handle is closed")
        frames = _check_request(domid, frames)
        ffi, lib, handle = self._ffi, self._lib, self._handle
        n = len(frames)
        arr = ffi.new("unsigned long[]", frames)
        errs = ffi.new("int[]", n)
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        ptr = lib.xenforeignmemory_map(handle, domid, prot, n, arr, errs)
        if ptr == ffi.NULL:
            err = ffi.errno
            raise ForeignMemoryError(err, f"dom{domid}: cannot map {n} frames "
                                          f"(first {frames[0]}): {os.strerror(err)}")
        for i in range(n):
            if errs[i]:
                lib.xenforeignmemory_unmap(handle, ptr, n)
                err = abs(errs[i])
                raise ForeignMemoryError(err, f"dom{domid}: cannot map frame {frames[i]} "
                                              f"(entry {i}): {os.strerror(err)}")
        self._live_mappings += 1
        ptr = ffi.gc(ptr, lambda p: self._unmap(p, n))
        return ForeignMapping(ffi, ptr, n * PAGE_SIZE, writable, frames)

    def restrict(self, domid: int) -> None:
        if self._closing:
            raise ValueError("foreign memory handle is closed")
        if self._lib.xenforeignmemory_restrict(self._handle, domid) < 0:
            err = self._ffi.errno
            raise OSError(err, f"xenforeignmemory_restrict(dom {domid}): {os.strerror(err)}")

    def _unmap(self, ptr, pages: int) -> None:
        self._lib.xenforeignmemory_unmap(self._handle, ptr, pages)
        self._live_mappings -= 1
        self._close_if_idle()

    def _close_if_idle(self) -> None:
        if self._closing and self._live_mappings == 0 and self._handle is not None:
            handle, self._handle = self._handle, None
            self._lib.xenforeignmemory_close(handle)

    def close(self) -> None:
        if getattr(self, "_handle", None) is not None:
            self._closing = True
            self._close_if_idle()
