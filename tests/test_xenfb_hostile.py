"""A hostile guest against the backends (CVE-2008-1943/1944 class, XSA-155).

Hypothesis writes anything into the shared page, pd[] entries, directory
pages, ring indexes and events.  Whatever it writes: no exception escapes,
nothing is read outside a mapping, and a second domain served by the same
process keeps working.  PYXENFB_FUZZ_EXAMPLES raises the example count;
PYXENFB_FUZZ_SEED repeats a run (each run prints the seed it used).
The storm runs through the event loop with the console and a VNC client
attached, so the display path sees every fuzzed event.
"""
import asyncio
import os
import random
import shutil
import struct

import numpy as np
import pytest
from hypothesis import given, seed, settings
from hypothesis import strategies as st

from pyxenfb.devices import xenfb_abi as abi
from pyxenfb.convert import GUEST_FORMATS, convert_rect
from pyxenfb.platform.foreignmem import ForeignMemoryError, SimForeignMemory
from pyxenfb.sim.guestmem import GuestMemory
from pyxenfb.sim.picture import test_picture as guest_picture
from pyxenfb.vnc import VncDisplay
from pyxenfb.xenfb import DeviceError, check_geometry, plan_framebuffer, read_page_directory

from simkit import (RawVncClient, RecordingListener, new_domain, short_run_dir, sim_host,
                    start_backend_stack, surface_words, wait_connected, wait_for)

