"""The VNC display: an RFB server of our own.

protocol.py is the sans-IO core, encodings.py the rectangle encoders,
auth.py VNC authentication and the blacklist, websocket.py RFB over
WebSocket, server.py the asyncio glue and the public `VncServer`.
"""
from .server import VncBindError, VncServer

__all__ = ["VncBindError", "VncServer"]
