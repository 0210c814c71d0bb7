"""rfb.updates.BufferPool: snapshot buffers of different sizes come and go.

The hostile-guest storm found it: with two free buffers of different sizes
(a guest resizing under a watching client), taking one out compared arrays
with == and raised, killing the client's connection.

The pool writes over a buffer only when nothing else refers to it (Raw
sends views of the snapshot), so these tests keep ids, not references, of
the buffers they give back.
"""
import numpy as np

from pyxenfb.rfb.updates import BufferPool


def test_buffers_of_different_sizes_are_reused_smallest_fit_first():
    pool = BufferPool(keep=4)
    small, big = pool.get(100_000), pool.get(2_000_000)
    ids = id(small), id(big)
    pool.put(big)
    pool.put(small)
    del small, big
    assert id(pool.get(50_000)) == ids[0]         # the smallest that fits
    assert id(pool.get(1_500_000)) == ids[1]
    assert pool.allocations == 2


def test_equal_sized_buffers_come_back_by_identity():
    pool = BufferPool(keep=4)
    a, b = pool.get(1 << 16), pool.get(1 << 16)
    a[:] = 0
    b[:] = 0                                      # equal contents too
    ids = {id(a), id(b)}
    pool.put(a)
    pool.put(b)
    del a, b
    got = pool.get(10), pool.get(10)
    assert {id(g) for g in got} == ids
    assert pool.allocations == 2


def test_the_pool_keeps_at_most_keep_and_drops_the_smallest():
    pool = BufferPool(keep=2)
    ids = []
    for n in (1 << 16, 1 << 17, 1 << 18):
        buf = np.empty(n, np.uint8)
        ids.append(id(buf))
        pool.put(buf)
    del buf
    got = [pool.get(1), pool.get(1)]
    assert [id(g) for g in got] == ids[1:]
    assert pool.allocations == 0
    pool.get(1)
    assert pool.allocations == 1                  # the smallest was let go


def test_a_buffer_still_viewed_is_never_written_over():
    """A view of a buffer given back (Raw's bytes, kept by a transport that
    could not send them yet) keeps the buffer out of the next snapshot."""
    pool = BufferPool(keep=2)
    buf = pool.get(1 << 16)
    buf[:] = 7
    held = memoryview(buf[:100]).cast("B")        # as encode_raw hands them on
    first = id(buf)
    pool.put(buf)
    del buf
    again = pool.get(1 << 16)
    assert id(again) != first and pool.allocations == 2
    again[:] = 9
    assert bytes(held) == b"\x07" * 100           # the viewed bytes are intact
    del held
    pool.put(again)
    del again
    third = pool.get(1 << 16)                     # the viewed one was let go, the other comes back
    assert pool.allocations == 2 and third[0] == 9
