"""The VNC server's snapshot buffer pool with buffers of several sizes (after
a guest resize): taking one out must not compare arrays element-wise."""
from pyxenfb.rfb.server import BufferPool


def test_pool_with_buffers_of_two_sizes():
    pool = BufferPool(keep=2)
    big, small = pool.get(480000), pool.get(307200)
    pool.put(big)
    pool.put(small)
    assert pool.get(300000) is small          # the smallest that fits, found by identity
    assert pool.get(400000) is big
    pool.put(big)
    pool.put(small)
    third = pool.get(600000)
    pool.put(third)                           # over `keep`: the smallest goes
    assert pool.get(1) is big and pool.get(1) is third
