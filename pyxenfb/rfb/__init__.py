"""The VNC display: an RFB server of our own.

listener.py binds the TCP ports (light: the device model binds them before
its heavy imports), protocol.py is the sans-IO core, encodings.py the
rectangle encoders, auth.py VNC authentication and the blacklist,
websocket.py RFB over WebSocket, server.py the asyncio glue and the public
`VncServer`.
"""
from .listener import VncBindError

__all__ = ["VncBindError", "VncServer"]


def __getattr__(name):
    # VncServer pulls in numpy: import it only when asked for.
    if name == "VncServer":
        from .server import VncServer
        return VncServer
    raise AttributeError(name)
