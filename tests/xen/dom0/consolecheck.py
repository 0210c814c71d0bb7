"""dom0 side of the host-console check: what pyxenfb-console lists, and one
full Raw frame of each listed domain relayed through its WebSocket.

    python3 consolecheck.py PORT OUTDIR

Writes OUTDIR/console-domains.txt (the API's answer) and, per domain,
OUTDIR/console-<name>.json + .ppm.rfb in rfbclient.py's capture format (the
host decodes them like every other grab).  Uses only what the DM's wheels
bring (websockets) and rfbclient.py.
"""
import json
import os
import sys
import urllib.request

from websockets.sync.client import connect

import rfbclient

TIMEOUT_S = 60


class WebSocketStream:
    """The socket calls rfbclient.Client makes (sendall, recv), over the relay's WebSocket."""

    def __init__(self, ws):
        self.ws = ws
        self.buf = bytearray()

    def sendall(self, data):
        self.ws.send(bytes(data))

    def recv(self, n):
        """What a socket's recv gives: what is buffered, else the next message (at most n)."""
        if not self.buf:
            message = self.ws.recv(timeout=TIMEOUT_S)
            self.buf += message if isinstance(message, bytes) else message.encode()
        out, self.buf = bytes(self.buf[:n]), self.buf[n:]
        return out


class RelayedClient(rfbclient.Client):
    def __init__(self, ws):
        super().__init__(data=b"")               # no socket of its own
        self.replay = None
        self.sock = WebSocketStream(ws)
        self.skim = True


def main(argv):
    port, out = int(argv[0]), argv[1]
    base = "http://127.0.0.1:%d" % port
    with urllib.request.urlopen(base + "/api/domains", timeout=TIMEOUT_S) as reply:
        domains = json.load(reply)
    with open(os.path.join(out, "console-domains.txt"), "w") as f:
        json.dump(domains, f)
    status = 0
    for dom in domains:
        name = dom["name"]
        result = {"grabs": [], "done": [], "error": None}
        try:
            with connect("ws://127.0.0.1:%d/domain/%d/websockify" % (port, dom["domid"]),
                         origin=base, open_timeout=TIMEOUT_S, max_size=None) as ws:
                client = RelayedClient(ws)
                client.handshake(None)
                rfbclient.run(client, ["grab:raw:%s" % os.path.join(out, "console-%s.ppm" % name)],
                              result)
                result.update(client.info)
        except Exception as e:          # recorded for the host-side test, never fatal here
            result["error"] = "%s: %s" % (type(e).__name__, e)
            status = 1
        with open(os.path.join(out, "console-%s.json" % name), "w") as f:
            json.dump(result, f)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
