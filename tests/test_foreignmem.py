"""Simulated guest memory files and foreign mappings of their frames."""
from __future__ import annotations

import errno
import gc
import os

import numpy as np
import pytest

from pyxenfb.platform import foreignmem
from pyxenfb.platform.foreignmem import (
    MAX_FRAMES_PER_MAP,
    ForeignMemoryError,
    RealForeignMemory,
    SimForeignMemory,
)
from pyxenfb.sim.guestmem import FrameAllocator, GuestMemory, memory_path, read_frames

PAGE = 4096
DOMID = 3
NR_FRAMES = 256            # 1 MiB guest


@pytest.fixture
def run_dir(tmp_path):
    (tmp_path / f"dom{DOMID}").mkdir()
    return str(tmp_path)


@pytest.fixture
def guest(run_dir):
    mem = GuestMemory.create(memory_path(run_dir, DOMID), NR_FRAMES * PAGE)
    # Every frame starts with its own number, so a wrong frame is obvious.
    pages = mem.array.reshape(NR_FRAMES, PAGE)
    pages[:] = (np.arange(NR_FRAMES, dtype=np.uint32)[:, None] * 7 + np.arange(PAGE)) % 251
    yield mem
    mem.close()


def frame_bytes(mem: GuestMemory, f: int) -> bytes:
    return mem.frame(f).tobytes()


def vma_count() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def mapped_at(addr: int) -> bool:
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= addr < hi:
                return True
    return False


# ---- guest memory ------------------------------------------------------------

def test_guest_memory_file_layout(run_dir, guest):
    path = memory_path(run_dir, DOMID)
    assert path == os.path.join(run_dir, f"dom{DOMID}", "memory")
    assert os.path.getsize(path) == NR_FRAMES * PAGE
    assert guest.nr_frames == NR_FRAMES
    guest.frame(9)[:4] = [1, 2, 3, 4]
    with open(path, "rb") as f:
        f.seek(9 * PAGE)
        assert f.read(4) == bytes([1, 2, 3, 4])
    with GuestMemory.open(path) as other:                 # shared, not copied
        assert other.frame(9)[:4].tolist() == [1, 2, 3, 4]
        other.frame(10)[0] = 77
        assert guest.frame(10)[0] == 77


def test_guest_memory_rejects_bad_sizes_and_frames(run_dir, guest):
    with pytest.raises(ValueError):
        GuestMemory.create(os.path.join(run_dir, "odd"), 4097)
    with pytest.raises(FileExistsError):
        GuestMemory.create(memory_path(run_dir, DOMID), PAGE)
    for bad in (-1, NR_FRAMES, 2**40):
        with pytest.raises(IndexError):
            guest.frame(bad)
        with pytest.raises(IndexError):
            guest.read_frames([1, bad])


def test_read_frames(run_dir, guest):
    frames = [200, 3, 77]
    expected = b"".join(frame_bytes(guest, f) for f in frames)
    assert guest.read_frames(frames) == expected
    assert read_frames(memory_path(run_dir, DOMID), frames) == expected


def test_close_with_views_still_alive_is_safe(run_dir):
    mem = GuestMemory.create(os.path.join(run_dir, "m"), 4 * PAGE)
    view = mem.frame(2)
    mem.close()
    mem.close()
    view[0] = 5                        # the mapping lives as long as the view
    assert view[0] == 5


def test_frame_allocator_scatters_deterministically():
    a = FrameAllocator(1024, seed=1)
    frames = a.alloc(100)
    assert len(set(frames)) == 100 and 0 not in frames
    assert all(1 <= f < 1024 for f in frames)
    assert frames != sorted(frames)                       # scattered
    assert FrameAllocator(1024, seed=1).alloc(100) == frames
    assert FrameAllocator(1024, seed=2).alloc(100) != frames
    assert a.free_count == 1023 - 100
    a.free(frames[:10])
    with pytest.raises(ValueError):
        a.free(frames[:1])                                # double free
    with pytest.raises(ValueError):
        a.free([0])                                       # never allocated
    rest = a.alloc(a.free_count)
    assert len(set(rest) | set(frames[10:])) == 1023
    with pytest.raises(MemoryError):
        a.alloc(1)


