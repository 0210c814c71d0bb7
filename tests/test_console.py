"""The console on its own: one clipped, coalesced batch per loop pass for
every listener; input state (held keys, pointer mode) kept once."""
import asyncio

from pyxenfb.console.core import BTN_LEFT, Console, Surface
from pyxenfb.util.region import MAX_RECTS, DirtyRegion, clip

from rfb_harness import RecordingInput
from simkit import RecordingListener


def run_pass(console: Console, marks) -> None:
    async def body():
        for rect in marks:
            console.invalidate(*rect)
        await asyncio.sleep(0)           # the flush is the next loop pass
    asyncio.run(body())


def make_console():
    console = Console("t")
    console.set_surface(Surface.blank(320, 200))
    console.input = RecordingInput()
    a, b = RecordingListener(), RecordingListener()
    console.attach(a)
    console.attach(b)
    return console, a, b


def test_each_listener_gets_one_clipped_batch_per_pass():
    console, a, b = make_console()
    run_pass(console, [(10, 10, 20, 20), (300, 190, 50, 50), (-5, -5, 10, 10), (400, 0, 5, 5),
                       (12, 12, 4, 4)])
    expected = [[(10, 10, 20, 20), (300, 190, 20, 10), (0, 0, 5, 5)]]
    assert a.batches == expected and b.batches == expected


def test_many_rects_become_their_bounding_box():
    console, a, _ = make_console()
    run_pass(console, [(i * 10, i * 5, 4, 4) for i in range(MAX_RECTS + 1)])
    assert a.batches == [[(0, 0, MAX_RECTS * 10 + 4, MAX_RECTS * 5 + 4)]]


def test_region_primitives():
    assert clip(-10, 5, 20, 300, 100, 100) == (0, 5, 10, 95)
    assert clip(100, 0, 5, 5, 100, 100) is None
    region = DirtyRegion(max_rects=2)
    region.add((0, 0, 10, 10))
    region.add((2, 2, 3, 3))                  # inside: dropped
    region.add((0, 0, 0, 5))                  # empty: dropped
    assert region.rects == [(0, 0, 10, 10)]
    region.add((-1, -1, 20, 20))              # contains the first: replaces it
    assert region.take() == [(-1, -1, 20, 20)] and not region


def test_release_input_lets_go_of_what_one_source_holds():
    console, _, _ = make_console()
    vnc_client, window = object(), object()
    console.key(30, True, source=vnc_client)
    console.button("left", True, source=vnc_client)
    console.key(48, True, source=window)
    console.key(31, True, source=vnc_client)
    console.key(31, False, source=vnc_client)
    console.input.events.clear()
    console.release_input(vnc_client)
    assert console.input.events == [("key", 30, False), ("key", BTN_LEFT, False)]
    console.release_input(vnc_client)         # nothing held any more
    assert len(console.input.events) == 2


def test_pointer_move_follows_the_guests_mode():
    console, a, _ = make_console()
    src = object()
    console.pointer_move(src, 500, 20)                 # absolute: clamped to the surface
    console.set_pointer_mode(False)
    console.pointer_move(src, 100, 100)                # first relative position: no motion yet
    console.pointer_move(src, 110, 95)
    console.set_pointer_mode(True)
    console.set_pointer_mode(False)
    console.pointer_move(src, 0, 0)                    # the switch forgot the last position
    console.pointer_move(src, 3, 4)
    assert console.input.events == [("abs", 319, 20), ("rel", 10, -5), ("rel", 3, 4)]
    assert a.modes == [False, True, False]


def test_lock_keys_reach_listeners_as_leds():
    console, a, b = make_console()
    console.key(58, True, source=1)            # KEY_CAPSLOCK
    console.key(58, False, source=1)
    console.key(69, True, source=1)            # KEY_NUMLOCK
    assert a.leds == [4, 6] and b.leds == [4, 6]


def test_clip_is_the_intersection_with_the_surface():
    """region.clip is the one clip (backends, SDL, the simulated guest use it):
    exactly the pixels of the rectangle that lie on the surface."""
    from hypothesis import given, strategies as st
    coord = st.integers(-2**31, 2**31 - 1)

    @given(coord, coord, coord, coord, st.integers(0, 70), st.integers(0, 70))
    def check(x, y, w, h, width, height):
        r = clip(x, y, w, h, width, height)
        xs = set(range(max(x, 0), min(x + w, width)))
        ys = set(range(max(y, 0), min(y + h, height)))
        if not xs or not ys:
            assert r is None
        else:
            assert r == (min(xs), min(ys), len(xs), len(ys))
    check()


class BusyListener(RecordingListener):
    """A display that says whether it could show a change now."""

    def __init__(self, busy: bool = True):
        super().__init__()
        self.is_busy = busy

    def console_busy(self) -> bool:
        return self.is_busy


class RecordingLoop:
    """What the console schedules on its loop, recorded instead of run."""

    def __init__(self):
        self.scheduled = []

    def call_soon(self, callback):
        self.scheduled.append(callback)


def test_busy_only_when_every_display_says_so_and_a_hold_ends_once():
    loop = RecordingLoop()
    console = Console("t", loop=loop)
    assert not console.busy(), "no display: nothing waits"
    a, b, plain = BusyListener(), BusyListener(), RecordingListener()
    console.attach(a)
    console.attach(b)
    assert console.busy()
    b.is_busy = False
    assert not console.busy(), "one display could show a change"
    b.is_busy = True
    console.attach(plain)
    assert not console.busy(), "a display that does not say takes every change"
    console.detach(plain)
    loop.scheduled.clear()

    def ready():
        pass
    console.hold_until_ready(ready)
    console.display_ready()
    console.display_ready()                  # once: the hold is gone after the first
    assert loop.scheduled == [ready], "the holder is called on the loop, once"

    def detached():
        pass
    console.hold_until_ready(detached)
    console.detach(a)                        # the busy display leaves: the holder must not wait on it
    assert loop.scheduled == [ready, detached]

    def cancelled():
        pass
    console.hold_until_ready(cancelled)
    console.cancel_hold(cancelled)
    console.display_ready()
    assert loop.scheduled == [ready, detached], "a cancelled hold is never called"
