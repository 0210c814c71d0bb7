"""The RFB connection's states and message numbers, named once.

A server connection moves (TRANSITIONS below) VERSION -> SECURITY (3.7/3.8) -> VNC_AUTH (when a
password is set) -> CLIENT_INIT -> NORMAL, or to CLOSED from anywhere on a
protocol error.  RFB 3.3 skips SECURITY: the server picks the type.  With
TLS, SECURITY leads to VeNCrypt: VENCRYPT_VERSION -> VENCRYPT_SUBTYPE ->
TLS_HANDSHAKE (the owner runs it) -> VNC_AUTH or CLIENT_INIT.
"""
from __future__ import annotations

import enum


class State(str, enum.Enum):
    VERSION = "version"
    SECURITY = "security"
    VENCRYPT_VERSION = "vencrypt_version"
    VENCRYPT_SUBTYPE = "vencrypt_subtype"
    TLS_HANDSHAKE = "tls_handshake"
    VNC_AUTH = "vnc_auth"
    CLIENT_INIT = "client_init"
    NORMAL = "normal"
    CLOSED = "closed"


class Step(enum.Enum):
    """What moves a server connection on (the keys of TRANSITIONS)."""
    VERSION_3_7_OR_LATER = "version 3.7+ agreed: the client picks the security type"
    SECURITY_NONE = "no authentication (RFB None, or a VeNCrypt *_NONE subtype after TLS)"
    SECURITY_VNC = "VNC authentication: the challenge is sent"
    SECURITY_VENCRYPT = "VeNCrypt: its version is offered"
    VENCRYPT_VERSION = "VeNCrypt 0.2 agreed: the subtype is offered"
    VENCRYPT_SUBTYPE = "the offered subtype chosen: the TLS handshake runs"
    AUTHENTICATED = "the VNC challenge answered"
    CLIENT_INIT = "ClientInit received: ServerInit sent"
    CLOSE = "a protocol error, or the owner closed the connection"


# Every legal move, in one place (h11's _state.py does the same): the
# connection asks next_state() and never assigns a state it did not get
# from here.  RFB 3.3 goes from VERSION straight to the security type the
# server picked; TLS_HANDSHAKE ends in the subtype's own authentication.
TRANSITIONS: dict[tuple[State, Step], State] = {
    (State.VERSION, Step.VERSION_3_7_OR_LATER): State.SECURITY,
    (State.VERSION, Step.SECURITY_NONE): State.CLIENT_INIT,
    (State.VERSION, Step.SECURITY_VNC): State.VNC_AUTH,
    (State.SECURITY, Step.SECURITY_NONE): State.CLIENT_INIT,
    (State.SECURITY, Step.SECURITY_VNC): State.VNC_AUTH,
    (State.SECURITY, Step.SECURITY_VENCRYPT): State.VENCRYPT_VERSION,
    (State.VENCRYPT_VERSION, Step.VENCRYPT_VERSION): State.VENCRYPT_SUBTYPE,
    (State.VENCRYPT_SUBTYPE, Step.VENCRYPT_SUBTYPE): State.TLS_HANDSHAKE,
    (State.TLS_HANDSHAKE, Step.SECURITY_NONE): State.CLIENT_INIT,
    (State.TLS_HANDSHAKE, Step.SECURITY_VNC): State.VNC_AUTH,
    (State.VNC_AUTH, Step.AUTHENTICATED): State.CLIENT_INIT,
    (State.CLIENT_INIT, Step.CLIENT_INIT): State.NORMAL,
    **{(state, Step.CLOSE): State.CLOSED for state in State},
}


class StateError(RuntimeError):
    """A move the table does not allow: a bug in the server, not the client."""


def next_state(state: State, step: Step) -> State:
    try:
        return TRANSITIONS[state, step]
    except KeyError:
        raise StateError(f"{step.name} is not a move from {state.name}") from None


class Request(str, enum.Enum):
    """The update a client waits for (continuous updates count as incremental)."""
    INCREMENTAL = "incremental"
    FULL = "full"


class ClientMsg(enum.IntEnum):
    """Client-to-server message types (RFC 6143 section 7.5 and extensions)."""
    SET_PIXEL_FORMAT = 0
    SET_ENCODINGS = 2
    FRAMEBUFFER_UPDATE_REQUEST = 3
    KEY_EVENT = 4
    POINTER_EVENT = 5
    CLIENT_CUT_TEXT = 6
    ENABLE_CONTINUOUS_UPDATES = 150
    CLIENT_FENCE = 248
    SET_DESKTOP_SIZE = 251
    QEMU = 255


class ServerMsg(enum.IntEnum):
    """Server-to-client message types."""
    FRAMEBUFFER_UPDATE = 0
    SET_COLOUR_MAP_ENTRIES = 1
    BELL = 2
    SERVER_CUT_TEXT = 3
    END_OF_CONTINUOUS_UPDATES = 150
    SERVER_FENCE = 248


class SecurityType(enum.IntEnum):
    NONE = 1
    VNC = 2
    VENCRYPT = 19


class VeNCryptSubtype(enum.IntEnum):
    """The VeNCrypt subtypes we offer: anonymous TLS or X.509, then None or VNC auth."""
    TLS_NONE = 257
    TLS_VNC = 258
    X509_NONE = 260
    X509_VNC = 261


QEMU_EXTENDED_KEY_EVENT = 0         # the only QEMU message subtype a client may send us


# Encoding numbers (RFC 6143 section 7.7), named once for the server's
# encoders (encodings.py re-exports them) and the client (client.py).
# Real encodings.
RAW, COPYRECT, RRE, HEXTILE, ZLIB, TIGHT, ZRLE = 0, 1, 2, 5, 6, 7, 16
TIGHT_PNG = -260
# Pseudo-encodings.
DESKTOP_SIZE = -223
LAST_RECT = -224
POINTER_TYPE_CHANGE = -257
QEMU_EXT_KEY = -258
QEMU_LED_STATE = -261
EXT_DESKTOP_SIZE = -308
FENCE = -312
CONTINUOUS_UPDATES = -313
JPEG_QUALITY_MIN, JPEG_QUALITY_MAX = -32, -23      # -32 worst .. -23 best
COMPRESS_LEVEL_MIN, COMPRESS_LEVEL_MAX = -256, -247  # -256 = 0 .. -247 = 9
