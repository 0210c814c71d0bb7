"""vfb/vkbd backends against the reference guest on the simulated host."""
import asyncio

import numpy as np
import pytest

from pyxenfb.devices import xenfb_abi as abi
from pyxenfb.sim.fbdump import fbdump_array
from pyxenfb.sim.picture import test_picture as guest_picture

from simkit import (RecordingListener, connected_domain, new_domain, sim_host,
                    start_backend_stack, surface_words, wait_connected, wait_for)


def rgb_words(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.uint32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


@pytest.mark.parametrize("abi_name", ["x86_64", "x86_32"])
def test_connect_surface_equals_fbdump(abi_name):
    async def body():
        async with connected_domain(1, abi_name=abi_name, width=640, height=480) as (run_dir, guest, be, listener):
            dump = await asyncio.to_thread(fbdump_array, run_dir, 1)
            assert be.console.surface.width == 640 and be.console.surface.height == 480
            assert np.array_equal(surface_words(be.console), rgb_words(dump))
            assert np.array_equal(surface_words(be.console), guest_picture(640, 480))
            assert be.fb.abi.name == f"{abi_name}-abi"
            # The states are what QEMU leaves: both sides Connected.
            xs = be.ctx.xs
            for dev in ("vfb", "vkbd"):
                assert await xs.read_int(f"/local/domain/0/backend/{dev}/1/0/state") == 4
                assert await xs.read_int(f"/local/domain/1/device/{dev}/0/state") == 4
            assert await xs.read_str("/local/domain/0/backend/vfb/1/0/request-update") == "1"
            assert await xs.read_str("/local/domain/0/backend/vfb/1/0/hotplug-status") == "connected"
    run(body())


def test_updates_become_dirty_rects_and_pixels_follow():
    async def body():
        async with connected_domain(1, attach=True) as (run_dir, guest, be, listener):
            listener.updates.clear()
            for frame in range(1, 4):
                rect = guest.fb.draw_box(frame)
                guest.fb.refresh(*rect)
                await wait_for(lambda: rect in listener.updates, what=f"dirty rect {rect}")
            assert np.array_equal(surface_words(be.console), guest.fb.fb)
    run(body())


def test_resize_publishes_new_surface():
    async def body():
        async with connected_domain(1, attach=True) as (run_dir, guest, be, listener):
            await wait_for(lambda: guest.fb.feature_resize, what="feature-resize seen")
            assert guest.fb.resize(640, 400)
            await wait_for(lambda: (640, 400) in listener.resizes, what="resize")
            s = be.console.surface
            assert (s.width, s.height, s.stride) == (640, 400, 800 * 4)
            assert np.array_equal(surface_words(be.console), guest_picture(640, 400))
    run(body())


def test_refresh_period_follows_displays():
    async def body():
        async with connected_domain(1) as (run_dir, guest, be, listener):
            # No display attached: the guest is told not to send updates.
            await wait_for(lambda: guest.fb.refresh_period == abi.XENFB_NO_REFRESH, what="NO_REFRESH")
            before = guest.fb.updates_sent
            guest.fb.refresh(*guest.fb.draw_box(1))
            assert guest.fb.updates_sent == before          # held back, stashed
            listener = RecordingListener()
            be.console.attach(listener)
            await wait_for(lambda: guest.fb.refresh_period and guest.fb.refresh_period > 0,
                           what="refresh period back on")
            # The stashed rectangle arrives once a display watches again.
            await wait_for(lambda: listener.updates, what="stashed update")
            be.console.detach(listener)
            await wait_for(lambda: guest.fb.refresh_period == abi.XENFB_NO_REFRESH, what="NO_REFRESH again")
    run(body())


def test_input_reaches_guest_abs_rel_keys_wheel():
    async def body():
        async with connected_domain(1, attach=True) as (run_dir, guest, be, listener):
            await wait_for(lambda: be.console.absolute_pointer and be.kbd.absolute, what="abs mode")
            c = be.console
            c.key(30, True)
            c.key(30, False)
            c.pointer_abs(123, 456)
            c.button("left", True)
            c.button("left", False)
            c.wheel(-1)
            ev = guest.kbd.events
            await wait_for(lambda: len(ev) >= 6, what="six input events")
            assert ev[0] == {"dev": "vkbd", "type": "key", "code": 30, "pressed": True, "device": "keyboard"}
            assert ev[1]["code"] == 30 and ev[1]["pressed"] is False
            assert ev[2]["type"] == "pos" and (ev[2]["x"], ev[2]["y"]) == (123, 456)
            assert ev[3]["code"] == 0x110 and ev[3]["device"] == "pointer"
            assert ev[5]["type"] == "pos" and ev[5]["rel_z"] == -1
            # The log file carries the same events for out-of-process readers.
            lines = (open(f"{run_dir}/dom1/input.log").read().splitlines())
            assert len(lines) >= 6 and '"code": 30' in lines[0]
            # Relative mode: the guest stops asking for absolute.
            await be.ctx.xs.write("/local/domain/1/device/vkbd/0/request-abs-pointer", "0")
            await be.ctx.xs.write("/local/domain/1/device/vkbd/0/state", "4")
            await wait_for(lambda: listener.modes and listener.modes[-1] is False, what="rel mode")
            c.pointer_rel(5, -3)
            c.wheel(1)
            await wait_for(lambda: len(ev) >= 8, what="motion events")
            assert ev[6] == {"dev": "vkbd", "type": "motion", "rel_x": 5, "rel_y": -3, "rel_z": 0}
            assert ev[7]["rel_z"] == 1
    run(body())


@pytest.mark.parametrize("clean", [True, False], ids=["close-first", "kexec"])
def test_guest_reboot_reconnects(clean):
    async def body():
        async with connected_domain(1, width=800, height=600) as (run_dir, guest, be, listener):
            old_map = be.fb.fb_map
            await guest.reboot(clean)
            await wait_connected(guest, be)
            await wait_for(lambda: be.fb.fb_map is not None and be.fb.fb_map is not old_map,
                           what="framebuffer mapped again")
            assert np.array_equal(surface_words(be.console), guest_picture(800, 600))
            guest.fb.refresh(*guest.fb.draw_box(7))
            await wait_for(lambda: np.array_equal(surface_words(be.console), guest.fb.fb),
                           what="picture after reboot")
    run(body())


def test_backend_restart_takes_over_a_connected_device():
    """A device model killed with SIGKILL leaves state 4 behind; the next one reconnects."""
    async def body():
        async with sim_host() as run_dir:
            guest = await new_domain(run_dir, 1)
            be = await start_backend_stack(run_dir, 1)
            await guest.start()
            await wait_connected(guest, be)
            be.ctx.ports.close()        # as if killed: nothing written to XenStore
            for d in be.devices:
                d._task.cancel()
            be2 = await start_backend_stack(run_dir, 1)
            await wait_for(lambda: be2.fb.connected and be2.kbd.connected, what="second backend")
            assert np.array_equal(surface_words(be2.console), guest.fb.fb)
            await be2.close()
            await guest.stop()
    run(body())


def test_frontend_closing_releases_everything():
    async def body():
        async with connected_domain(1) as (run_dir, guest, be, listener):
            await guest.fb.close()
            await guest.kbd.close()
            xs = be.ctx.xs
            assert await xs.read_int("/local/domain/0/backend/vfb/1/0/state") == abi.CLOSED
            assert be.fb.fb_map is None and be.fb.page is None and be.fb.port is None
            assert be.kbd.page is None
            # The display keeps the last picture from private memory.
            assert np.array_equal(surface_words(be.console), guest_picture(800, 600))
    run(body())


def test_frontend_without_feature_update_is_rescanned_while_watched(monkeypatch):
    """A frontend that sends no UPDATE events (no feature-update): the backend
    rescans the whole framebuffer, but only while a display is attached."""
    from pyxenfb.sim.guest import FbFront
    original = FbFront.frontend_keys
    monkeypatch.setattr(FbFront, "frontend_keys",
                        lambda self: [kv for kv in original(self) if kv[0] != "feature-update"])

    async def body():
        async with connected_domain(1) as (run_dir, guest, be, listener):
            assert not be.fb.feature_update and not guest.fb.update_wanted
            assert be.fb._legacy_timer is None            # nobody watching: no rescans
            be.console.attach(listener)
            await wait_for(lambda: listener.updates.count((0, 0, 800, 600)) >= 2,
                           what="periodic full-screen rescans")
            guest.fb.fb[10:20, 10:20] = 0x123456           # drawn without any UPDATE event
            await wait_for(lambda: np.array_equal(surface_words(be.console), guest.fb.fb),
                           what="the change seen by a rescan")
            be.console.detach(listener)
            assert be.fb._legacy_timer is None
    run(body())
