"""VNC on the simulated host: the reference guest animates and resizes while
three clients watch, one of which never reads."""
import asyncio
import resource

import numpy as np

from pyxenfb.vnc import VncDisplay
from pyxenfb.sim.picture import test_picture as guest_picture

from simkit import RawVncClient as RawClient, connected_domain, wait_for


def test_animation_three_clients_one_not_reading_then_resize():
    async def body():
        async with connected_domain(1) as (run_dir, guest, be, listener):
            vnc = VncDisplay(be.console, name="sim")
            port = await vnc.listen("127.0.0.1", 0, to_display=99)
            readers = [RawClient("a"), RawClient("b")]
            for c in readers:
                await c.connect(port)
            slow = RawClient("slow")
            await slow.connect(port, rcvbuf=4096)
            for _ in range(200):                 # ask again and again, never read
                slow.request(incremental=False)
            tasks = [asyncio.create_task(c.read_updates()) for c in readers]
            rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            await wait_for(lambda: all(c.updates >= 1 for c in readers), what="first frames")
            for frame in range(1, 61):
                guest.fb.refresh(*guest.fb.draw_box(frame))
                await asyncio.sleep(0.02)      # the guest's own frame clock
            await wait_for(lambda: all(np.array_equal(c.picture, guest.fb.fb) for c in readers),
                           timeout=10, what="readers caught up with the animation")
            assert all(c.updates >= 10 for c in readers), [c.updates for c in readers]
            slow_peer = "127.0.0.1:%d" % slow.w.get_extra_info("sockname")[1]
            slow_side = [c for c in vnc.server.clients if c.peer == slow_peer]
            if slow_side:                        # still connected: its output is bounded
                assert slow_side[0].transport.get_write_buffer_size() <= 5 * slow_side[0].throttle
                assert slow_side[0].updates_sent < 60
            assert len(vnc.server.clients) in (2, 3)    # the readers are never dropped
            growth_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
            assert growth_kib < 64 * 1024, f"RSS grew {growth_kib} KiB"

            assert guest.fb.resize(640, 480)
            await wait_for(lambda: all(c.size == (640, 480) for c in readers), what="DesktopSize")
            await wait_for(lambda: all(np.array_equal(c.picture, guest_picture(640, 480))
                                       for c in readers), timeout=10, what="picture after resize")
            for t in tasks:
                t.cancel()
            for c in readers + [slow]:
                c.w.close()
            await vnc.close()
    asyncio.run(asyncio.wait_for(body(), 120))
