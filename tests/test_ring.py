"""The shared-page ring helper (pyxenfb/devices/ring.py), alone and against hostile indexes."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pyxenfb.devices import ring, xenfb_abi as abi

RINGS = [ring.FB_IN, ring.FB_OUT, ring.KBD_IN, ring.KBD_OUT]


def page():
    return np.zeros(abi.PAGE_SIZE, np.uint8)


def event(n: int) -> bytes:
    return abi.pack_event(abi.FB_UPDATE, abi.XENFB_TYPE_UPDATE, n, n + 1, 1, 1)


def test_rings_fit_their_page_and_do_not_overlap():
    for r in RINGS:
        assert r.offset >= 16 and r.offset + r.length * abi.EVENT_SIZE <= abi.PAGE_SIZE
    for a, b in ((ring.FB_IN, ring.FB_OUT), (ring.KBD_IN, ring.KBD_OUT)):
        assert a.offset + a.length * abi.EVENT_SIZE <= b.offset


@pytest.mark.parametrize("r", RINGS, ids=lambda r: r.name)
def test_produce_then_consume_round_trip_with_wrap(r):
    p = page()
    start = 0xFFFFFFFF - 2            # the free-running indexes wrap during the test
    ring.write_u32(p, r.prod_off, start)
    ring.write_u32(p, r.cons_off, start)
    got = []
    for n in range(3 * r.length):
        assert ring.produce(p, r, event(n))
        assert ring.consume(p, r, got.append) == 1
    assert got == [event(n) for n in range(3 * r.length)]
    assert ring.read_u32(p, r.prod_off) == ring.read_u32(p, r.cons_off) == (start + 3 * r.length) & 0xFFFFFFFF


@pytest.mark.parametrize("r", RINGS, ids=lambda r: r.name)
def test_produce_refuses_when_full(r):
    p = page()
    for n in range(r.length):
        assert ring.produce(p, r, event(n))
    before = p.copy()
    assert not ring.produce(p, r, event(99))
    assert np.array_equal(p, before), "a full ring is left untouched"
    got = []
    assert ring.consume(p, r, got.append) == r.length
    assert got == [event(n) for n in range(r.length)]


def test_consume_hands_out_private_copies():
    p = page()
    ring.produce(p, ring.FB_OUT, event(1))
    seen = []

    def handle(ev):
        p[ring.FB_OUT.offset:ring.FB_OUT.offset + abi.EVENT_SIZE] = 0xAA   # the guest rewrites the slot
        seen.append(ev)
    ring.consume(p, ring.FB_OUT, handle)
    assert seen == [event(1)]


def test_put_writes_without_checking_space():
    p = page()
    for n in range(ring.FB_OUT.length + 1):
        ring.put(p, ring.FB_OUT, event(n))
    assert ring.read_u32(p, ring.FB_OUT.prod_off) == ring.FB_OUT.length + 1
    with pytest.raises(ring.RingIndexError):
        ring.consume(p, ring.FB_OUT, lambda ev: None)


def test_discard_and_skip_to():
    p = page()
    ring.write_u32(p, ring.KBD_OUT.prod_off, 12345)
    ring.discard(p, ring.KBD_OUT)
    assert ring.read_u32(p, ring.KBD_OUT.cons_off) == 12345
    ring.skip_to(p, ring.KBD_OUT, 7)
    assert ring.read_u32(p, ring.KBD_OUT.cons_off) == 7


u32 = st.one_of(st.integers(0, 0xFFFFFFFF), st.sampled_from([0, 1, 24, 25, 26, 50, 51, 52,
                                                              0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]))


@settings(max_examples=300, deadline=None)
@given(r=st.sampled_from(RINGS), prod=u32, cons=u32)
def test_hostile_indexes_never_loop_or_read_outside(r, prod, cons):
    p = page()
    ring.write_u32(p, r.prod_off, prod)
    ring.write_u32(p, r.cons_off, cons)
    lo, hi = r.offset, r.offset + r.length * abi.EVENT_SIZE
    got = []
    n = (prod - cons) & 0xFFFFFFFF
    if n > r.length:
        with pytest.raises(ring.RingIndexError) as e:
            ring.consume(p, r, got.append)
        assert (e.value.prod, e.value.cons) == (prod, cons)
        assert got == [] and ring.read_u32(p, r.cons_off) == cons, "nothing consumed"
    else:
        assert ring.consume(p, r, got.append) == n == len(got)
        assert ring.read_u32(p, r.cons_off) == prod
    for i in range(max(len(got), 1)):
        assert lo <= r.slot(cons + i) and r.slot(cons + i) + abi.EVENT_SIZE <= hi
    # Producing against hostile indexes stays inside the ring too.
    ring.write_u32(p, r.cons_off, cons)
    ring.write_u32(p, r.prod_off, prod)
    before = p.copy()
    wrote = ring.produce(p, r, event(5))
    assert wrote == (n < r.length)
    changed = np.flatnonzero(p != before)
    assert all(lo <= i < hi or r.prod_off <= i < r.prod_off + 4 for i in changed)
