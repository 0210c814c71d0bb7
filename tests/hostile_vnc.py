"""A hostile VNC client storm, as its own process (its own GIL):

    python tests/hostile_vnc.py PORT COUNT [THREADS]

Each connection sends a bad protocol version, waits for the server to close,
and resets (SO_LINGER 0: no TIME_WAIT, so 100,000 connections fit in the
ephemeral port range).  Prints "done N" with the number completed.
"""
import socket
import struct
import sys
import threading

BAD_VERSION = b"RFB 000.000\n"
LINGER_RESET = struct.pack("ii", 1, 0)


def storm(port: int, count: int, done: list[int]) -> None:
    for _ in range(count):
        s = socket.socket()
        s.settimeout(30)
        try:
            s.connect(("127.0.0.1", port))
            s.sendall(BAD_VERSION)
            while s.recv(4096):        # the server's banner, then its close
                pass
        except OSError:
            pass                        # refused or reset: still a hostile connection
        finally:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            s.close()
        done[0] += 1


def main() -> None:
    port, count = int(sys.argv[1]), int(sys.argv[2])
    threads = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    done = [0]
    per = [count // threads + (i < count % threads) for i in range(threads)]
    workers = [threading.Thread(target=storm, args=(port, n, done)) for n in per]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    print(f"done {done[0]}", flush=True)


if __name__ == "__main__":
    main()
