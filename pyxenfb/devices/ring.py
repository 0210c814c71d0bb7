"""The shared-page rings of vfb and vkbd, consumed and produced in one place.

Each ring is a (cons, prod) pair of free-running u32 indexes in the shared
page plus `length` 40-byte slots (xen/io/fbif.h, kbdif.h).  The backend and
the simulated guest both use these helpers, each as producer of one ring and
consumer of the other.

The other side is hostile: its producer index is read once and checked
against our consumer index before any slot is touched (so a bad index can
neither make us loop nor read outside the ring), and every event is copied
out of shared memory before it is parsed.  Slot reads come before the
consumer index is published, and slot writes before the producer index, in
program order; numpy stores are plain stores and x86 (TSO) keeps that order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import xenfb_abi as abi

U32_MASK = 0xFFFFFFFF


@dataclass(frozen=True)
class Ring:
    """Where one ring's indexes and slots sit in its shared page."""
    name: str
    cons_off: int
    prod_off: int
    offset: int          # byte offset of slot 0
    length: int          # number of EVENT_SIZE slots

    def slot(self, index: int) -> int:
        return abi.ring_slot(self.offset, index, self.length)


FB_IN = Ring("vfb in", abi.FB_IN_CONS, abi.FB_IN_PROD, abi.FB_IN_RING_OFFS, abi.FB_IN_RING_LEN)
FB_OUT = Ring("vfb out", abi.FB_OUT_CONS, abi.FB_OUT_PROD, abi.FB_OUT_RING_OFFS, abi.FB_OUT_RING_LEN)
KBD_IN = Ring("vkbd in", abi.KBD_IN_CONS, abi.KBD_IN_PROD, abi.KBD_IN_RING_OFFS, abi.KBD_IN_RING_LEN)
KBD_OUT = Ring("vkbd out", abi.KBD_OUT_CONS, abi.KBD_OUT_PROD, abi.KBD_OUT_RING_OFFS,
               abi.KBD_OUT_RING_LEN)


class RingIndexError(ValueError):
    """The indexes claim more pending events than the ring holds."""

    def __init__(self, ring: Ring, prod: int, cons: int):
        super().__init__(f"{ring.name} ring indexes prod={prod} cons={cons} are inconsistent")
        self.ring, self.prod, self.cons = ring, prod, cons


def read_u32(page: np.ndarray, off: int) -> int:
    """One read of a shared u32: callers use the value, never re-read it."""
    return int(page[off:off + 4].view("<u4")[0])


def write_u32(page: np.ndarray, off: int, value: int) -> None:
    page[off:off + 4].view("<u4")[0] = value & U32_MASK


def pending(prod: int, cons: int) -> int:
    """Events between cons and prod, modulo 2**32."""
    return (prod - cons) & U32_MASK


def consume(page: np.ndarray, ring: Ring, handle: Callable[[bytes], None]) -> int:
    """Hand every pending event (a private copy) to `handle`, then publish cons.

    Returns how many were handled.  Raises RingIndexError, with nothing
    consumed, when prod is more than a ring's length ahead of cons."""
    prod, cons = read_u32(page, ring.prod_off), read_u32(page, ring.cons_off)
    count = pending(prod, cons)
    if count > ring.length:
        raise RingIndexError(ring, prod, cons)
    for _ in range(count):
        off = ring.slot(cons)
        handle(bytes(page[off:off + abi.EVENT_SIZE]))     # copy once, then parse
        cons = (cons + 1) & U32_MASK
    write_u32(page, ring.cons_off, cons)
    return count


def skip_to(page: np.ndarray, ring: Ring, prod: int) -> None:
    """Resynchronise: everything up to `prod` counts as consumed."""
    write_u32(page, ring.cons_off, prod)


def discard(page: np.ndarray, ring: Ring) -> None:
    """Consume a ring whose events we do not read (no types are defined for it)."""
    skip_to(page, ring, read_u32(page, ring.prod_off))


def _write(page: np.ndarray, ring: Ring, prod: int, event: bytes) -> None:
    off = ring.slot(prod)
    page[off:off + abi.EVENT_SIZE] = np.frombuffer(event, np.uint8)
    write_u32(page, ring.prod_off, prod + 1)


def put(page: np.ndarray, ring: Ring, event: bytes) -> None:
    """Write one slot at prod and publish prod + 1, without checking for space
    (the simulated guest's raw injection)."""
    _write(page, ring, read_u32(page, ring.prod_off), event)


def produce(page: np.ndarray, ring: Ring, event: bytes) -> bool:
    """Add one event if there is room; False (nothing written) when full."""
    prod, cons = read_u32(page, ring.prod_off), read_u32(page, ring.cons_off)
    if pending(prod, cons) >= ring.length:
        return False
    _write(page, ring, prod, event)
    return True
