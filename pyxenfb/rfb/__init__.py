"""The RFB protocol, its encoders and its transport; no console, no keymap.

listener.py binds the TCP ports (light: the device model binds them before
its heavy imports), protocol.py is the sans-IO core, encodings.py the
rectangle encoders, auth.py VNC authentication and the blacklist,
websocket.py RFB over WebSocket, updates.py the one-way update path
(snapshot, encoder threads, then the connection), server.py the asyncio
transport (sessions, throttling, when to update).  client.py is the other
side: a sans-IO RFB client (standard library only) for every client we
have.  The VNC display of a console that
uses them is pyxenfb/vnc.py.
"""
from .listener import VncBindError

__all__ = ["VncBindError"]
