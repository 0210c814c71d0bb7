"""The metrics of `python -m bench`: one JSON line each.

    {"name", "value", "unit", "baseline", "baseline_value", "ratio", ...}

ratio = our cost / the baseline's cost (time per item, or 1 / rate): below
1.0 we are better.  A baseline that can't be measured here (tool missing)
gives "baseline_value": null and a "skipped" reason, never a crash.
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from pyxenfb.rfb.client import NEED_DATA, Connection, FramebufferUpdate, ServerInit
from pyxenfb.rfb.states import RAW

from .procs import SimHost, context_switches, cpu_seconds, lossy_dm, memory_kib

REPO = Path(__file__).resolve().parent.parent
ANCHORS = Path(os.environ.get("BENCH_ANCHORS", REPO.parent / "shared" / "bench"))
ENCODINGS = ["Raw", "Hextile", "Zlib", "ZRLE", "Tight"]
SIZES = [(800, 600), (1920, 1080)]


def metric(name, value, unit, baseline=None, baseline_value=None, ratio=None, **extra) -> dict:
    d = {"name": name, "value": value, "unit": unit, "baseline": baseline,
         "baseline_value": baseline_value, "ratio": None if ratio is None else round(ratio, 3)}
    d.update(extra)
    return d


def cost_ratio_rate(ours, base):
    """Rates (higher is better): our cost / theirs = their rate / ours."""
    return base / ours if ours and base else None


def cost_ratio_time(ours, base):
    return ours / base if ours is not None and base else None


def anchor(name: str) -> Path | None:
    p = ANCHORS / name
    return p if p.exists() else None


def missing_anchor(name: str) -> str:
    return f"{ANCHORS / name} not found (the shared anchor tools; set BENCH_ANCHORS)"


# ---- conversion vs pixman and memcpy; whole updates vs libvncserver ----------------
def delegated(module: str, quick: bool) -> list[dict]:
    """bench.<module>.run(quick): its rows, each with every field a metric has."""
    run = importlib.import_module(f"bench.{module}").run
    # stdout carries only our JSON lines: whatever run() prints goes to stderr
    with contextlib.redirect_stdout(sys.stderr):
        rows = [d for d in run(quick) if isinstance(d, dict)]
    for d in rows:
        for k in ("name", "value", "unit", "baseline", "baseline_value", "ratio"):
            d.setdefault(k, None)
    return rows


def bench_convert(ctx) -> list[dict]:
    return delegated("bench_convert", ctx.quick)


def bench_libvncserver(ctx) -> list[dict]:
    return delegated("bench_vs_libvncserver", ctx.quick)


def bench_encoders(ctx) -> list[dict]:
    return delegated("bench_encoders", ctx.quick)


# ---- frames/s, bytes per frame and latency per encoding vs x11vnc and Xvnc ---------------
def vnc_rate(ctx, port: int, enc: str, seconds: float, dm_pid: int | None = None,
             sample_memory: bool = False, prefix: list[str] | None = None,
             jpeg: int | None = None) -> dict:
    """One vnc-rate run; adds the DM's CPU % (and its peak RSS/PSS) over it.
    prefix: run the client under it (a network namespace); jpeg: ask Tight for
    JPEG at that quality level (bench/vnc_rate_ext.py)."""
    tool = anchor("vnc-rate")
    if tool is None:
        return {"error": missing_anchor("vnc-rate")}
    client = ([sys.executable, str(Path(__file__).with_name("vnc_rate_ext.py")), "--jpeg-quality",
               str(jpeg)] if jpeg is not None else [sys.executable, str(tool)])
    p = ctx.procs.popen([*(prefix or []), *client, f"127.0.0.1::{port}", "--encoding", enc,
                         "--seconds", str(seconds)], stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True,
                        env=dict(os.environ, BENCH_ANCHORS=str(ANCHORS)))
    c0, t0 = (cpu_seconds(dm_pid) if dm_pid else 0.0), time.monotonic()
    peak = {"rss": 0, "pss": 0}
    deadline = t0 + seconds + 60
    while p.poll() is None and time.monotonic() < deadline:
        if sample_memory and dm_pid:
            m = memory_kib(dm_pid)
            peak = {k: max(peak[k], m[k] or 0) for k in peak}
        try:
            p.wait(0.25)
        except subprocess.TimeoutExpired:
            pass
    if p.poll() is None:
        p.kill()
    out, err = p.communicate()
    wall = time.monotonic() - t0
    try:
        d = json.loads(out.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"error": (err.strip().splitlines() or ["vnc-rate failed"])[-1]}
    if dm_pid:
        d["dm_cpu_pct"] = round(100 * (cpu_seconds(dm_pid) - c0) / wall, 1)
    if sample_memory:
        d["dm_peak_kib"] = peak
    return d


def bytes_per_frame(r: dict | None) -> int | None:
    """Wire bytes per full frame's worth of updated pixels: the raw bytes of a
    frame / vnc-rate's compression (its MB/s is rounded to 10 kB/s, too coarse
    for a desktop's small updates)."""
    if not r or not r.get("compression") or not r.get("width"):
        return None
    return round(r["width"] * r["height"] * r.get("bpp", 32) // 8 / r["compression"])


def anchor_fields(name: str, r: dict | None) -> dict:
    """The anchor's figures beside ours in a line: {name}_fps, _bytes_per_frame, ..."""
    r = r or {}
    return {f"{name}_fps": r.get("full_frames_per_s"), f"{name}_bytes_per_frame": bytes_per_frame(r),
            f"{name}_updates_per_s": r.get("updates_per_s"), f"{name}_bytes_per_update": r.get("bytes_per_update"),
            f"{name}_latency_ms_p50": r.get("latency_ms_p50"),
            f"{name}_compression": r.get("compression"), f"{name}_cpu_pct": r.get("x11vnc_cpu_pct",
                                                                                  r.get("dm_cpu_pct"))}


# the shared anchor scripts: server name -> (script, tools, install hint)
ANCHOR_SCRIPTS = {
    "x11vnc": ("anchor-x11vnc.sh", ("Xvfb", "x11vnc", "gcc"), "xvfb x11vnc gcc libx11-dev"),
    "xvnc": ("anchor-xvnc.sh", ("Xvnc", "gcc"), "tigervnc-standalone-server gcc libx11-dev"),
}


def script_anchor(ctx, server: str, w: int, h: int, seconds: float) -> tuple[dict, str | None]:
    """../shared/bench/anchor-{server}.sh on xanim's gradient: {encoding: its JSON}."""
    name, tools, install = ANCHOR_SCRIPTS[server]
    script = anchor(name)
    if script is None:
        return {}, missing_anchor(name)
    for tool in tools:
        if not shutil.which(tool):
            return {}, f"{tool} missing (apt-get install {install})"
    env = dict(os.environ, ENCODINGS=" ".join(ENCODINGS), REPLAY_MB="0")
    p = ctx.procs.popen(["bash", str(script), f"{w}x{h}", str(seconds), "gradient"],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    out, err = p.communicate(timeout=len(ENCODINGS) * (seconds + 30) + 60)
    got = {}
    for line in out.splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if "error" not in d:
            got[d["encoding"]] = d
    if not got:
        return {}, f"{name} gave no figures: {(err.strip().splitlines() or ['?'])[-1]}"
    return got, None


def x11vnc_anchor(ctx, w: int, h: int, seconds: float) -> tuple[dict, str | None]:
    return script_anchor(ctx, "x11vnc", w, h, seconds)


def compared(prefix: str, enc: str, size: str, r: dict, anchors: dict[str, tuple[dict | None, str | None]],
             fps_baseline: str, **extra) -> list[dict]:
    """Lines for one (content, encoding, size): frames/s against `fps_baseline`
    and bytes per full frame against Xvnc, each with every anchor's figures
    and ratios beside (ratio_<anchor> = our cost / theirs)."""
    fps, bpf = r["full_frames_per_s"], bytes_per_frame(r)
    beside = {"compression": r.get("compression"), "bytes_per_update": r.get("bytes_per_update"),
              "updates_per_s": r.get("updates_per_s"), "latency_ms_p50": r.get("latency_ms_p50"),
              "dm_cpu_pct": r.get("dm_cpu_pct"), **extra}
    fps_ratios, bpf_ratios, why = {}, {}, {}
    for name, (a, skip) in anchors.items():
        beside.update(anchor_fields(name, a))
        fps_ratios[f"ratio_{name}"] = cost_ratio_rate(fps, a and a["full_frames_per_s"])
        bpf_ratios[f"ratio_{name}"] = cost_ratio_time(bpf, bytes_per_frame(a))
        if skip:
            why[f"{name}_skipped"] = skip
    def r3(d):
        return {k: None if v is None else round(v, 3) for k, v in d.items()}
    base = anchors.get(fps_baseline, (None, None))[0]
    bx = anchors.get("xvnc", (None, None))[0]
    skip = {"skipped": why[f"{fps_baseline}_skipped"]} if f"{fps_baseline}_skipped" in why else {}
    return [metric(f"{prefix}fps_{enc}_{size}", fps, "frames/s", fps_baseline,
                   base and base["full_frames_per_s"], fps_ratios[f"ratio_{fps_baseline}"],
                   **beside, **r3(fps_ratios), **why, **skip),
            metric(f"{prefix}bytes_per_frame_{enc}_{size}", bpf, "bytes", "xvnc", bytes_per_frame(bx),
                   bpf_ratios.get("ratio_xvnc"), **beside, **r3(bpf_ratios), **why,
                   **({"skipped": why["xvnc_skipped"]} if "xvnc_skipped" in why else {}))]


def bench_vnc_rate(ctx) -> list[dict]:
    secs = 2 if ctx.quick else 5
    if anchor("vnc-rate") is None:
        return [metric("vnc_fps", None, "frames/s", "x11vnc", None, skipped=missing_anchor("vnc-rate"))]
    out = []
    for w, h in SIZES:
        size = f"{w}x{h}"
        bases = {server: script_anchor(ctx, server, w, h, secs) for server in ANCHOR_SCRIPTS}
        sim = SimHost(ctx.procs)
        port = sim.create(1, width=w, height=h, animate="full", memory=64 if w * h < 2e6 else 128)
        dm = sim.pid(1, "dm")
        for enc in ENCODINGS:
            r = vnc_rate(ctx, port, enc, secs, dm, sample_memory=(enc == "Tight" and w == 800))
            per_enc = {server: (got.get(enc), why or (None if got.get(enc) else
                                                      f"{server} gave no {enc} figure"))
                       for server, (got, why) in bases.items()}
            b = per_enc["x11vnc"][0]
            if "error" in r:
                out.append(metric(f"vnc_fps_{enc}_{size}", None, "frames/s", "x11vnc",
                                  b and b["full_frames_per_s"], error=r["error"]))
                continue
            out += compared("vnc_", enc, size, r, per_enc, "x11vnc", seconds=secs,
                            x11vnc_cpu_pct=b and b.get("x11vnc_cpu_pct"))
            for p in ("p50", "p99"):
                ours, theirs = r[f"latency_ms_{p}"], b and b[f"latency_ms_{p}"]
                bx = per_enc["xvnc"][0]
                skip = {"skipped": per_enc["x11vnc"][1]} if per_enc["x11vnc"][1] else {}
                out.append(metric(f"vnc_latency_{p}_{enc}_{size}", ours, "ms", "x11vnc", theirs,
                                  cost_ratio_time(ours, theirs), xvnc=bx and bx[f"latency_ms_{p}"],
                                  ratio_xvnc=cost_ratio_time(ours, bx and bx[f"latency_ms_{p}"]), **skip))
            if "dm_peak_kib" in r:
                ctx.animating_memory = r["dm_peak_kib"]
        sim.kill_domains()
    return out


# ---- the same for a text console and a desktop (pyxenfb/sim/content.py) -----------------
# Sources run uncapped (as xanim), but a desktop's clock and cursor: 30 changes/s
# on both sides is already more than a desktop makes, uncapped it would be
# tens of thousands of 64x16 updates a second.
CONTENT_FPS = {"desktop": 30}


class Sources:
    """The animations of one comparison (our sim guests, each X anchor's
    xplay).  While one server is measured the others' sources are stopped
    (SIGSTOP, then SIGCONT), so that none is measured on cores the others'
    uncapped sources keep busy: on 2 cores an 8 MB-a-frame player costs
    whoever shares them with it."""

    def __init__(self):
        self._pids: dict[str, list[tuple[int, bool]]] = {}     # key -> [(pid, is a group)]

    def add_guest(self, key: str, sim: SimHost, domid: int) -> None:
        self._pids.setdefault(key, []).append((sim.pid(domid, "guest"), True))   # its own session

    def add_players(self, anchors: dict) -> None:
        for key, a in anchors.items():
            if not isinstance(a, str) and a.player is not None:
                self._pids.setdefault(key, []).append((a.player.pid, False))

    @staticmethod
    def _signal(pid: int, group: bool, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            (os.killpg if group else os.kill)(pid, sig)

    @contextlib.contextmanager
    def only(self, key: str):
        """Every source but `key`'s stopped for the block."""
        stopped = [(pid, group) for k, items in self._pids.items() if k != key for pid, group in items]
        for pid, group in stopped:
            self._signal(pid, group, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid, group in stopped:
                self._signal(pid, group, signal.SIGCONT)


def x_anchors(ctx, content: str, w: int, h: int, prefix: list[str] | None = None):
    """{server: XAnchor playing `content`'s frames or the reason it can't}."""
    from pyxenfb.sim.content import content_frames, write_frames_file

    from .xside import Missing, XAnchor, build_xplay
    got: dict = {}
    try:
        xplay = build_xplay(ctx.procs)
    except Missing as e:
        return {server: str(e) for server in ANCHOR_SCRIPTS}
    frames_file = os.path.join(ctx.procs.tempdir("pxb-frames-"), f"{content}-{w}x{h}.bin")
    write_frames_file(frames_file, *content_frames(content, w, h))
    for server in ANCHOR_SCRIPTS:
        try:
            a = XAnchor(ctx.procs, server, w, h, prefix)
            a.play(xplay, frames_file, CONTENT_FPS.get(content))
            got[server] = a
        except (Missing, RuntimeError) as e:
            got[server] = f"{server}: {e}"
    return got


def measure_anchor(ctx, a, enc: str, secs: float, prefix=None, jpeg=None) -> tuple[dict | None, str | None]:
    if isinstance(a, str):
        return None, a
    r = vnc_rate(ctx, a.port, enc, secs, a.pid, prefix=prefix, jpeg=jpeg)
    if "error" in r:
        return None, f"{a.kind}: {r['error']}"
    r["x11vnc_cpu_pct"], r["player_fps"] = r.pop("dm_cpu_pct", None), a.player_fps()
    return r, None


def bench_vnc_content(ctx) -> list[dict]:
    """Text console and desktop: ours vs Xvnc vs x11vnc serving the same frames."""
    from pyxenfb.sim.content import console_font
    secs = 2 if ctx.quick else 5
    if anchor("vnc-rate") is None:
        return [metric("vnc_content", None, "frames/s", skipped=missing_anchor("vnc-rate"))]
    sizes = SIZES[:1] if ctx.quick else SIZES
    out = []
    font = console_font().name
    for content in ("text", "desktop"):
        for w, h in sizes:
            size = f"{w}x{h}"
            xs = x_anchors(ctx, content, w, h)
            sim = SimHost(ctx.procs)
            port = sim.create(1, width=w, height=h, animate=content, fps=CONTENT_FPS.get(content),
                              memory=64 if w * h < 2e6 else 128)
            dm = sim.pid(1, "dm")
            # A client connected throughout: else each vnc-rate run starts with the
            # backend leaving XENFB_NO_REFRESH, and the guest (as Linux) answers that
            # with a full-screen refresh, one 1.9 MB update among the desktop's small ones.
            # The keeper's own arrival causes that refresh once: it waits for it too.
            keeper = RawClient(port)
            keeper.handshake()
            settled = keeper.await_full_refresh()
            sources = Sources()
            sources.add_guest("ours", sim, 1)
            sources.add_players(xs)
            for enc in ENCODINGS:
                with sources.only("ours"):
                    r = vnc_rate(ctx, port, enc, secs, dm)
                anchors = {}
                for server, a in xs.items():
                    with sources.only(server):
                        anchors[server] = measure_anchor(ctx, a, enc, secs)
                if "error" in r:
                    out.append(metric(f"vnc_{content}_fps_{enc}_{size}", None, "frames/s", "xvnc",
                                      None, error=r["error"]))
                    continue
                out += compared(f"vnc_{content}_", enc, size, r, anchors, "xvnc", seconds=secs,
                                content=content, font=font, source_fps=CONTENT_FPS.get(content),
                                guest_refresh_settled=settled, others_paused=True)
            keeper.close()
            sim.kill_domains()
            ctx.procs.cleanup()                 # the X servers of this content and size
    return out


# ---- over a slow link: 10 Mbit/s, 20 ms each way ---------------------------------------
SLOW_ENCODINGS = [("Tight", None), ("Tight", 6), ("ZRLE", None), ("Hextile", None)]


def bench_slow_link(ctx) -> list[dict]:
    """Frames/s and request->update latency through a 10 Mbit/s, 20 ms link
    (bench/link.py: netem in a namespace of our own, else a user-space relay)."""
    from .link import LinkError, Relay, netem_namespace
    secs = 3 if ctx.quick else 8
    if anchor("vnc-rate") is None:
        return [metric("slow_link", None, "frames/s", skipped=missing_anchor("vnc-rate"))]
    cases = [("gradient", 800, 600), ("text", 800, 600)]
    if not ctx.quick:
        cases += [("gradient", 1920, 1080), ("text", 1920, 1080)]
    out = []
    for content, w, h in cases:
        with contextlib.ExitStack() as stack:
            try:
                prefix, link = stack.enter_context(netem_namespace("10mbit", "20ms")), "netem"
            except LinkError as e:
                prefix, link, why_relay = [], "relay", str(e)
            sim = SimHost(ctx.procs, prefix=prefix)
            port = sim.create(1, width=w, height=h, animate="full" if content == "gradient" else content,
                              memory=64 if w * h < 2e6 else 128)
            # Tight JPEG needs QEMU's lossy=on (xl can't set it): a second domain has it
            lossy_port = sim.create(2, width=w, height=h, dm=lossy_dm(ctx.procs),
                                    animate="full" if content == "gradient" else content,
                                    memory=64 if w * h < 2e6 else 128)
            servers = {"ours": port, "ours_lossy": lossy_port}
            xs = x_anchors(ctx, content, w, h, prefix)
            servers.update({k: a.port for k, a in xs.items() if not isinstance(a, str)})
            relays = {}
            if link == "relay":                  # each server behind its own emulated link
                for k, p in servers.items():
                    relays[k] = Relay(p, 10e6, 0.020)
                    stack.callback(relays[k].close)
            pids = {"ours": sim.pid(1, "dm"), "ours_lossy": sim.pid(2, "dm"),
                    **{k: a.pid for k, a in xs.items() if not isinstance(a, str)}}
            sources = Sources()
            sources.add_guest("ours", sim, 1)
            sources.add_guest("ours_lossy", sim, 2)
            sources.add_players(xs)
            for enc, jpeg in SLOW_ENCODINGS:
                label = enc + (f"JPEG{jpeg}" if jpeg is not None else "")
                res = {}
                for k in ("ours", *xs):
                    if k not in servers:
                        res[k] = (None, xs[k])
                        continue
                    server = "ours_lossy" if k == "ours" and jpeg is not None else k
                    p = relays[server].port if server in relays else servers[server]
                    with sources.only(server):
                        r = vnc_rate(ctx, p, enc, secs, pids[server], prefix=prefix, jpeg=jpeg)
                    res[k] = (None, r["error"]) if "error" in r else (r, None)
                ours, why = res.pop("ours")
                name = f"slow_{content}_{label}_{w}x{h}"
                extra = {"link": link, "rate_mbit": 10, "delay_ms_each_way": 20, "seconds": secs,
                         "others_paused": True,
                         "content": content, "ours_vnc": "lossy=on" if jpeg is not None else "",
                         **({"netem_missing": why_relay} if link == "relay" else {})}
                if ours is None:
                    out.append(metric(f"{name}_fps", None, "frames/s", "xvnc", None, error=why, **extra))
                    continue
                for key, unit, cost in (("full_frames_per_s", "frames/s", cost_ratio_rate),
                                        ("latency_ms_p50", "ms", cost_ratio_time)):
                    bx = res["xvnc"][0]
                    beside = {f"{k}_{key}": (a or {}).get(key) for k, (a, _) in res.items()}
                    ratios = {f"ratio_{k}": None if cost(ours[key], a and a.get(key)) is None
                              else round(cost(ours[key], a.get(key)), 3) for k, (a, _) in res.items()}
                    skips = {f"{k}_skipped": s for k, (a, s) in res.items() if s}
                    out.append(metric(f"{name}_{'fps' if unit == 'frames/s' else 'latency_p50'}",
                                      ours[key], unit, "xvnc", bx and bx.get(key),
                                      cost(ours[key], bx and bx.get(key)), **beside, **ratios,
                                      bytes_per_frame=bytes_per_frame(ours),
                                      xvnc_bytes_per_frame=bytes_per_frame(bx), **skips, **extra))
            sim.kill_domains()
            ctx.procs.cleanup()
    return out


# ---- guest UPDATE -> client has the pixels, 64x64 -------------------------------
class RawClient:
    """Blocking socket wrapper over the sans-IO client: RFB 3.8, None auth,
    native 32 bpp, Raw only."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn = Connection(encodings=[RAW])

    def _until(self, kind: type):
        """Feed the connection until an event of `kind` (others, a Bell, are dropped)."""
        conn = self.conn
        while True:
            ev = conn.next_event()
            out = conn.data_to_send()
            if out:
                self.sock.sendall(out)
            if ev is NEED_DATA:
                conn.receive_data(self.sock.recv(1 << 17))
            elif isinstance(ev, kind):
                return ev

    def handshake(self) -> tuple[int, int]:
        ev = self._until(ServerInit)
        self.w, self.h = ev.width, ev.height
        return ev.width, ev.height

    def request(self, incremental: bool = True) -> None:
        self.conn.request(incremental)
        self.sock.sendall(self.conn.data_to_send())

    def update(self) -> list[tuple[int, int, int, int, bytes]]:
        """One FramebufferUpdate: [(x, y, w, h, raw pixels)]."""
        ev = self._until(FramebufferUpdate)
        return [(r.x, r.y, r.w, r.h, self.conn.pixels(r.x, r.y, r.w, r.h)) for r in ev.rects]

    def await_full_refresh(self, timeout: float = 5.0) -> bool:
        """Read updates until one covers the whole picture: the guest's
        full-screen refresh in answer to a display becoming visible (it
        comes a frame or so after ClientInit).  False if none came within
        `timeout` (it went out inside the first full update instead)."""
        self.request(incremental=False)
        self.update()
        deadline = time.monotonic() + timeout
        try:
            while (left := deadline - time.monotonic()) > 0:
                self.sock.settimeout(left)
                self.request(incremental=True)
                if any((x, y, w, h) == (0, 0, self.w, self.h) for x, y, w, h, _ in self.update()):
                    return True
            return False
        except socket.timeout:
            return False
        finally:
            self.sock.settimeout(30)

    def close(self):
        self.sock.close()


async def _update_latency(run_dir: str, domid: int, port: int, n: int) -> list[float]:
    import numpy as np

    from pyxenfb.sim.guest import ReferenceGuest
    guest = ReferenceGuest(run_dir, domid, width=800, height=600)
    await guest.start()
    try:
        await guest.wait_connected(15)
        deadline = time.monotonic() + 15
        while not guest.fb.update_wanted:         # backend's request-update, read on Connected
            if time.monotonic() > deadline:
                raise RuntimeError("the backend never asked for updates")
            await asyncio.sleep(0.01)
        client = RawClient(port)
        await asyncio.to_thread(client.handshake)
        client.request(False)
        await asyncio.to_thread(client.update)
        fb, S = guest.fb, 64
        lat = []
        for i in range(n + 20):                  # 20 warm-up updates
            colour = 0x102030 + (i * 0x0B0705) & 0xFFFFFF
            x, y = (i * 97) % (800 - S), (i * 53) % (600 - S)
            want = np.full(S * S, colour, "<u4")
            client.request(True)                  # pending before the guest draws
            # the backend must have consumed our last UPDATE, else refresh() would stash
            while fb.out_ring_busy():
                fb.backend_kicked.clear()
                await asyncio.wait_for(fb.backend_kicked.wait(), 5)
            t0 = time.perf_counter()
            fb.fb[y:y + S, x:x + S] = colour
            fb.refresh(x, y, S, S)                # UPDATE on the ring + event-channel notify
            while True:
                # the guest's loop must keep running (event channel) while we read
                rects = await asyncio.to_thread(client.update)
                t1 = time.perf_counter()
                if any(rx <= x and ry <= y and rx + rw >= x + S and ry + rh >= y + S and
                       np.array_equal(np.frombuffer(px, "<u4").reshape(rh, rw)
                                      [y - ry:y - ry + S, x - rx:x - rx + S].ravel() & 0xFFFFFF,
                                      want) for rx, ry, rw, rh, px in rects):
                    break
                client.request(True)
            if i >= 20:
                lat.append(t1 - t0)
        client.close()
        return lat
    finally:
        await guest.stop()


def bench_update_latency(ctx) -> list[dict]:
    n = 500 if ctx.quick else 2000
    sim = SimHost(ctx.procs)
    port = sim.create(1, guest=False)
    lat = asyncio.run(_update_latency(sim.run_dir, 1, port, n))
    sim.kill_domains()
    lat_ms = sorted(t * 1e3 for t in lat)
    p50 = lat_ms[len(lat_ms) // 2]
    p99 = lat_ms[min(len(lat_ms) - 1, int(round(0.99 * (len(lat_ms) - 1))))]
    samples = None
    if ctx.out_dir:
        samples = os.path.join(ctx.out_dir, "latency_64x64_samples.json")
        Path(samples).write_text(json.dumps([round(t, 4) for t in lat_ms]))
    extra = {"updates": len(lat_ms), "samples": samples and os.path.basename(samples)}
    return [metric("update_latency_64x64_p50", round(p50, 3), "ms", "target", 2.0,
                   cost_ratio_time(p50, 2.0), **extra),
            metric("update_latency_64x64_p99", round(p99, 3), "ms", "target", 10.0,
                   cost_ratio_time(p99, 10.0), **extra)]


# ---- idle wake-ups and memory ---------------------------------------------------
def bench_idle(ctx) -> list[dict]:
    secs = 2.0 if ctx.quick else 5.0
    sim = SimHost(ctx.procs)
    port = sim.create(1)                           # guest drawn once, then idle
    dm = sim.pid(1, "dm")
    client = RawClient(port)
    client.handshake()
    client.request(False)
    client.update()
    client.request(True)                           # pending, as a viewer keeps one
    time.sleep(0.5)                                # let connection set-up work settle
    s0, t0 = context_switches(dm), time.monotonic()
    time.sleep(secs)                               # the measurement window itself
    s1 = context_switches(dm)
    rate = (s1 - s0) / (time.monotonic() - t0)
    mem = memory_kib(dm)
    client.close()
    sim.kill_domains()
    out = [metric("idle_wakeups", round(rate, 1), "context switches/s", "ideal", 0, None,
                  seconds=secs, switches_total=s1, threads=len(os.listdir(f"/proc/{dm}/task")),
                  dm_pid=dm)]
    out.append(metric("dm_rss_idle", mem["rss"], "KiB", None, None, None))
    out.append(metric("dm_pss_idle", mem["pss"], "KiB", None, None, None))
    return out


def _until_dead(pids: list[int], t0: float, limit: float = 10.0) -> float | None:
    """Seconds from t0 until every pid is gone (None past `limit`); polls,
    as a measurement may (the tests wait on events and only bound them)."""
    from pyxenfb.sim.dmprocess import alive
    while any(alive(pid) for pid in pids):
        if time.monotonic() - t0 > limit:
            return None
        time.sleep(0.002)
    return time.monotonic() - t0


def bench_lifecycle(ctx) -> list[dict]:
    """How fast processes follow a death: a device model its domain's
    (@releaseDomain), a domain's guest and DM their host's (SIGKILL)."""
    from pyxenfb.platform.xenstore import XenStore
    sim = SimHost(ctx.procs)
    sim.create(1)
    sim.create(2)
    dm1 = sim.pid(1, "dm")

    async def release() -> None:
        xs = await XenStore.open(os.path.join(sim.run_dir, "xenstored.sock"))
        try:
            await xs.release_domain(1)
        finally:
            xs.close()
    t0 = time.monotonic()
    asyncio.run(release())
    released = _until_dead([dm1], t0)
    orphans = [sim.pid(2, "dm"), sim.pid(2, "guest")]
    t0 = time.monotonic()
    sim.host.kill()                                # no chance to kill its domains
    host_gone = _until_dead(orphans, t0)
    sim.host.wait()
    sim.kill_domains()
    ms = lambda s: None if s is None else round(s * 1000, 1)   # noqa: E731
    return [metric("dm_exit_after_release", ms(released), "ms", None, None, None),
            metric("domain_gone_after_host_kill", ms(host_gone), "ms", None, None, None,
                   processes=len(orphans))]


def bench_memory_animating(ctx) -> list[dict]:
    mem = getattr(ctx, "animating_memory", None)
    if mem is None:                                 # vnc_rate didn't run: measure it alone
        sim = SimHost(ctx.procs)
        port = sim.create(1, animate="full")
        r = vnc_rate(ctx, port, "Tight", 2 if ctx.quick else 5, sim.pid(1, "dm"), True)
        sim.kill_domains()
        mem = r.get("dm_peak_kib", {"rss": None, "pss": None})
        if "error" in r:
            mem["skipped"] = r["error"]
    why = {"skipped": mem["skipped"]} if "skipped" in mem else {}
    return [metric("dm_rss_tight_animating_800x600", mem["rss"], "KiB", None, None, None, **why),
            metric("dm_pss_tight_animating_800x600", mem["pss"], "KiB", None, None, None, **why)]


# ---- many domains at once ---------------------------------------------------------
def bench_multi(ctx) -> list[dict]:
    counts = [4] if ctx.quick else [1, 4, 16]
    secs = 3 if ctx.quick else 8
    if anchor("vnc-rate") is None:
        return [metric("multi_fps_per_domain", None, "frames/s", skipped=missing_anchor("vnc-rate"))]
    out = []
    for n in counts:
        sim = SimHost(ctx.procs)
        ports = [sim.create(d, width=1024, height=768, animate="full") for d in range(1, n + 1)]
        dms = [sim.pid(d, "dm") for d in range(1, n + 1)]
        tool = anchor("vnc-rate")
        c0, t0 = sum(map(cpu_seconds, dms)), time.monotonic()
        clients = [ctx.procs.popen([sys.executable, str(tool), f"127.0.0.1::{p}", "--encoding",
                                    "Tight", "--seconds", str(secs)], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True) for p in ports]
        results, errors = [], []
        for c in clients:
            o, e = c.communicate(timeout=secs + 120)
            try:
                results.append(json.loads(o.strip().splitlines()[-1])["full_frames_per_s"])
            except (IndexError, ValueError, KeyError):
                results.append(0.0)
                errors.append((e.strip().splitlines() or ["vnc-rate failed"])[-1])
        cpu = 100 * (sum(map(cpu_seconds, dms)) - c0) / (time.monotonic() - t0)
        sim.kill_domains()
        out.append(metric(f"multi_{n}dom_fps_per_domain", round(statistics.mean(results), 2),
                          "frames/s", None, None, None, domains=n, fps_min=min(results),
                          size="1024x768", encoding="Tight", seconds=secs,
                          **({"errors": errors} if errors else {})))
        out.append(metric(f"multi_{n}dom_dm_cpu_pct", round(cpu, 1), "% of one core", None, None,
                          None, domains=n, per_domain=round(cpu / n, 1)))
    return out


# ---- the zygote: memory shared across domains, start-up -----------------------------
async def _exec_to_running(sim: SimHost, domid: int, way: str) -> tuple[float, float, dict]:
    """Seconds from exec of pyqemu-dm (as the sim's create runs it) to `running`
    and to a VNC ServerInit, and the pyqemu-dm process's memory then (through
    a zygote: the stand-in's).  way: "cold", "zygote" (the Python launcher)
    or "zygote_c" (pyqemu-dm in C, pyxenfb/bin/pyqemu-dm)."""
    from pyxenfb.zygote import standin
    from pyxenfb.sim import toolstack
    from pyxenfb.platform.xenstore import XenStore
    await toolstack.create_domain(sim.run_dir, domid, f"start{domid}", vfb="vnc=1", dm=None,
                                  start_guest=False)
    xs = await XenStore.open(os.path.join(sim.run_dir, "xenstored.sock"))
    env = dict(toolstack.dm_environment(sim.run_dir, None),
               PYXENFB_ZYGOTE="off" if way == "cold" else os.path.join(sim.run_dir, "zygote.sock"))
    program = [standin.C_STAND_IN] if way == "zygote_c" else toolstack.default_dm_program()
    start = time.monotonic()
    proc = subprocess.Popen([*program, "-xen-domid", str(domid),
                             "-vnc", "127.0.0.1:0,to=99"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while await xs.read_str(f"/local/domain/0/device-model/{domid}/state") != "running":
            if proc.poll() is not None or time.monotonic() - start > 60:
                raise RuntimeError(f"pyqemu-dm for domain {domid} did not get to running")
            await asyncio.sleep(0.002)
        took = time.monotonic() - start
        # VNC clients wait in the listen backlog until the display stack (numpy,
        # encoders) is loaded: a cold device model loads it after `running`.
        port = int(await xs.read_str(f"/local/domain/{domid}/console/vnc-port"))
        await asyncio.to_thread(_rfb_server_init, port)
        display = time.monotonic() - start
        stand_in = memory_kib(proc.pid)
    finally:
        proc.kill()
        proc.wait()
        xs.close()
        await toolstack.destroy_domain(sim.run_dir, domid)
    return took, display, stand_in


def _rfb_server_init(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        conn = Connection()
        while (ev := conn.next_event()) is NEED_DATA:
            sock.sendall(conn.data_to_send())
            conn.receive_data(sock.recv(4096))
        if not isinstance(ev, ServerInit):
            raise RuntimeError(f"no RFB ServerInit on port {port}")


def bench_zygote(ctx) -> list[dict]:
    """PSS of N animating domains (1024x768, one Tight client each), cold vs through
    pyxenfb-zygote (stand-ins and the zygote counted); exec -> running and exec ->
    VNC ready (display stack loaded) both ways."""
    counts = [1, 4] if ctx.quick else [1, 4, 16]
    secs = 3 if ctx.quick else 6
    tool = anchor("vnc-rate")
    out = []
    # exec -> running: every way on one host, alternating, so all see the same load
    from pyxenfb.zygote import standin
    ways = ["cold", "zygote"] + (["zygote_c"] if os.access(standin.C_STAND_IN, os.X_OK) else [])
    sim = SimHost(ctx.procs, zygote=True)
    runs = {way: [] for way in ways}
    for i in range(3 if ctx.quick else 6):
        for k, way in enumerate(ways):
            runs[way].append(asyncio.run(_exec_to_running(sim, 900 + len(ways) * i + k, way)))
    sim.kill_domains()
    for way, starts in runs.items():
        for what, index in (("running", 0), ("vnc_ready", 1)):
            times = sorted(r[index] for r in starts)
            out.append(metric(f"zygote_exec_to_{what}_{way}_ms",
                              round(1000 * statistics.median(times)), "ms", None, None, None,
                              min_ms=round(1000 * times[0]), max_ms=round(1000 * times[-1]),
                              runs=len(times),
                              target_ms=300 if way != "cold" and what == "running" else None))
    forwarder = "C" if "zygote_c" in ways else "Python"     # what the Python launcher re-execs as
    for way in ways[1:]:
        stand_in = runs[way][-1][2]
        out.append(metric(f"zygote_stand_in_rss{'_c' if way == 'zygote_c' else ''}", stand_in["rss"],
                          "KiB", None, None, None, pss=stand_in["pss"],
                          launcher="C" if way == "zygote_c" else f"Python, then the {forwarder} forwarder"))
    for zygote in (False, True):
        way = "zygote" if zygote else "cold"
        for n in counts:
            sim = SimHost(ctx.procs, zygote=zygote)
            ports = [sim.create(d, width=1024, height=768, animate="full") for d in range(1, n + 1)]
            clients = [] if tool is None else [
                ctx.procs.popen([sys.executable, str(tool), f"127.0.0.1::{p}", "--encoding", "Tight",
                                 "--seconds", str(secs)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for p in ports]
            time.sleep(secs * 0.7)            # the clients' buffers and encoders are in use
            pids = [p for d in range(1, n + 1) for p in sim.dm_processes(d)]
            zpid = sim.zygote_pid() if zygote else None
            mems = [memory_kib(p) for p in pids + ([zpid] if zpid else [])]
            pss = sum(m["pss"] or 0 for m in mems)
            rss = sum(m["rss"] or 0 for m in mems)
            for c in clients:
                c.communicate(timeout=secs + 120)
            sim.kill_domains()
            extra = {} if tool else {"note": "no Tight clients: " + missing_anchor("vnc-rate")}
            if zpid:
                extra["zygote_pss_kib"] = mems[-1]["pss"]
            out.append(metric(f"zygote_{n}dom_pss_per_domain_{way}", round(pss / n), "KiB",
                              None, None, None, domains=n, pss_total_kib=pss, rss_total_kib=rss,
                              processes=len(mems), size="1024x768", encoding="Tight", **extra))
    # the zygote's PSS per domain against the cold one, per N
    by = {r["name"]: r["value"] for r in out}
    for n in counts:
        cold, warm = by.get(f"zygote_{n}dom_pss_per_domain_cold"), by.get(f"zygote_{n}dom_pss_per_domain_zygote")
        if cold and warm:
            out.append(metric(f"zygote_{n}dom_pss_ratio", round(warm / cold, 3), "zygote/cold",
                              "cold start", cold, warm / cold, domains=n))
    return out


GROUPS = {
    "convert": bench_convert,
    "libvncserver": bench_libvncserver,
    "encoders": bench_encoders,
    "vnc_rate": bench_vnc_rate,
    "vnc_content": bench_vnc_content,
    "slow_link": bench_slow_link,
    "latency": bench_update_latency,
    "idle": bench_idle,
    "lifecycle": bench_lifecycle,
    "memory": bench_memory_animating,
    "multi": bench_multi,
    "zygote": bench_zygote,
}