# ---- simulated foreign mappings ---------------------------------------------

def test_map_scattered_frames_gives_exactly_those_bytes(run_dir, guest):
    # Scattered, plus a run of consecutive frames and a repeated frame.
    frames = FrameAllocator(NR_FRAMES, seed=5).alloc(40) + [0, 17, 17, 18, 19, 30]
    fm = SimForeignMemory(run_dir)
    with fm.map(DOMID, frames) as m:
        assert m.array.dtype == np.uint8
        assert m.array.shape == (len(frames) * PAGE,)
        assert m.array.tobytes() == b"".join(frame_bytes(guest, f) for f in frames)


def test_guest_and_backend_writes_are_visible_both_ways(run_dir, guest):
    frames = [100, 5, 60]
    fm = SimForeignMemory(run_dir)
    with fm.map(DOMID, frames, writable=True) as m:
        guest.frame(5)[123] = 0xAB                       # guest writes...
        assert m.array[PAGE + 123] == 0xAB               # ...backend sees it live
        m.array[2 * PAGE:2 * PAGE + 3] = [9, 8, 7]       # backend writes...
        assert guest.frame(60)[:3].tolist() == [9, 8, 7]  # ...guest sees it
        rows = m.array.reshape(-1, 1024, 4)              # zero-copy pixel view
        assert np.shares_memory(rows, m.array)


def test_read_only_mapping_refuses_writes(run_dir, guest):
    fm = SimForeignMemory(run_dir)
    with fm.map(DOMID, [1, 2]) as m:
        assert not m.array.flags.writeable
        with pytest.raises(ValueError):
            m.array[0] = 1
        with pytest.raises(ValueError):
            m.array.flags.writeable = True               # cannot be switched back on
        guest.frame(2)[0] = 42
        assert m.array[PAGE] == 42                       # still a live view


def test_bad_frame_is_named_and_nothing_stays_mapped(run_dir, guest):
    fm = SimForeignMemory(run_dir)
    before = vma_count()
    with pytest.raises(ForeignMemoryError) as e:
        fm.map(DOMID, [1, 2, NR_FRAMES + 5, 3])
    assert e.value.errno == errno.EINVAL
    assert f"frame {NR_FRAMES + 5}" in str(e.value)
    for bad in ([], [-1], ["1"], [2**60]):
        with pytest.raises(ForeignMemoryError):
            fm.map(DOMID, bad)
    with pytest.raises(ForeignMemoryError) as e:
        fm.map(99, [1])
    assert "dom99" in str(e.value) and e.value.errno == errno.ENOENT
    assert vma_count() == before


def test_failure_midway_unmaps_what_was_mapped(run_dir, guest):
    fm = SimForeignMemory(run_dir)
    real_libc = fm._libc
    calls = []

    class FailingThirdFrame:           # the reservation, two frames, then ENOMEM
        munmap = real_libc.munmap

        def mmap(self, *args):
            calls.append(args)
            if len(calls) == 4:
                fm._ffi.errno = errno.ENOMEM
                return foreignmem.MAP_FAILED
            return real_libc.mmap(*args)

    fm._libc = FailingThirdFrame()
    before = vma_count()
    with pytest.raises(ForeignMemoryError) as e:
        fm.map(DOMID, [10, 20, 30, 40])
    assert e.value.errno == errno.ENOMEM and "frame 30" in str(e.value)
    assert vma_count() == before
    assert not mapped_at(calls[1][0])          # the first frame's slot


def test_too_many_frames_in_one_call(run_dir, guest):
    with pytest.raises(ForeignMemoryError) as e:
        SimForeignMemory(run_dir).map(DOMID, [1] * (MAX_FRAMES_PER_MAP + 1))
    assert e.value.errno == errno.E2BIG


