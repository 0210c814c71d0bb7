"""`pyxenfb-sim`: the simulated Xen host and its xl-like toolstack commands.

    pyxenfb-sim host --run-dir DIR [--zygote]
    pyxenfb-sim create --domid N --name NAME [--vfb SPEC] [--animate [full|text|desktop] [--fps F]] [...]
    pyxenfb-sim destroy --domid N
    pyxenfb-sim list
    pyxenfb-sim fbdump --domid N OUT.png
    pyxenfb-sim input-log --domid N [--follow]
    pyxenfb-sim demo [--vnc :1] [--sdl] [--open] [--console-port 8080]

Every command takes --run-dir DIR, defaulting to $PYXENFB_SIM.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from . import toolstack


def _add_run_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", default=os.environ.get("PYXENFB_SIM"),
                   help="the sim's run directory (default: $PYXENFB_SIM)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyxenfb-sim", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("host", help="run the simulated host (xenstored + event channels)")
    _add_run_dir(p)
    p.add_argument("--zygote", action="store_true",
                   help="also run pyxenfb-zygote on RUN_DIR/zygote.sock; `create` goes through it")

    p = sub.add_parser("create", help="create a PV domain, like `xl create`")
    _add_run_dir(p)
    p.add_argument("--domid", type=int, required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--memory", type=int, default=64, help="MiB (default 64)")
    p.add_argument("--vfb", help='xl vfb spec, e.g. "vnc=1,vncdisplay=0,vnclisten=127.0.0.1"')
    p.add_argument("--abi", choices=["x86_64", "x86_32"], default="x86_64")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--animate", nargs="?", const="box", choices=toolstack.ANIMATIONS, default=None,
                   help="the guest animates: box (alone: a moving square), full (repaints "
                        "the whole screen every frame, the benchmark load), text (a scrolling "
                        "text console) or desktop (a desktop's clock and cursor change)")
    p.add_argument("--fps", type=float, default=None,
                   help="with --animate full: at most F frames per second (default: as fast "
                        "as the device model consumes them)")
    p.add_argument("--echo-input", action="store_true",
                   help="the guest draws the keys, clicks and pointer it receives into its picture")
    p.add_argument("--no-guest", action="store_true",
                   help="do not start the reference guest (frontends stay Initialising)")
    dm = p.add_mutually_exclusive_group()
    dm.add_argument("--no-dm", action="store_true", help="do not start a device model")
    dm.add_argument("--dm", metavar="PROGRAM", help="device model program (default: pyqemu-dm)")
    p.add_argument("--dm-timeout", type=float, default=toolstack.DM_START_TIMEOUT,
                   help=argparse.SUPPRESS)
    p.add_argument("--dm-restrict", action="store_true",
                   help="as xl's dm_restrict=1: chroot RUN_DIR/qemu-root-N, pre-opened QMP socket, "
                        "-xen-domid-restrict, unshare + rlimits before exec")
    p.add_argument("--dm-user", metavar="USER",
                   help="as xl's device_model_user= (passed as -runas USER)")

    p = sub.add_parser("destroy", help="destroy a domain, like `xl destroy`")
    _add_run_dir(p)
    p.add_argument("--domid", type=int, required=True)

    p = sub.add_parser("list", help="list domains, like `xl list`")
    _add_run_dir(p)

    p = sub.add_parser("fbdump", help="write a guest's framebuffer, read from its RAM, as PNG")
    _add_run_dir(p)
    p.add_argument("--domid", type=int, required=True)
    p.add_argument("out", metavar="OUT.png")

    p = sub.add_parser("input-log", help="print the input events a reference guest received")
    _add_run_dir(p)
    p.add_argument("--domid", type=int, required=True)
    p.add_argument("--follow", "-f", action="store_true")

    p = sub.add_parser("demo", help="host + animating guest + pyqemu-dm on VNC, in one go")
    p.add_argument("--vnc", default=":1", metavar="[HOST]:DISPLAY", help="VNC display (default :1)")
    p.add_argument("--sdl", action="store_true", help="also open the SDL window (needs $DISPLAY)")
    p.add_argument("--open", action="store_true", help="start a VNC viewer if one is installed")
    p.add_argument("--seconds", type=float, help="stop after this many seconds (default: Ctrl-C)")
    p.add_argument("--run-dir", help="keep the sim's files here (default: a new temporary dir)")
    p.add_argument("--console-port", type=int, default=8080,
                   help="port of the web console, pyxenfb-console (default 8080, any free one if "
                        "taken; -1: don't start it)")
    return parser


async def _create(args: argparse.Namespace) -> int:
    dm = None if args.no_dm else (args.dm or "default")
    result = await toolstack.create_domain(
        args.run_dir, args.domid, args.name, memory=args.memory, vfb=args.vfb,
        abi=args.abi, width=args.width, height=args.height, animate=args.animate, fps=args.fps,
        dm=dm, start_guest=not args.no_guest, dm_timeout=args.dm_timeout,
        dm_restrict=args.dm_restrict, dm_user=args.dm_user, echo_input=args.echo_input)
    print(result.summary(), flush=True)
    return 0


async def _list(args: argparse.Namespace) -> int:
    print(toolstack.format_domain_list(await toolstack.list_domains(args.run_dir)))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from .demo import run_demo
        return run_demo(args.vnc, args.sdl, args.open, args.seconds, args.run_dir,
                        console_port=args.console_port)
    if args.command == "host":
        from .host import run_host
        return asyncio.run(run_host(toolstack.resolve_run_dir(args.run_dir), zygote=args.zygote))
    if args.command == "create":
        return asyncio.run(_create(args))
    if args.command == "destroy":
        asyncio.run(toolstack.destroy_domain(args.run_dir, args.domid))
        return 0
    if args.command == "list":
        return asyncio.run(_list(args))
    if args.command == "fbdump":
        from .fbdump import fbdump_array, write_png
        rgb = fbdump_array(args.run_dir, args.domid)
        write_png(rgb, args.out)
        print(f"domain {args.domid}: {rgb.shape[1]}x{rgb.shape[0]} written to {args.out}")
        return 0
    if args.command == "input-log":
        toolstack.follow_input_log(args.run_dir, args.domid, lambda line: print(line, flush=True),
                                   args.follow)
        return 0
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="pyxenfb-sim: %(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except toolstack.ToolstackError as exc:
        print(f"pyxenfb-sim: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:           # XenStoreError and friends
        print(f"pyxenfb-sim: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
