"""noVNC 1.3 (Debian `novnc`) in headless Chromium over the WebSocket port
(-vnc ...,websocket=, the test page's origin allowed): the canvas equals the
guest picture.  And a page from another site cannot reach the console: not
through the VNC port (RFB only), not through the WebSocket port (Origin).

noVNC offers CopyRect, Tight, TightPNG, Hextile, RRE, Raw and always a JPEG
quality level; each test restricts that list (tests/novnc_page.js) so one
encoding is used, and drops the quality level where the result must be
lossless (our server answers a quality level with JPEG).  Raw goes through
a fix for noVNC 1.3's Raw alpha bug (see novnc_page.js), and once without.
Needs the Debian packages novnc and chromium (skipped without).
"""
from __future__ import annotations

import logging

import numpy as np
import pytest

from novnc_driver import AttackerSite, NovncBrowser, missing_requirement
from rfb_harness import RawClient, ServerThread, expected_rgb, make_picture
from simkit import wait_until
from pyxenfb.rfb import encodings as enc

_missing = missing_requirement()
pytestmark = pytest.mark.skipif(_missing is not None, reason=_missing or "")


@pytest.fixture(scope="module")
def browser():
    b = NovncBrowser()
    yield b
    b.close()


@pytest.fixture
def serve(browser):
    """Servers with a WebSocket port that lets the test pages' origin in."""
    servers = []

    def start(**kwargs) -> ServerThread:
        kwargs.setdefault("websocket", True)
        if kwargs["websocket"]:
            kwargs.setdefault("websocket_origins", (browser.origin,))
        srv = ServerThread(**kwargs)
        servers.append(srv)
        return srv
    yield start
    for srv in servers:
        srv.close()


@pytest.fixture
def vnc_server(serve):
    return serve()


@pytest.fixture
def vnc_server_lossy(serve):
    return serve(lossy=True)


@pytest.fixture
def vnc_server_password(serve):
    return serve(password="s3cret")


@pytest.fixture
def attacker():
    site = AttackerSite()
    yield site
    site.close()


def assert_same_picture(result: dict, surface) -> None:
    assert result["outcome"] == "frame", result
    assert (result["canvasWidth"], result["canvasHeight"]) == (surface.width, surface.height)
    picture = result["picture"]
    assert (picture[..., 3] == 255).all(), "transparent pixels on the canvas"
    want = expected_rgb(surface)
    wrong = np.any(picture[..., :3] != want, axis=-1)
    assert not wrong.any(), f"{int(wrong.sum())} pixels differ, first at (y, x) {np.argwhere(wrong)[0]}"


@pytest.mark.parametrize("encoding", [enc.TIGHT, enc.TIGHT_PNG, enc.HEXTILE, enc.RRE, enc.RAW],
                         ids=["tight", "tightpng", "hextile", "rre", "raw"])
def test_novnc_lossless_picture(browser, vnc_server, encoding):
    result = browser.run_client(vnc_server.ws_port, 800, 600, encodings=[encoding], lossless=True,
                                raw_alpha_fix=encoding == enc.RAW)
    assert result.get("connected") and result["desktopName"] == vnc_server.server.desktop_name
    assert set(result["rects"]) == {str(encoding)}, result["rects"]
    assert not any(enc.JPEG_QUALITY_MIN <= e <= enc.JPEG_QUALITY_MAX for e in result["sentEncodings"])
    assert_same_picture(result, make_picture())


def test_novnc_raw_as_shipped(browser, vnc_server):
    """noVNC 1.3's own Raw decoder: every pixel it makes opaque is exact; any
    it leaves transparent (its alpha bug, where the padding byte is 0) has
    alpha 0 (our converter now sends padding 0xFF, so normally none)."""
    result = browser.run_client(vnc_server.ws_port, 800, 600, encodings=[enc.RAW], lossless=True)
    assert result["outcome"] == "frame", result
    assert set(result["rects"]) == {str(enc.RAW)}
    picture = result["picture"]
    opaque = picture[..., 3] == 255
    assert np.isin(picture[..., 3], (0, 255)).all()
    assert opaque.mean() > 0.99
    want = expected_rgb(make_picture())
    assert (picture[opaque][:, :3] == want[opaque]).all()


def test_novnc_tight_odd_size(browser, vnc_server):
    """641x479: edge rectangles and tiles of every encoder noVNC decodes."""
    surface = make_picture(641, 479, seed=2)
    vnc_server.set_surface(surface)
    for encoding in (enc.TIGHT, enc.TIGHT_PNG, enc.HEXTILE):
        result = browser.run_client(vnc_server.ws_port, 641, 479, encodings=[encoding], lossless=True)
        assert set(result.get("rects", {})) == {str(encoding)}, (encoding, result)
        assert_same_picture(result, surface)