def test_close_unmaps_the_whole_range(run_dir, guest):
    fm = SimForeignMemory(run_dir)
    before = vma_count()
    m = fm.map(DOMID, [9, 200, 31, 4])
    addr = m.array.ctypes.data
    assert mapped_at(addr) and mapped_at(addr + 4 * PAGE - 1)
    assert vma_count() > before
    m.close()
    m.close()                                            # idempotent
    assert m.closed and m.array.size == 0
    assert not mapped_at(addr) and not mapped_at(addr + 4 * PAGE - 1)
    assert vma_count() == before


def test_array_outliving_its_mapping_object_stays_valid(run_dir, guest):
    fm = SimForeignMemory(run_dir)
    before = vma_count()
    array = fm.map(DOMID, [7, 8]).array                  # mapping object dropped
    gc.collect()
    assert array.tobytes() == frame_bytes(guest, 7) + frame_bytes(guest, 8)
    addr = array.ctypes.data
    del array
    gc.collect()
    assert not mapped_at(addr)
    assert vma_count() == before


def test_map_unmap_cycles_do_not_leak(run_dir, guest):
    fm = SimForeignMemory(run_dir)
    frames = FrameAllocator(NR_FRAMES, seed=9).alloc(64)
    for _ in range(5):                                   # warm up allocator VMAs
        fm.map(DOMID, frames).close()
    before = vma_count()
    for i in range(300):
        with fm.map(DOMID, frames, writable=bool(i % 2)) as m:
            assert m.array[0] == guest.frame(frames[0])[0]
    assert vma_count() == before


def test_guest_memory_deleted_while_mapped_stays_readable(run_dir, guest):
    fm = SimForeignMemory(run_dir)
    with fm.map(DOMID, [11]) as m:
        os.unlink(memory_path(run_dir, DOMID))           # `destroy` while mapped
        assert m.array.tobytes() == frame_bytes(guest, 11)


# ---- real libxenforeignmemory ----------------------------------------------

def test_libxenforeignmemory_loads():
    _ffi, lib = foreignmem._load_libxenforeignmemory()
    assert lib.xenforeignmemory_map is not None


@pytest.mark.skipif(os.path.exists("/dev/xen"), reason="a real Xen is present")
def test_real_foreign_memory_without_xen_is_a_readable_oserror():
    with pytest.raises(OSError) as e:
        RealForeignMemory()
    assert e.value.errno == errno.ENOENT
    assert "privcmd" in str(e.value)


# ---- dm_restrict ------------------------------------------------------------------

def test_restricted_handle_maps_only_its_domain_through_a_held_fd(run_dir, guest, tmp_path):
    """As privcmd after IOCTL_PRIVCMD_RESTRICT: other domains EPERM, another
    restriction EINVAL; the one guest's memory was opened at restrict time,
    so its frames still map when the run dir is out of reach (a chroot)."""
    other = tmp_path / f"dom{DOMID + 1}"
    other.mkdir()
    GuestMemory.create(memory_path(run_dir, DOMID + 1), 16 * PAGE).close()
    fmem = SimForeignMemory(run_dir)
    fmem.restrict(DOMID)
    fmem.restrict(DOMID)                      # the same domain again is fine
    with pytest.raises(OSError) as info:
        fmem.restrict(DOMID + 1)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(ForeignMemoryError) as info:
        fmem.map(DOMID + 1, [0])
    assert info.value.errno == errno.EPERM
    os.rename(os.path.join(run_dir, f"dom{DOMID}"), os.path.join(run_dir, "elsewhere"))
    with fmem.map(DOMID, [5, 9], writable=True) as m:
        assert m.array[:PAGE].tobytes() == frame_bytes(guest, 5)
        m.array[PAGE] = 42                    # writes reach the guest
        assert guest.frame(9)[0] == 42
    fmem.close()
    with pytest.raises(ForeignMemoryError):   # unrestricted again, and the path is gone
        fmem.map(DOMID, [0])
