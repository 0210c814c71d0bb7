"""`pyxenfb-console`: serve every domain's VNC console in one web page.

    pyxenfb-console [--listen 127.0.0.1] [--port 8080]
                    [--cert FILE --key FILE --password-file FILE] [--novnc DIR]
    pyxenfb-console --hash-password        # prints a line for --password-file

On a dom0 it reads xenstored; with PYXENFB_SIM=DIR (or --sim DIR) the
simulated host's.  Any address other than loopback needs TLS and a login.
"""
from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import resource
import signal
import ssl
import sys

from ..platform.host import PlatformUnavailable, detect
from .app import ConsoleApp, Settings, is_loopback, novnc_available
from .auth import PasswordFileError, PasswordHash, hash_password
from .domains import DomainDirectory
from .server import HEADER_TIMEOUT, ConnectionGate, GuardedSite, budget_accept_errors, connection_limits

log = logging.getLogger("pyxenfb.console.core")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyxenfb-console", description=__doc__.split("\n")[0])
    p.add_argument("--listen", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="TCP port (default 8080; 0: any free one)")
    p.add_argument("--cert", help="TLS certificate chain (PEM); required off loopback")
    p.add_argument("--key", help="TLS private key (PEM)")
    p.add_argument("--password-file", help="login password hash (from --hash-password); "
                                           "required off loopback")
    p.add_argument("--allowed-origin", action="append", default=[], metavar="URL",
                   help="also accept this Origin (a reverse proxy's, e.g. https://console.example)")
    p.add_argument("--novnc", default="/usr/share/novnc", metavar="DIR",
                   help="noVNC's files (default: Debian's /usr/share/novnc)")
    p.add_argument("--sim", metavar="DIR", help="use the simulated host in DIR (= PYXENFB_SIM=DIR)")
    p.add_argument("--thumb-interval", type=float, default=2.0, help=argparse.SUPPRESS)
    p.add_argument("--thumb-idle", type=float, default=10.0, help=argparse.SUPPRESS)
    p.add_argument("--session-ttl", type=float, default=None, help=argparse.SUPPRESS)   # tests
    p.add_argument("--header-timeout", type=float, default=HEADER_TIMEOUT, help=argparse.SUPPRESS)
    p.add_argument("--hash-password", action="store_true",
                   help="read a password (twice) and print its salted scrypt hash")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _fail(message: str, code: int = 2) -> int:
    """One line on stderr; exit 2 for refused options, 1 for what failed at run time."""
    print(f"pyxenfb-console: {message}", file=sys.stderr, flush=True)
    return code


def _tls_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


async def serve(args, settings: Settings, tls: ssl.SSLContext | None) -> int:
    from aiohttp import web
    env = dict(os.environ, PYXENFB_SIM=args.sim) if args.sim else os.environ
    try:
        platform = detect(env)
    except PlatformUnavailable as e:
        return _fail(str(e), 1)
    try:
        xs = await platform.open_xenstore()
    except OSError as e:           # XenStoreError is one: no socket, no permission (not root)
        return _fail(f"cannot open XenStore ({platform.xenstore_path}): {e}", 1)
    directory = DomainDirectory(xs)
    try:
        await directory.start()
    except OSError as e:
        xs.close()
        return _fail(f"cannot read the domains from XenStore: {e}", 1)
    console = ConsoleApp(directory, settings, session_ttl=args.session_ttl)
    loop = asyncio.get_running_loop()
    budget_accept_errors(loop, console.budget)
    # aiohttp's keep-alive timer runs from the connection's start: it is the deadline
    # for complete request headers (server.py).
    runner = web.AppRunner(console.app, access_log=None, handle_signals=False,
                           keepalive_timeout=args.header_timeout)
    await runner.setup()
    total, per_address = connection_limits()
    gate = ConnectionGate(total, per_address, console.budget)
    site = GuardedSite(runner, args.listen, args.port, tls=tls, gate=gate, budget=console.budget,
                       header_timeout=args.header_timeout)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        return _fail(f"cannot listen on {args.listen}:{args.port}: {e.strerror}", 1)
    host, port = runner.addresses[0][:2]
    shown = f"[{host}]" if ":" in host else host
    if not novnc_available(settings.novnc_dir):
        log.warning("noVNC not found in %s: console pages will say so (apt install novnc, "
                    "or --novnc DIR)", settings.novnc_dir)
    log.info("at most %d connections (%d per client address; descriptor limit %d); "
             "%.0f s for TLS and for request headers", total, per_address,
             resource.getrlimit(resource.RLIMIT_NOFILE)[0], args.header_timeout)
    print(f"pyxenfb-console: serving {'https' if tls else 'http'}://{shown}:{port}/ "
          f"({len(directory.domains)} domains with VNC, {platform.kind} XenStore)", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    lost = asyncio.ensure_future(xs.closed)
    await asyncio.wait([asyncio.ensure_future(stop.wait()), lost], return_when=asyncio.FIRST_COMPLETED)
    await runner.cleanup()
    await directory.close()
    xs.close()
    if lost.done():
        return _fail("lost the XenStore connection", 1)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="pyxenfb-console: %(message)s")
    if args.hash_password:
        first = getpass.getpass("password: ")
        if first != getpass.getpass("again: "):
            return _fail("the passwords differ")
        print(hash_password(first))
        return 0
    loopback = is_loopback(args.listen)
    if bool(args.cert) != bool(args.key):
        return _fail("--cert and --key go together")
    if not loopback and not (args.cert and args.password_file):
        return _fail(f"refusing to listen on {args.listen} without TLS and a login "
                     "(--cert, --key, --password-file); use 127.0.0.1 behind a reverse proxy "
                     "or an SSH tunnel otherwise")
    try:
        password = PasswordHash.load(args.password_file) if args.password_file else None
        tls = _tls_context(args.cert, args.key) if args.cert else None
    except PasswordFileError as e:
        return _fail(str(e))
    except (OSError, ssl.SSLError) as e:
        return _fail(f"TLS certificate/key: {e}")
    settings = Settings(tls=tls is not None, password=password, novnc_dir=args.novnc,
                        allowed_origins=set(args.allowed_origin), loopback_only=loopback,
                        thumb_interval=args.thumb_interval, thumb_idle=args.thumb_idle)
    return asyncio.run(serve(args, settings, tls))


if __name__ == "__main__":
    sys.exit(main())