def test_novnc_default_encodings_lossless_by_default(browser, vnc_server):
    """noVNC's own list asks for JPEG quality 6, but without lossy=on (QEMU's
    default) Tight stays lossless: the picture is exact."""
    result = browser.run_client(vnc_server.ws_port, 800, 600)
    assert result["outcome"] == "frame", result
    assert enc.JPEG_QUALITY_MIN + 6 in result["sentEncodings"]
    assert set(result["rects"]) == {str(enc.TIGHT)}
    assert_same_picture(result, make_picture())


def test_novnc_default_encodings_jpeg(browser, vnc_server_lossy):
    """With lossy=on: noVNC's own list (Tight first, JPEG quality 6) is lossy,
    but close and opaque."""
    result = browser.run_client(vnc_server_lossy.ws_port, 800, 600)
    assert result["outcome"] == "frame", result
    assert result["sentEncodings"][:3] == [enc.COPYRECT, enc.TIGHT, enc.TIGHT_PNG]
    assert enc.JPEG_QUALITY_MIN + 6 in result["sentEncodings"]
    assert set(result["rects"]) == {str(enc.TIGHT)}
    picture = result["picture"]
    assert (picture[..., 3] == 255).all()
    error = np.abs(picture[..., :3].astype(int) - expected_rgb(make_picture()).astype(int))
    # Quality 6 (Pillow quality 70, 4:2:0) on this deliberately busy picture: ~11.
    assert error.mean() < 16, error.mean()
    assert error.any(), "expected JPEG (lossy) rectangles with noVNC's default quality level"


def test_novnc_password(browser, vnc_server_password):
    """VNC authentication; also the picture as Chromium shows it (a screenshot)."""
    result = browser.run_client(vnc_server_password.ws_port, 800, 600, encodings=[enc.TIGHT],
                                lossless=True, password="s3cret", screenshot=True)
    assert_same_picture(result, make_picture())
    assert np.array_equal(result["screenshot"], expected_rgb(make_picture()))


def test_novnc_wrong_password(browser, vnc_server_password):
    result = browser.run_client(vnc_server_password.ws_port, 800, 600, password="wrong")
    assert result["outcome"] == "securityfailure", result
    assert result["status"] == 1
    assert vnc_server_password.client_count() == 0


def test_vnc_lite_page_connects(browser, vnc_server_password):
    """Debian's vnc_lite.html as shipped (WebSocket path /websockify, password in the URL)."""
    page = browser.open_vnc_lite(vnc_server_password.ws_port, password="s3cret")
    assert page["status"] == f"Connected to {vnc_server_password.server.desktop_name}", page
    assert (page["width"], page["height"]) == (800, 600)


# ---------------------------------------------------------------- another site
def test_other_site_cannot_use_the_vnc_port(browser, serve, attacker, caplog):
    """The cross-site WebSocket hijack: a page from another origin opens
    ws:// to the VNC port of a default server (no websocket=).  The port
    speaks RFB only, so the page never gets an open WebSocket or a byte of
    RFB, and a real RFB client is served at once."""
    srv = serve(websocket=False)
    assert srv.ws_port is None
    with caplog.at_level(logging.INFO, logger="pyxenfb.rfb"):
        seen = attacker.attack(browser.chromium, f"ws://127.0.0.1:{srv.port}/")
        assert "open" not in seen["events"] and "close" in seen["events"], seen
        assert "RFB" not in seen["text"]
        wait_until(lambda: any("protocol version b'GET /" in r.getMessage() for r in caplog.records),
                   5, "the bad-version line")
    assert srv.client_count() == 0
    c = RawClient(srv.port)
    try:
        assert c.handshake() == (800, 600)
    finally:
        c.close()


def test_other_site_refused_on_the_websocket_port(browser, serve, attacker, caplog):
    """websocket=on with an allow-list that lacks the page's origin: the
    upgrade is refused (403), the page never sees an open WebSocket, and the
    device model logs one line naming the option that would allow it."""
    srv = serve(websocket_origins=("https://console.example", browser.origin))
    with caplog.at_level(logging.INFO, logger="pyxenfb.rfb"):
        seen = attacker.attack(browser.chromium, f"ws://127.0.0.1:{srv.ws_port}/")
        assert "open" not in seen["events"] and "close" in seen["events"], seen
        assert seen["text"] == ""
        want = f"Origin '{attacker.origin}' is not allowed (to allow it: -vnc ...,websocket-origin={attacker.origin})"
        wait_until(lambda: any(want in r.getMessage() for r in caplog.records), 5, "the refusal line")
    assert sum("disconnected" in r.getMessage() for r in caplog.records) == 1
    assert srv.client_count() == 0
    # The allowed page still gets in through the same port.
    result = browser.run_client(srv.ws_port, 800, 600, encodings=[enc.TIGHT], lossless=True)
    assert_same_picture(result, make_picture())


def test_websocket_default_allow_list_refuses_every_page(browser, serve):
    """websocket=on alone: no origin allowed, the test's own page included."""
    srv = serve(websocket_origins=())
    result = browser.run_client(srv.ws_port, 800, 600, encodings=[enc.TIGHT], lossless=True,
                                timeout=10)
    assert result["outcome"] != "frame" and not result.get("connected"), result
    assert srv.client_count() == 0
