"""The whole chain through the sim: toolstack -> pyqemu-dm -> displays.

Pictures are compared with `pyxenfb-sim fbdump` (the guest's memory read
directly, independent of the backend) pixel for pixel.
"""
import asyncio
import os

import numpy as np
import pytest
from PIL import Image

from pyxenfb.sim import toolstack
from pyxenfb.sim.fbdump import fbdump_array
from pyxenfb.platform.xenstore import XenStore
from simkit import wait_frontends_connected, wait_until


@pytest.fixture
def domains(host):
    """create(domid, vfb, **kw) -> CreateResult; every domain is destroyed afterwards."""
    created = []

    def create(domid, vfb, **kw):
        async def go():
            created.append(domid)
            res = await toolstack.create_domain(host, domid, f"d{domid}", vfb=vfb, **kw)
            await wait_frontends_connected(host, domid)
            return res
        return asyncio.run(go())
    yield create
    for domid in created:
        try:
            asyncio.run(toolstack.destroy_domain(host, domid))
        except toolstack.ToolstackError:
            pass            # creation failed and cleaned up already


def _input_events(host, domid, done, timeout=10.0):
    """The guest's input log once done(events) holds (bounded: fails, never
    returns short).  Wait for the last event sent, not for a count: pointer
    motion may log more position events than there were moves."""
    wait_until(lambda: done(toolstack.read_input_log(host, domid)), timeout,
               lambda: f"input events in dom{domid}: {toolstack.read_input_log(host, domid)}")
    return toolstack.read_input_log(host, domid)


def test_vnc_password_capture_and_input(host, domains):
    from vncdotool import api
    res = domains(1, "vnc=1,vncdisplay=51,vncunused=1,vncpasswd=s3cret")

    async def xend_password_node():
        xs = await XenStore.open(os.path.join(host, "xenstored.sock"))
        try:
            return await xs.read(f"/vm/{res.uuid}/vncpasswd")
        finally:
            xs.close()
    # qemu-dm read xend's copy once at start and overwrote it.
    assert asyncio.run(xend_password_node()) == b"\0" * len("s3cret")
    expected = fbdump_array(host, 1)
    with pytest.raises(Exception):
        bad = api.connect(f"127.0.0.1::{res.vnc_port}", password="wrong", timeout=10)
        bad.refreshScreen()
    client = api.connect(f"127.0.0.1::{res.vnc_port}", password="s3cret", timeout=10)
    try:
        shot = np.asarray(client.refreshScreen().screen.convert("RGB"))
        assert np.array_equal(shot, expected)
        client.keyPress("a")
        client.keyPress("shift-1")
        client.mouseMove(100, 200)
        client.mousePress(1)
    finally:
        client.disconnect()
    events = _input_events(host, 1, lambda evs: any(
        e["type"] == "key" and e["code"] == 0x110 and not e["pressed"] for e in evs))   # the last one sent
    keys = [(e["code"], e["pressed"]) for e in events if e["type"] == "key"]
    assert (30, True) in keys and (30, False) in keys            # KEY_A
    assert (42, True) in keys and (2, True) in keys               # KEY_LEFTSHIFT, KEY_1
    assert (0x110, True) in keys and (0x110, False) in keys       # BTN_LEFT
    pos = [e for e in events if e["type"] == "pos"]
    assert pos and (pos[-1]["x"], pos[-1]["y"]) == (100, 200)


@pytest.mark.parametrize("fmt", ["ppm", "png"])
def test_qmp_screendump_equals_guest_memory(host, domains, tmp_path, fmt):
    domains(2, "vnc=1,vncdisplay=52,vncunused=1", width=640, height=400)
    out = tmp_path / f"shot.{fmt}"

    async def dump():
        qmp = await toolstack.QmpClient.connect(toolstack.qmp_paths(host, 2)[0], "screendump")
        try:
            await qmp.execute("qmp_capabilities")
            args = {"filename": str(out)}
            if fmt == "png":
                args["format"] = "png"
            await qmp.execute("screendump", args)
        finally:
            qmp.close()
    asyncio.run(dump())
    with Image.open(out) as img:
        assert img.format == fmt.upper()
        shot = np.asarray(img.convert("RGB"))
    assert np.array_equal(shot, fbdump_array(host, 2))


