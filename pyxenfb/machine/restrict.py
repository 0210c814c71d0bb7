"""libxl's dm_restrict, done by the device model itself, as QEMU does for
`-xen-domid-restrict`, `-chroot DIR` and `-runas USER`.

Called by the machine once every handle is open and every socket listens
(XenStore connected, QMP listening, VNC bound, event-channel and
foreign-memory handles open), before the device model reads anything a guest
wrote:

1. the event-channel and foreign-memory handles are restricted to the guest
   (`xenevtchn_restrict`, `xenforeignmemory_restrict`; the sim's broker and
   guest-memory handle enforce the same rules);
2. every module the process may ever import is imported now (`preload`):
   nothing outside the chroot can be loaded afterwards;
3. chroot(DIR), chdir("/"), checked by comparing "/" with DIR's inode;
4. supplementary groups dropped; with a user, setgid then setuid, checked:
   all of real/effective/saved ids are the user's and setuid(0) fails.

Any failed step is a `RestrictError` with one line: the device model must not
run with more privilege than the administrator asked for.
"""
from __future__ import annotations

import importlib
import os

# What the device model imports lazily (first JPEG/PNG update, first
# password, a PNG screendump, codecs).  A module imported for the first
# time inside the chroot would fail, and so would a library some of them
# load on first use: preload() imports these and runs each lazy path once.
PRELOAD = (
    "PIL.Image", "PIL.PngImagePlugin", "PIL.JpegImagePlugin", "PIL.PpmImagePlugin",
    "encodings.ascii", "encodings.latin_1", "encodings.utf_8",
)
# Only for a device model with a WebSocket port (the first browser).
PRELOAD_WEBSOCKET = ("websockets.server", "websockets.frames", "websockets.http11", "websockets.protocol")
# A browser's opening request, to take the WebSocket code through its handshake.
_WS_REQUEST = (b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


class RestrictError(Exception):
    """A restriction step failed; str() is one line."""


_preloaded: set[str] = set()        # the parts done in this process image


def preload(tls: bool = False, websocket: bool = False) -> None:
    """Load every lazy path this device model can take: always the display
    stack's; OpenSSL only with TLS and the WebSocket library only with a
    WebSocket port, which most device models have neither of.  Each part
    once per process image: a zygote's children find the common part done
    (and the pages it touched stay shared), and load the rest themselves."""
    if "common" not in _preloaded:
        _preload_common()
        _preloaded.add("common")
    if websocket and "websocket" not in _preloaded:
        for name in PRELOAD_WEBSOCKET:
            importlib.import_module(name)
        from ..rfb.websocket import WebSocketStream
        stream = WebSocketStream()
        stream.receive(_WS_REQUEST)
        stream.send(b"x")
        _preloaded.add("websocket")
    if tls and "tls" not in _preloaded:
        from ..rfb import tls as rfb_tls
        rfb_tls.server_context(rfb_tls.TlsCredentials("anon"))     # OpenSSL's lazy state
        _preloaded.add("tls")


def _preload_common() -> None:
    for name in PRELOAD:
        importlib.import_module(name)
    import numpy as np

    from ..displays import pixman
    from ..convert import GUEST_32
    from ..rfb import auth, enc_kernel, encodings
    pixman.load()                  # dlopen-ed on the first conversion otherwise
    enc_kernel.load()              # by its path, which a chroot hides
    vals = np.zeros((8, 8), np.uint32)
    for kind in ("JPEG", "PNG"):   # Tight JPEG, TightPNG, PNG screendumps
        encodings._image_bytes(vals, GUEST_32, kind, 5)
    auth.vnc_response("x", bytes(16))   # DES (pycryptodome) and its ECB mode


def apply(opts, domid: int, evtchn, foreignmem) -> str:
    """Restrict this process (opts: cli.RestrictOptions); returns a summary line."""
    done = []
    if opts.domid_restrict:
        for what, handle in (("event channels", evtchn), ("foreign memory", foreignmem)):
            try:
                handle.restrict(domid)
            except OSError as e:
                raise RestrictError(f"cannot restrict {what} to domain {domid}: "
                                    f"{e.strerror or e}") from None
        done.append(f"event channels and foreign memory restricted to domain {domid}")
    if opts.chroot is not None:
        _chroot(opts.chroot)
        done.append(f"chroot {opts.chroot}")
    if opts.chroot is not None or opts.user is not None:
        try:
            os.setgroups([])
        except OSError as e:
            raise RestrictError(f"cannot drop supplementary groups: {e.strerror}") from None
    if opts.user is not None:
        _drop_to(opts.user)
        done.append(f"running as {opts.user.spec} (uid {opts.user.uid}, gid {opts.user.gid})")
    else:
        done.append(f"uid {os.getuid()}")
    return "; ".join(done)


def _chroot(directory: str) -> None:
    try:
        target = os.stat(directory)
        os.chroot(directory)
        os.chdir("/")
        root = os.stat("/")
    except OSError as e:
        raise RestrictError(f"cannot chroot to {directory}: {e.strerror}") from None
    if (root.st_dev, root.st_ino) != (target.st_dev, target.st_ino):
        raise RestrictError(f"chroot to {directory} did not take effect")


def _drop_to(user) -> None:
    uid, gid = user.uid, user.gid
    try:
        os.setresgid(gid, gid, gid)       # group first: setgid needs the privilege we drop next
        os.setresuid(uid, uid, uid)
    except OSError as e:
        raise RestrictError(f"cannot switch to user {user.spec}: {e.strerror}") from None
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid) \
            or set(os.getgroups()) - {gid}:
        raise RestrictError(f"privileges not dropped to {user.spec}: uids {os.getresuid()}, "
                            f"gids {os.getresgid()}, groups {os.getgroups()}")
    for regain in (os.setuid, os.setgid):
        try:
            regain(0)
        except PermissionError:
            continue
        raise RestrictError(f"privileges not dropped: {regain.__name__}(0) still succeeds")
