"""Guest RAM of a simulated domain: a plain file, frame f at offset f*4096.

The file is DIR/dom<N>/memory (docs/interfaces.md); the run directory should
be on tmpfs so the "RAM" is really shared memory.  The toolstack creates it,
the reference guest maps all of it (`GuestMemory`) and hands out frames with
a `FrameAllocator` (shuffled, so a framebuffer is scattered like real guest
memory), and backends map single frames of it through
pyxenfb.platform.foreignmem.SimForeignMemory.
"""
from __future__ import annotations

import mmap
import os
import random
from collections.abc import Iterable

import numpy as np

from ..devices.xenfb_abi import PAGE_SIZE

# Frame numbers are offsets into a file; keep them below what fits in an off_t
# page count with room to spare (16 TiB of "RAM").
MAX_FRAMES = 1 << 32


def memory_path(run_dir: str, domid: int) -> str:
    """Where domain `domid`'s RAM file lives in a simulated host's run dir."""
    return os.path.join(run_dir, f"dom{domid}", "memory")


class GuestMemory:
    """A guest's whole RAM, mmap-ed shared: writes are seen by every mapper."""

    def __init__(self, path: str, mm: mmap.mmap):
        self.path = path
        self._mmap: mmap.mmap | None = mm
        self.nr_frames = len(mm) // PAGE_SIZE
        self.array: np.ndarray = np.frombuffer(mm, dtype=np.uint8)

    @classmethod
    def create(cls, path: str, size: int, *, exist_ok: bool = False) -> GuestMemory:
        """A new zero-filled RAM file of `size` bytes (a multiple of 4096)."""
        if size <= 0 or size % PAGE_SIZE or size // PAGE_SIZE > MAX_FRAMES:
            raise ValueError(f"guest memory size {size} must be a positive multiple "
                             f"of {PAGE_SIZE} up to {MAX_FRAMES} frames")
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (0 if exist_ok else os.O_EXCL)
        fd = os.open(path, flags, 0o600)
        try:
            os.ftruncate(fd, size)     # sparse: pages cost nothing until touched
            return cls(path, mmap.mmap(fd, size, mmap.MAP_SHARED))
        finally:
            os.close(fd)

    @classmethod
    def open(cls, path: str) -> GuestMemory:
        """Map an existing RAM file."""
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if size <= 0 or size % PAGE_SIZE:
                raise ValueError(f"{path}: size {size} is not a positive multiple of {PAGE_SIZE}")
            return cls(path, mmap.mmap(fd, size, mmap.MAP_SHARED))
        finally:
            os.close(fd)

    def _check_frame(self, frame: int) -> int:
        if not isinstance(frame, (int, np.integer)) or not 0 <= frame < self.nr_frames:
            raise IndexError(f"frame {frame!r} outside guest memory {self.path} "
                             f"({self.nr_frames} frames)")
        return int(frame)

    def frame(self, frame: int) -> np.ndarray:
        """A writable 4096-byte view of one frame."""
        f = self._check_frame(frame)
        return self.array[f * PAGE_SIZE:(f + 1) * PAGE_SIZE]

    def read_frames(self, frames: Iterable[int]) -> bytes:
        """A copy of the given frames, concatenated in order."""
        frames = [self._check_frame(f) for f in frames]
        pages = self.array.reshape(self.nr_frames, PAGE_SIZE)
        return pages[np.asarray(frames, dtype=np.int64)].tobytes()

    def close(self) -> None:
        """Drop this object's mapping.

        Views handed out earlier (array, frame()) keep the memory mapped until
        they are garbage; the mapping goes away with the last of them.
        """
        mm, self._mmap = self._mmap, None
        if mm is None:
            return
        self.array = np.empty(0, dtype=np.uint8)
        try:
            mm.close()
        except BufferError:
            pass          # views still exported; unmapped when they are freed

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_frames(path: str, frames: Iterable[int]) -> bytes:
    """Read frames straight from a RAM file (tools such as fbdump)."""
    with GuestMemory.open(path) as mem:
        return mem.read_frames(frames)


class FrameAllocator:
    """Free frames of a guest, handed out in a shuffled order fixed by `seed`.

    Frame 0 is never handed out (a zero frame number is easy to mistake for
    "unset" in a shared page).
    """

    def __init__(self, nr_frames: int, seed: int = 0):
        if not 2 <= nr_frames <= MAX_FRAMES:
            raise ValueError(f"bad frame count {nr_frames}")
        self.nr_frames = nr_frames
        self._free = list(range(1, nr_frames))
        random.Random(seed).shuffle(self._free)
        self._used: set[int] = set()

    @property
    def free_count(self) -> int:
        return len(self._free)

    def alloc(self, n: int = 1) -> list[int]:
        if n < 0:
            raise ValueError(f"cannot allocate {n} frames")
        if n > len(self._free):
            raise MemoryError(f"guest out of memory: {n} frames wanted, "
                              f"{len(self._free)} free")
        frames = self._free[len(self._free) - n:]
        del self._free[len(self._free) - n:]
        frames.reverse()
        self._used.update(frames)
        return frames

    def free(self, frames: Iterable[int]) -> None:
        frames = list(frames)
        for f in frames:
            if f not in self._used:
                raise ValueError(f"frame {f} is not allocated")
        if len(set(frames)) != len(frames):
            raise ValueError("frame freed twice in one call")
        self._used.difference_update(frames)
        self._free.extend(reversed(frames))