def test_vnc_and_sdl_share_one_console(host, domains, monkeypatch):
    """-vnc and -sdl at once (SDL's dummy video driver): both get the guest's picture."""
    from vncdotool import api
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    res = domains(3, "vnc=1,vncdisplay=53,vncunused=1,sdl=1", width=320, height=240)
    client = api.connect(f"127.0.0.1::{res.vnc_port}", timeout=10)
    try:
        shot = np.asarray(client.refreshScreen().screen.convert("RGB"))
        assert np.array_equal(shot, fbdump_array(host, 3))
    finally:
        client.disconnect()
    log = open(res.dm_log).read()
    assert "SDL display open (video driver dummy)" in log, log
    assert "Traceback" not in log, log


def test_keymap_de_maps_keysyms_to_the_german_layout(host, domains):
    """-k de (xl's keymap=de): the keysym 'z' is the key labelled Z on a German
    keyboard, which is KEY_Y's position; and the other way round."""
    from vncdotool import api
    res = domains(4, "vnc=1,vncdisplay=54,vncunused=1,keymap=de")
    client = api.connect(f"127.0.0.1::{res.vnc_port}", timeout=10)
    try:
        client.keyPress("z")
        client.keyPress("y")
    finally:
        client.disconnect()
    events = _input_events(host, 4, lambda evs: sum(e["type"] == "key" for e in evs) >= 4)
    downs = [e["code"] for e in events if e["type"] == "key" and e["pressed"]]
    assert downs == [21, 44], events          # KEY_Y, KEY_Z


def test_qmp_query_vnc_lists_connected_clients(host, domains):
    from vncdotool import api
    res = domains(5, "vnc=1,vncdisplay=55,vncunused=1")

    async def query():
        qmp = await toolstack.QmpClient.connect(toolstack.qmp_paths(host, 5)[0], "query-vnc")
        try:
            await qmp.execute("qmp_capabilities")
            return await qmp.execute("query-vnc")
        finally:
            qmp.close()
    client = api.connect(f"127.0.0.1::{res.vnc_port}", timeout=10)
    try:
        client.refreshScreen()
        info = asyncio.run(query())
    finally:
        client.disconnect()
    assert info["enabled"] is True and info["service"] == str(res.vnc_port)
    assert info["auth"] == "none" and info["host"] == "127.0.0.1"
    assert [c["host"] for c in info["clients"]] == ["127.0.0.1"]
    assert info["clients"][0]["websocket"] is False


@pytest.mark.parametrize("encoding", ["raw", "hextile", "zrle", "rre", "zlib"])
def test_each_encoding_through_the_sim_equals_guest_memory(host, domains, encoding):
    """vncdotool with its encoding list set to each one it decodes, asyncvnc for Zlib."""
    res = domains(6, "vnc=1,vncdisplay=56,vncunused=1", width=640, height=480)
    expected = fbdump_array(host, 6)
    if encoding == "zlib":
        asyncvnc = pytest.importorskip("asyncvnc")

        async def shot():
            async with asyncvnc.connect("127.0.0.1", res.vnc_port) as client:
                return await client.screenshot()
        got = asyncio.run(asyncio.wait_for(shot(), 20))[:, :, :3]
    else:
        from vncdotool import rfb as vnc_rfb
        from rfb_harness import capture
        code = {"raw": None, "hextile": vnc_rfb.Encoding.HEXTILE, "zrle": vnc_rfb.Encoding.ZRLE,
                "rre": vnc_rfb.Encoding.RRE}[encoding]
        got = capture(res.vnc_port, code)
    assert np.array_equal(got, expected)
