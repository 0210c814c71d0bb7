"""--animate full: the reference guest repaints its whole framebuffer from
xanim.c's 24 frames (the benchmark load), one full-screen UPDATE per frame."""
import asyncio

import numpy as np

from pyxenfb.sim.picture import XANIM_FRAMES, xanim_frames
from pyxenfb.sim.dmprocess import guest_argv

from simkit import connected_domain, surface_words, wait_for


def xanim_reference(width, height, frame):
    """xanim.c's gradient loop transcribed pixel by pixel (C integer semantics)."""
    blk = [[50, 40, 7, 3, width // 8, height // 7, 0xFFFFFF],
           [300, 200, -5, 4, width // 10, height // 5, 0x202020],
           [600, 100, 4, -6, width // 6, height // 9, 0xE03030],
           [100, 400, -3, -2, width // 12, height // 12, 0x30E030],
           [700, 300, 6, 5, width // 9, height // 6, 0x3030E0]]
    for f in range(frame + 1):
        off = f * 4
        px = [[0] * width for _ in range(height)] if f == frame else None
        if px is not None:
            for y in range(height):
                for x in range(width):
                    r = ((x + y + off) // 4) & 255
                    g = ((y * 256) // height) & 255
                    b = (255 - (x + off) // 8) & 255
                    px[y][x] = (r << 16) | (g << 8) | b
        for k in blk:
            if px is not None:
                for y in range(k[1], min(k[1] + k[5], height)):
                    for x in range(k[0], min(k[0] + k[4], width)):
                        if x >= 0 and y >= 0:
                            px[y][x] = k[6]
            k[0] += k[2] * 3
            k[1] += k[3] * 3
            if k[0] < 0 or k[0] + k[4] > width:
                k[2] = -k[2]
            if k[1] < 0 or k[1] + k[5] > height:
                k[3] = -k[3]
    return np.array(px, np.uint32)


def test_frames_match_xanim_formula_pixel_exact():
    # 320x240: the blocks start at x up to 700, so at this size some are
    # clipped, some bounce off the edges within 24 frames, some never show.
    frames = xanim_frames(320, 240)
    assert frames.shape == (XANIM_FRAMES, 240, 320) and frames.dtype == np.uint32
    for f in (0, 7, 23):
        np.testing.assert_array_equal(frames[f], xanim_reference(320, 240, f), err_msg=f"frame {f}")
    # every pixel changes from one frame to the next outside the blocks
    assert (frames[1] != frames[0]).mean() > 0.5


def test_guest_argv_keeps_plain_animate_and_passes_full():
    assert guest_argv("/r", 1, "x86_64", None, None, True)[-1] == "--animate"
    assert guest_argv("/r", 1, "x86_64", None, None, "box")[-1] == "--animate"
    assert guest_argv("/r", 1, "x86_64", None, None, "full", 30.0)[-4:] == \
        ["--animate", "full", "--fps", "30.0"]


def test_animate_full_sends_full_screen_updates_of_the_frames():
    async def body():
        async with connected_domain(1, attach=True, width=320, height=240,
                                    animate="full") as (run_dir, guest, be, listener):
            await wait_for(lambda: guest.frame >= 30, 10, "30 frames painted")
            updates = list(listener.updates)
            assert len(updates) >= 20
            assert set(updates) == {(0, 0, 320, 240)}
            # never more than one UPDATE in flight: the out ring can't overflow
            assert be.fb.updates >= guest.frame - 1
            frames = xanim_frames(320, 240)
            shown = surface_words(be.console) & 0xFFFFFF
            assert any(np.array_equal(shown, fr) for fr in frames)
    asyncio.run(body())


def test_animate_full_fps_caps_the_frame_rate():
    async def body():
        # attach: a display watching, else the backend says XENFB_NO_REFRESH
        async with connected_domain(1, attach=True, width=160, height=120, animate="full",
                                    fps=20) as (run_dir, guest, be, listener):
            await wait_for(lambda: guest.frame >= 1, 10, "first frame")
            t0, f0 = asyncio.get_running_loop().time(), guest.frame
            await wait_for(lambda: guest.frame >= f0 + 10, 10, "10 more frames")
            # 10 frames at <= 20 frames/s take at least 9 periods
            assert asyncio.get_running_loop().time() - t0 >= 9 / 20 - 0.02
    asyncio.run(body())


def test_animate_desktop_sends_only_the_changed_rects():
    from pyxenfb.sim.content import desktop_frames

    async def body():
        async with connected_domain(1, attach=True, width=320, height=240,
                                    animate="desktop") as (run_dir, guest, be, listener):
            await wait_for(lambda: guest.frame >= 30, 10, "30 frames painted")
            frames, rects = desktop_frames(320, 240)
            # after whole screens (connection, the first frame), only the clock and cursor
            small = {u for u in listener.updates if u != (0, 0, 320, 240)}
            assert small == {r for rs in rects for r in rs}
            shown = surface_words(be.console) & 0xFFFFFF
            assert any(np.array_equal(shown, fr) for fr in frames)
    asyncio.run(body())
