"""The benchmark contents (pyxenfb/sim/content.py): the frames the reference
guest paints and the frames file bench/xplay.c puts on the X side are the
same pixels; the text console scrolls by exactly one line per frame; each
frame's changed rects cover every pixel that changed."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from pyxenfb.sim import content
from pyxenfb.sim.content import (FILE_MAGIC, console_font, content_frames, desktop_frames,
                                 load_psf, stand_in_font, text_frames, write_frames_file)

W, H = 320, 200


def fonts():
    out = [stand_in_font()]
    real = console_font()
    if real.name != out[0].name:                 # a console font is installed: test it too
        out.append(real)
    return out


@pytest.mark.parametrize("font", fonts(), ids=lambda f: f.name)
def test_text_scrolls_up_exactly_one_line_per_frame(font):
    frames, rects = text_frames(W, H, font)
    fh, rows = font.height, H // font.height
    assert len(frames) == rows + 1
    for k, f in enumerate(frames):
        nxt = frames[(k + 1) % len(frames)]
        # everything but the cursor's row moves up by one font height
        np.testing.assert_array_equal(nxt[:(rows - 2) * fh], f[fh:(rows - 1) * fh])
        assert rects[k] == [(0, 0, W, rows * fh)]
    # real text: more than one colour and not a blank screen, and lines differ
    assert len(np.unique(frames[0])) >= 3
    assert not np.array_equal(frames[0][:fh], frames[0][fh:2 * fh])


@pytest.mark.parametrize("kind", ["text", "desktop", "gradient"])
def test_changed_rects_cover_every_change(kind):
    frames, rects = content_frames(kind, W, H)
    for k, f in enumerate(frames):
        prev = frames[k - 1]
        covered = np.zeros((H, W), bool)
        for x, y, w, h in rects[k]:
            assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= W and y + h <= H
            covered[y:y + h, x:x + w] = True
        assert not np.any((f != prev) & ~covered), f"frame {k}: a change outside its rects"


def test_desktop_changes_only_small_regions():
    frames, rects = desktop_frames(W * 2, H * 2, stand_in_font())
    for k, rs in enumerate(rects):
        assert sum(w * h for _, _, w, h in rs) < 0.05 * W * H * 4
        assert not np.array_equal(frames[k], frames[k - 1])     # the clock ticks every frame


def test_frames_file_holds_the_guests_pixels(tmp_path):
    frames, rects = content_frames("desktop", W, H)
    path = tmp_path / "frames.bin"
    write_frames_file(path, frames, rects)
    raw = path.read_bytes()
    assert raw[:8] == FILE_MAGIC
    w, h, n, maxr = struct.unpack_from("<4I", raw, 8)
    assert (w, h, n) == (W, H, len(frames))
    head = 24 + n * (4 + 16 * maxr)
    data = -(-head // 4096) * 4096
    assert len(raw) == data + n * W * H * 4                     # as xplay.c checks it
    for k in range(n):
        nr, = struct.unpack_from("<I", raw, 24 + k * (4 + 16 * maxr))
        got = [struct.unpack_from("<4I", raw, 28 + k * (4 + 16 * maxr) + 16 * i) for i in range(nr)]
        assert got == [tuple(r) for r in rects[k]]
        pixels = np.frombuffer(raw, "<u4", W * H, data + k * W * H * 4).reshape(H, W)
        np.testing.assert_array_equal(pixels, frames[k])


def test_psf2_font_and_unicode_table(tmp_path):
    # a 2-glyph 8x2 PSF2 font whose table maps 'A' to glyph 1 and 'B' to glyph 0
    header = struct.pack("<4s7I", b"\x72\xb5\x4a\x86", 0, 32, 1, 2, 2, 2, 8)
    glyphs = bytes([0x81, 0x00, 0xFF, 0x18])
    table = b"B\xff" + b"A\xfe\xff"
    path = tmp_path / "t.psf.gz"
    path.write_bytes(gzip.compress(header + glyphs + table))
    font = load_psf(path)
    assert (font.width, font.height) == (8, 2)
    assert font.glyph_indices("AB?") == [1, 0, 0]
    assert font.glyphs[1, 0].all() and font.glyphs[1, 1].tolist() == [0, 0, 0, 1, 1, 0, 0, 0]


def test_a_broken_font_is_refused(tmp_path):
    path = tmp_path / "bad.psf"
    path.write_bytes(b"\x36\x04\x02\x10" + bytes(100))          # says 256 glyphs, has 6
    with pytest.raises(ValueError):
        load_psf(path)
    with pytest.raises(ValueError):
        content.content_frames("video", W, H)


def test_the_content_keeper_waits_for_the_full_screen_refresh():
    """bench/suite.py's keeper client (connected through a content run so
    that no vnc-rate run starts with the guest's full-screen refresh):
    await_full_refresh returns True once an update covering the whole
    picture came after its first full one, and False when only small
    changes come within its timeout -- against our real VNC server."""
    import threading

    from bench.suite import RawClient
    from rfb_harness import ServerThread, make_picture
    from simkit import wait_until

    picture = make_picture(320, 200)
    srv = ServerThread(picture)

    def asks_incrementally(count):
        """The keeper has had `count` updates and asks for the next."""
        return srv.call(lambda: srv.server.clients[0].updates_sent == count
                        and srv.server.clients[0].conn.pending_request == "incremental")
    try:
        keeper = RawClient(srv.port)
        keeper.handshake()
        got = []
        waiter = threading.Thread(target=lambda: got.append(keeper.await_full_refresh(timeout=20)))
        waiter.start()
        wait_until(lambda: asks_incrementally(1), 10, "the first full update read")
        for n in range(3):                      # small changes first: not what it waits for
            srv.draw(picture.rows, 10, 10, 8, 8)
            wait_until(lambda: asks_incrementally(2 + n), 10, "a small update read")
        srv.draw(picture.rows, 0, 0, 320, 200)  # the guest's refresh
        waiter.join(30)
        assert got == [True]
        keeper.close()

        quiet = RawClient(srv.port)
        quiet.handshake()
        srv.draw(picture.rows, 10, 10, 8, 8)
        assert quiet.await_full_refresh(timeout=0.5) is False
        quiet.close()
    finally:
        srv.close()


def test_sources_stop_every_other_animation_while_one_server_is_measured():
    """bench/suite.py's Sources: inside only(key) every other source's
    process (an X anchor's player; a sim guest's whole session) is stopped,
    key's runs; afterwards all run again."""
    import subprocess
    import sys

    from bench.suite import Sources
    from simkit import wait_until

    def state(pid):
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]

    def wait_stopped(pid, stopped: bool):
        wait_until(lambda: (state(pid) == "T") == stopped, 10,
                   f"pid {pid} {'stopped' if stopped else 'resumed'}")

    idle = [sys.executable, "-c", "import signal; signal.pause()"]     # until killed
    player = subprocess.Popen(idle)
    guest = subprocess.Popen(idle, start_new_session=True)

    class Anchor:
        def __init__(self, proc):
            self.player = proc

    class Sim:
        @staticmethod
        def pid(domid, what):
            assert (domid, what) == (1, "guest")
            return guest.pid
    try:
        sources = Sources()
        sources.add_guest("ours", Sim, 1)
        sources.add_players({"xvnc": Anchor(player), "x11vnc": "not installed"})
        with sources.only("ours"):
            wait_stopped(player.pid, True)
            assert state(guest.pid) != "T"
        wait_stopped(player.pid, False)
        with sources.only("xvnc"):
            wait_stopped(guest.pid, True)
            assert state(player.pid) != "T"
        wait_stopped(guest.pid, False)
    finally:
        for p in (player, guest):
            p.kill()
            p.wait()