# 5000 + 5000 examples in the normal run; more with PYXENFB_FUZZ_EXAMPLES.
EXAMPLES = int(os.environ.get("PYXENFB_FUZZ_EXAMPLES", "5000"))
SEED = int(os.environ.get("PYXENFB_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
# Health checks stay on.  deadline=None: an example's time depends on the
# host's load (and on the loop's VNC work in the storm), not on the code.
FUZZ = settings(max_examples=EXAMPLES, deadline=None)
EXAMPLE_TIMEOUT = 30.0          # one storm example, run in the loop
FLUSH_TURNS = 10


def fuzz(test):
    """The settings and the run's seed, printed so a failure can be replayed."""
    return seed(SEED)(FUZZ(test))


@pytest.fixture(autouse=True)
def _print_seed():
    print(f"hypothesis seed {SEED} ({EXAMPLES} examples; "
          f"repeat with PYXENFB_FUZZ_SEED={SEED})")

i32 = st.integers(-2**31, 2**31 - 1)
u32 = st.integers(0, 2**32 - 1)
interesting_u32 = st.one_of(u32, st.sampled_from([0, 1, 24, 25, 26, 50, 51, 52, 2**31, 2**32 - 1]))


# ---------------------------------------------------------------------------
# The frontend's description of its framebuffer, checked at connect
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hostile_memory():
    run_dir = short_run_dir()
    os.makedirs(f"{run_dir}/dom7")
    mem = GuestMemory.create(f"{run_dir}/dom7/memory", 4 << 20)     # 1024 frames
    # Frame 1: a directory naming 512 valid frames (as a 64-bit guest would);
    # frame 2: the same for a 32-bit guest; the rest: random bytes.
    rng = np.random.default_rng(7)
    mem.array[3 * 4096:] = rng.integers(0, 256, mem.array.size - 3 * 4096, dtype=np.uint8)
    mem.array[4096:8192] = np.arange(100, 612, dtype="<u8").view(np.uint8)
    mem.array[8192:12288] = np.arange(100, 1124, dtype="<u4").clip(0, 1023).view(np.uint8)
    yield run_dir, SimForeignMemory(run_dir)
    mem.close()
    shutil.rmtree(run_dir)


def header(width, height, line_length, mem_length, depth, pd, pd_offset, entry_fmt):
    page = bytearray(abi.FB_IN_RING_OFFS)
    struct.pack_into("<iiIIB", page, abi.FB_WIDTH, width, height, line_length, mem_length, depth)
    for i, entry in enumerate(pd):
        off = pd_offset + i * struct.calcsize(entry_fmt)
        if off + struct.calcsize(entry_fmt) <= len(page):
            struct.pack_into(entry_fmt, page, off, entry % (1 << (8 * struct.calcsize(entry_fmt))))
    return bytes(page)


@fuzz
@given(width=st.one_of(i32, st.integers(0, 2000)), height=st.one_of(i32, st.integers(0, 2000)),
       line_length=st.one_of(u32, st.integers(0, 9000)),
       mem_length=st.one_of(u32, st.integers(0, 4 << 20)),
       depth=st.one_of(st.integers(0, 255), st.sampled_from([8, 16, 24, 32])),
       pd=st.lists(st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([1, 2, 3, 1023, 1024])),
                   max_size=8),
       protocol=st.sampled_from([None, "x86_64-abi", "x86_32-abi", "arm-abi", "sparc-abi", ""]),
       videoram=st.sampled_from([0, 1, 2, 4, 2**20]))
def test_any_description_is_refused_or_mapped_in_bounds(hostile_memory, width, height, line_length,
                                                         mem_length, depth, pd, protocol, videoram):
    _, fm = hostile_memory
    a = abi.ABIS.get(protocol, abi.ABI_X86_64)
    page = header(width, height, line_length, mem_length, depth, pd, a.pd_offset, a.entry_format)
    try:
        plan = plan_framebuffer(page, protocol, videoram)
    except DeviceError:
        return
    g = plan.geometry
    # The invariants every display relies on.
    assert plan.fb_len <= plan.abi.max_fb_len()
    assert videoram == 0 or plan.fb_len <= videoram << 20
    assert 0 < g.width * (g.depth // 8) <= g.stride
    assert 0 < g.height and g.offset + g.height * g.stride <= plan.fb_len
    if plan.n_pages > 1024:
        return     # more than the whole guest: would be refused by the mapping below anyway
    try:
        frames = read_page_directory(fm, 7, plan)
        fb = fm.map(7, frames, writable=False)
    except ForeignMemoryError:
        return
    try:
        assert fb.array.size >= plan.fb_len
        rows = fb.array[:g.height * g.stride].reshape(g.height, g.stride)
        # Touch every pixel the displays would read.
        convert_rect(rows, GUEST_FORMATS[g.depth], GUEST_FORMATS[32], 0, 0, g.width, g.height)
    finally:
        fb.close()


def test_resize_rules_hold_fb_len_fixed():
    # Resize can't grow past the connect-time fb_len, nor start at/after it.
    with pytest.raises(DeviceError):
        check_geometry(4096, 10, 10, 40, 32, 4096)
    g = check_geometry(8192, 10_000, 10_000, 400, 32, 400)
    assert (g.width, g.height) == (100, (8192 - 400) // 400)
    with pytest.raises(DeviceError):
        check_geometry(8192, 10, 10, 8193, 32, 0)
    with pytest.raises(DeviceError):
        check_geometry(8192, 10, 10, 40, 12, 0)


# ---------------------------------------------------------------------------
# Rings and events, with a well-behaved second domain in the same process
# ---------------------------------------------------------------------------
out_event = st.one_of(
    st.tuples(st.just(abi.XENFB_TYPE_UPDATE), i32, i32, i32, i32).map(
        lambda t: abi.pack_event(abi.FB_UPDATE, *t)),
    st.tuples(st.just(abi.XENFB_TYPE_RESIZE), i32, i32, i32,
              st.one_of(i32, st.sampled_from([8, 16, 24, 32])), i32).map(
        lambda t: abi.pack_event(abi.FB_RESIZE, *t)),
    st.binary(min_size=abi.EVENT_SIZE, max_size=abi.EVENT_SIZE),
)


def test_hostile_rings_and_events_leave_other_domain_untouched():
    async def body():
        async with sim_host() as run_dir:
            bad = await new_domain(run_dir, 1)
            good = await new_domain(run_dir, 2)
            be_bad = await start_backend_stack(run_dir, 1)
            await bad.start()
            be_good = await start_backend_stack(run_dir, 2)
            await good.start()
            listener = RecordingListener()
            be_good.console.attach(listener)
            seen = RecordingListener()
            be_bad.console.attach(seen)
            await wait_connected(bad, be_bad)
            await wait_connected(good, be_good)
            fb, kbd, console = be_bad.fb, be_bad.kbd, be_bad.console
            mapping_size = fb.fb_map.array.size
            # A VNC client watches the fuzzed console the whole time.
            vnc = VncDisplay(console, name="hostile")
            port = await vnc.listen("127.0.0.1", 0, to_display=99)
            watcher = RawVncClient("watcher")
            await watcher.connect(port)
            reading = asyncio.create_task(watcher.read_updates())
            await wait_for(lambda: watcher.updates >= 1, what="the watcher's first frame")
            loop = asyncio.get_running_loop()

            examples = [0]

            async def one_example(out_prod, out_cons, events, in_prod, in_cons, kbd_prod,
                                  kbd_cons, key, pos):
                examples[0] += 1
                page = bad.fb.page
                for i, ev in enumerate(events):
                    off = abi.ring_slot(abi.FB_OUT_RING_OFFS, out_cons + i, abi.FB_OUT_RING_LEN)
                    page[off:off + abi.EVENT_SIZE] = np.frombuffer(ev, np.uint8)
                bad.fb.poke(abi.FB_OUT_PROD, "<I", out_prod)
                bad.fb.poke(abi.FB_OUT_CONS, "<I", out_cons)
                bad.fb.poke(abi.FB_IN_PROD, "<I", in_prod)
                bad.fb.poke(abi.FB_IN_CONS, "<I", in_cons)
                bad.kbd.poke(abi.KBD_IN_PROD, "<I", kbd_prod)
                bad.kbd.poke(abi.KBD_IN_CONS, "<I", kbd_cons)
                fb.on_event()
                kbd.on_event()
                fb.displays_visible(bool(key & 1))
                console.key(key, True)
                console.pointer_abs(*pos)
                # Let the loop turn until the console's flush (call_soon) has
                # handed this example's rectangles to the displays: a few
                # turns at most (the guest's own callbacks may invalidate too).
                for _ in range(FLUSH_TURNS):
                    await asyncio.sleep(0)
                    if not console._flush_scheduled:
                        break
                else:
                    raise AssertionError(f"console not flushed within {FLUSH_TURNS} loop turns")
                s = console.surface
                if fb.geometry is not None:
                    g = fb.geometry
                    assert g.offset + g.height * g.stride <= fb.fb_len <= mapping_size
                    assert s.rows.shape == (g.height, g.stride)
                    assert g.width * (g.depth // 8) <= g.stride
                assert not reading.done(), f"the VNC watcher was dropped: {reading.exception()!r}"

            @fuzz
            @given(out_prod=interesting_u32, out_cons=interesting_u32,
                   events=st.lists(out_event, max_size=6),
                   in_prod=interesting_u32, in_cons=interesting_u32,
                   kbd_prod=interesting_u32, kbd_cons=interesting_u32,
                   key=st.integers(-5, 0x400), pos=st.tuples(i32, i32))
            def storm(**example):
                # Hypothesis drives from a thread; each example runs in the loop.
                asyncio.run_coroutine_threadsafe(one_example(**example), loop).result(EXAMPLE_TIMEOUT)

            updates_before, batches_before = watcher.updates, len(seen.batches)
            await loop.run_in_executor(None, storm)
            print(f"storm: {examples[0]} examples through the loop, {watcher.updates - updates_before} "
                  f"VNC updates, {len(seen.batches) - batches_before} console flushes")
            assert len(seen.batches) > batches_before, "no fuzzed update reached the displays"
            assert watcher.updates > updates_before, "the VNC watcher saw nothing of the storm"
            # The fuzzed device still works once the guest behaves again.
            for off in (abi.FB_OUT_PROD, abi.FB_OUT_CONS, abi.FB_IN_PROD, abi.FB_IN_CONS):
                bad.fb.poke(off, "<I", 0)
            fb.displays_visible(True)
            bad.fb.push_out_event(abi.pack_event(abi.FB_RESIZE, abi.XENFB_TYPE_RESIZE,
                                                 800, 600, 3200, 32, 0))
            await wait_for(lambda: (console.surface.width, console.surface.height)
                           == (800, 600), what="sane resize after the storm")
            # ... and the watcher gets it, picture and all.
            await wait_for(lambda: watcher.size == (800, 600)
                           and np.array_equal(watcher.picture, surface_words(console) & 0xFFFFFF),
                           timeout=10, what=lambda: (
                               f"the watcher's picture after the storm (its size "
                               f"{watcher.size}, {watcher.updates} updates, reader {reading!r})"))
            # The other domain never noticed.
            assert np.array_equal(surface_words(be_good.console), guest_picture(800, 600))
            good.fb.refresh(*good.fb.draw_box(3))
            await wait_for(lambda: np.array_equal(surface_words(be_good.console), good.fb.fb),
                           what="good domain still updating")
            be_good.console.key(44, True)
            await wait_for(lambda: any(e.get("code") == 44 for e in good.kbd.events),
                           what="good domain still receives input")
            assert be_good.fb.connected and be_good.kbd.connected
            reading.cancel()
            watcher.w.close()
            await vnc.close()
            for x in (be_bad, be_good):
                await x.close()
            await bad.stop()
            await good.stop()
    asyncio.run(asyncio.wait_for(body(), 3600))


def test_bad_frontend_keys_leave_device_in_initwait():
    """A page-ref outside guest memory: refused, logged, InitWait kept; a fixed guest connects."""
    async def body():
        async with sim_host() as run_dir:
            from pyxenfb.sim.toolstack import create_domain
            await create_domain(run_dir, 3, "bad3", memory=16, vfb="vnc=1", dm=None, start_guest=False)
            be = await start_backend_stack(run_dir, 3)
            xs = be.ctx.xs
            fe = "/local/domain/3/device/vfb/0"
            await xs.write(f"{fe}/page-ref", str(10**12))
            await xs.write(f"{fe}/event-channel", "1")
            await xs.write(f"{fe}/state", "3")
            await wait_for(lambda: be.fb.last_refusal, what="refusal")
            assert "cannot connect" in be.fb.last_refusal
            assert await xs.read_int("/local/domain/0/backend/vfb/3/0/state") == abi.INIT_WAIT
            assert not be.fb.connected
            await be.close()
    asyncio.run(asyncio.wait_for(body(), 60))
