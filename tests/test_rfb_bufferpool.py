"""rfb.updates.BufferPool: snapshot buffers of different sizes come and go.

The hostile-guest storm found it: with two free buffers of different sizes
(a guest resizing under a watching client), taking one out compared arrays
with == and raised, killing the client's connection.
"""
import numpy as np

from pyxenfb.rfb.updates import BufferPool


def test_buffers_of_different_sizes_are_reused_smallest_fit_first():
    pool = BufferPool(keep=4)
    small, big = pool.get(100_000), pool.get(2_000_000)
    pool.put(big)
    pool.put(small)
    assert pool.get(50_000) is small              # the smallest that fits
    assert pool.get(1_500_000) is big
    assert pool.allocations == 2


def test_equal_sized_buffers_come_back_by_identity():
    pool = BufferPool(keep=4)
    a, b = pool.get(1 << 16), pool.get(1 << 16)
    a[:] = 0
    b[:] = 0                                      # equal contents too
    pool.put(a)
    pool.put(b)
    assert {id(pool.get(10)), id(pool.get(10))} == {id(a), id(b)}


def test_the_pool_keeps_at_most_keep_and_drops_the_smallest():
    pool = BufferPool(keep=2)
    bufs = [np.empty(n, np.uint8) for n in (1 << 16, 1 << 17, 1 << 18)]
    for buf in bufs:
        pool.put(buf)
    assert pool.get(1) is bufs[1] and pool.get(1) is bufs[2]
    assert pool.allocations == 0
    pool.get(1)
    assert pool.allocations == 1                  # the smallest was let go
