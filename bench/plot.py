"""PNGs from `python -m bench` JSON lines.

    uv run python -m bench.plot FILE.jsonl OUTDIR      (or python -m bench --plot ...)

fps_<WxH>.png: full frames/s per encoding, pyxenfb vs x11vnc;
convert.png: conversion MPix/s vs pixman; bytes_per_frame_<WxH>.png: wire
bytes per full frame per content and encoding, pyxenfb vs Xvnc vs x11vnc;
slow_link_fps.png: frames/s through the 10 Mbit/s link; cpu_per_frame_<WxH>.png: CPU ms per
delivered frame per encoding, pyxenfb vs Xvnc vs x11vnc; latency_cdf.png: CDF of the 64x64
guest-UPDATE -> client latency (from the samples side file next to the
JSON lines); domains.png: frames/s per domain and device-model CPU vs the
number of domains.
"""
from __future__ import annotations

import json
import os
import re
import sys


def load(path: str) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                rows.append(json.loads(line))
    # a file appended to by several runs: the last figure of a name wins
    return list({r["name"]: r for r in rows}.values())


def markdown_table(jsonl: str, before: str | None = None) -> str:
    """The figures as a Markdown table (docs/performance.md is made of it);
    with `before`, an earlier run's ratio beside each one."""
    earlier = {r["name"]: r for r in load(before)} if before else {}
    def fmt(v):
        return "–" if v is None else (f"{v:.3g}" if isinstance(v, float) and abs(v) < 100 else
                                      f"{v:,.0f}" if isinstance(v, (int, float)) else str(v))
    lines = ["| metric | pyxenfb | unit | baseline | baseline value | ratio (cost, <1 better) |"
             + (" ratio before |" if before else "") + " notes |",
             "|---|---:|---|---|---:|---:|" + ("---:|" if before else "") + "---|"]
    for r in load(jsonl):
        notes = []
        for k in ("dm_cpu_pct", "x11vnc_cpu_pct", "fps_min", "per_domain", "compression",
                  "xvnc_compression", "x11vnc_compression", "ratio_xvnc", "ratio_x11vnc", "link",
                  "skipped", "error"):
            if r.get(k) is not None:
                notes.append(f"{k} {fmt(r[k])}")
        was = f" {fmt(earlier.get(r['name'], {}).get('ratio'))} |" if before else ""
        lines.append(f"| {r['name']} | {fmt(r['value'])} | {r['unit'] or ''} | {r['baseline'] or ''} "
                     f"| {fmt(r['baseline_value'])} | {fmt(r['ratio'])} |{was} {'; '.join(notes)} |")
    return "\n".join(lines)


def wire_tables(jsonl: str) -> str:
    """Markdown tables of the wire groups (vnc_rate, vnc_content, slow_link):
    bytes per full frame with compression, frames/s, and the slow link, ours
    beside Xvnc and x11vnc from the same run."""
    rows = load(jsonl)
    def f(v, unit=""):
        return "–" if v is None else (f"{v:.3g}{unit}" if abs(v) < 1000 else f"{v:,.0f}{unit}")
    def kb(v):
        return "–" if v is None else f"{v / 1e3:,.1f}"
    def per_frame(size, compression):       # raw bytes of a frame / compression (exact to 3 digits)
        w, h = map(int, size.split("x"))
        return w * h * 4 / compression if compression else None
    out = ["| content | size | encoding | kB per full frame (compression) pyxenfb · Xvnc · x11vnc "
           "| bytes ours/Xvnc | bytes ours/x11vnc | frames/s pyxenfb · Xvnc · x11vnc |",
           "|---|---|---|---|---:|---:|---|"]
    for r in rows:
        m = re.match(r"vnc_(?:(text|desktop)_)?bytes_per_frame_(\w+?)_(\d+x\d+)$", r["name"])
        if not m:
            continue
        fps = next((q for q in rows if q["name"] == r["name"].replace("bytes_per_frame", "fps")), {})
        size = m.group(3)
        b = {k: per_frame(size, r.get(f"{k}compression")) for k in ("", "xvnc_", "x11vnc_")}
        ratio = {k: b[""] / b[k] if b[""] and b[k] else None for k in ("xvnc_", "x11vnc_")}
        out.append(f"| {m.group(1) or 'gradient'} | {size} | {m.group(2)} "
                   f"| {kb(b[''])} ({f(r.get('compression'))}) · {kb(b['xvnc_'])} "
                   f"({f(r.get('xvnc_compression'))}) · {kb(b['x11vnc_'])} "
                   f"({f(r.get('x11vnc_compression'))}) | {f(ratio['xvnc_'])} | {f(ratio['x11vnc_'])} "
                   f"| {f(fps.get('value'))} · {f(fps.get('xvnc_fps'))} · {f(fps.get('x11vnc_fps'))} |")
    small = [r for r in rows if r["name"].startswith("vnc_desktop_fps_")
             and r.get("xvnc_bytes_per_update") is not None]
    if small:                     # small changes: the bytes a second of them costs, not full frames
        out += ["", "| content | size | encoding | wire kB/s pyxenfb · Xvnc · x11vnc | kB/s ours/Xvnc "
                "| updates/s pyxenfb · Xvnc · x11vnc | bytes per update pyxenfb · Xvnc · x11vnc "
                "| CPU % pyxenfb · Xvnc · x11vnc |",
                "|---|---|---|---|---:|---|---|---|"]
        for r in small:
            m = re.match(r"vnc_desktop_fps_(\w+?)_(\d+x\d+)$", r["name"])
            rate = {k: (r.get(f"{k}bytes_per_update") or 0) * (r.get(f"{k}updates_per_s") or 0) / 1e3
                    for k in ("", "xvnc_", "x11vnc_")}
            out.append(f"| desktop | {m.group(2)} | {m.group(1)} | {f(rate[''])} · {f(rate['xvnc_'])} · "
                       f"{f(rate['x11vnc_'])} | {f(rate[''] / rate['xvnc_'] if rate['xvnc_'] else None)} "
                       f"| {f(r.get('updates_per_s'))} · {f(r.get('xvnc_updates_per_s'))} · "
                       f"{f(r.get('x11vnc_updates_per_s'))} | {f(r.get('bytes_per_update'))} · "
                       f"{f(r.get('xvnc_bytes_per_update'))} · {f(r.get('x11vnc_bytes_per_update'))} "
                       f"| {f(r.get('dm_cpu_pct'))} · {f(r.get('xvnc_cpu_pct'))} · {f(r.get('x11vnc_cpu_pct'))} |")
    slow = [r for r in rows if re.match(r"slow_\w+_fps$", r["name"])]
    if slow:
        out += ["", "| content | size | encoding | frames/s pyxenfb · Xvnc · x11vnc | frames/s ours/Xvnc (cost) "
                "| p50 latency ms pyxenfb · Xvnc · x11vnc | kB per frame pyxenfb · Xvnc | link |",
                "|---|---|---|---|---:|---|---|---|"]
        for r in slow:
            m = re.match(r"slow_(\w+?)_(\w+)_(\d+x\d+)_fps$", r["name"])
            lat = next((q for q in rows if q["name"] == r["name"][:-3] + "latency_p50"), {})
            out.append(f"| {m.group(1)} | {m.group(3)} | {m.group(2)} | {f(r['value'])} · "
                       f"{f(r.get('xvnc_full_frames_per_s'))} · {f(r.get('x11vnc_full_frames_per_s'))} "
                       f"| {f(r.get('ratio'))} | {f(lat.get('value'))} · {f(lat.get('xvnc_latency_ms_p50'))} · "
                       f"{f(lat.get('x11vnc_latency_ms_p50'))} | {kb(r.get('bytes_per_frame'))} · "
                       f"{kb(r.get('xvnc_bytes_per_frame'))} | {r.get('link')} |")
    return "\n".join(out)


CPU_WHO = (("pyxenfb (pyqemu-dm)", "dm_cpu_pct", "value"), ("Xvnc (TigerVNC)", "xvnc_cpu_pct", "xvnc_fps"),
           ("x11vnc (LibVNCServer)", "x11vnc_cpu_pct", "x11vnc_fps"))


def cpu_per_frame(row: dict) -> dict[str, float | None]:
    """CPU ms per delivered frame of each server in a vnc_fps_* line: its
    CPU % (of one core) over its full frames/s; None where either is missing."""
    out = {}
    for who, cpu_key, fps_key in CPU_WHO:
        cpu, fps = row.get(cpu_key), row.get(fps_key)
        out[who] = 10 * cpu / fps if cpu is not None and fps else None
    return out


def plot(jsonl: str, outdir: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = load(jsonl)
    by = {r["name"]: r for r in rows}
    os.makedirs(outdir, exist_ok=True)
    written = []

    def save(fig, name):
        path = os.path.join(outdir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    sizes = sorted({m.group(2) for r in rows if (m := re.match(r"vnc_fps_(\w+?)_(\d+x\d+)$", r["name"]))})
    for size in sizes:
        encs = [r["name"].split("_")[2] for r in rows
                if re.match(rf"vnc_fps_\w+_{size}$", r["name"])]
        ours = [by[f"vnc_fps_{e}_{size}"]["value"] or 0 for e in encs]
        base = [by[f"vnc_fps_{e}_{size}"]["baseline_value"] or 0 for e in encs]
        fig, ax = plt.subplots(figsize=(7, 4))
        x = np.arange(len(encs))
        ax.bar(x - 0.2, ours, 0.4, label="pyxenfb (pyqemu-dm)")
        ax.bar(x + 0.2, base, 0.4, label="x11vnc (LibVNCServer)")
        ax.set_xticks(x, encs)
        ax.set_ylabel("full frames/s")
        ax.set_title(f"Full-screen animation at {size}, one vnc-rate client")
        ax.legend()
        save(fig, f"fps_{size}.png")

        # the same lines' CPU per delivered frame (Xvnc's includes drawing its source's frames)
        costs = [cpu_per_frame(by[f"vnc_fps_{e}_{size}"]) for e in encs]
        # TigerVNC has no Zlib: it answers with Raw (compression 1.0), not a like-for-like bar
        raw_instead = [e != "Raw" and by[f"vnc_fps_{e}_{size}"].get("xvnc_compression") == 1.0 for e in encs]
        fig, ax = plt.subplots(figsize=(7, 4))
        for i, (who, _, _) in enumerate(CPU_WHO):
            ax.bar(x + (i - 1) * 0.27, [0 if (who.startswith("Xvnc") and r) else (c[who] or 0)
                                        for c, r in zip(costs, raw_instead)], 0.27, label=who)
        ax.set_xticks(x, [f"{e}\n(Xvnc: Raw)" if r else e for e, r in zip(encs, raw_instead)])
        ax.set_ylabel("CPU ms per delivered frame")
        ax.set_title(f"CPU per frame at {size}, one vnc-rate client (lower is better)")
        ax.legend(fontsize=8)
        save(fig, f"cpu_per_frame_{size}.png")

    conv = [r for r in rows if r["name"].startswith("convert_") and r.get("value")]
    if conv:
        fig, ax = plt.subplots(figsize=(8, 4))
        x = np.arange(len(conv))
        ax.bar(x - 0.2, [r["value"] for r in conv], 0.4, label="pyxenfb (numpy)")
        ax.bar(x + 0.2, [r["baseline_value"] or 0 for r in conv], 0.4, label="pixman / memcpy (C)")
        ax.set_xticks(x, [r["name"].removeprefix("convert_") for r in conv], rotation=20,
                      ha="right", fontsize=8)
        ax.set_ylabel("MPix/s")
        ax.set_title("Pixel conversion from x8r8g8b8")
        ax.legend()
        save(fig, "convert.png")

    lat = by.get("update_latency_64x64_p50")
    if lat and lat.get("samples"):
        path = os.path.join(os.path.dirname(os.path.abspath(jsonl)), lat["samples"])
        if os.path.exists(path):
            samples = np.sort(np.array(json.load(open(path))))
            fig, ax = plt.subplots(figsize=(7, 4))
            ax.plot(samples, np.arange(1, len(samples) + 1) / len(samples))
            for ms, label in ((2, "p50 target"), (10, "p99 target")):
                ax.axvline(ms, ls="--", c="grey")
                ax.text(ms, 0.05, label, rotation=90, va="bottom")
            ax.set_xscale("log")
            ax.set_xlabel("guest UPDATE -> client has the pixels (ms), 64x64 rect")
            ax.set_ylabel("fraction of updates")
            ax.set_title(f"Update latency CDF, {len(samples)} updates")
            save(fig, "latency_cdf.png")

    multi = sorted((r["domains"], r) for r in rows if re.match(r"multi_\d+dom_fps_per_domain$", r["name"]))
    if multi:
        ns = [n for n, _ in multi]
        fps = [r["value"] for _, r in multi]
        cpu = [(by.get(f"multi_{n}dom_dm_cpu_pct") or {}).get("value") or 0 for n in ns]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(ns, fps, "o-", label="frames/s per domain (Tight, 1024x768)")
        ax.set_xlabel("domains animating at once")
        ax.set_ylabel("frames/s per domain")
        ax2 = ax.twinx()
        ax2.plot(ns, cpu, "s--", c="tab:red", label="CPU of all pyqemu-dm (% of one core)")
        ax2.set_ylabel("% of one core")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, loc="center right", fontsize=8)
        ax.set_xticks(ns)
        save(fig, "domains.png")
    zyg = sorted((r["domains"], r) for r in rows
                 if re.match(r"zygote_\d+dom_pss_per_domain_cold$", r["name"]))
    if zyg:
        ns = [n for n, _ in zyg]
        cold = [r["value"] / 1024 for _, r in zyg]
        warm = [((by.get(f"zygote_{n}dom_pss_per_domain_zygote") or {}).get("value") or 0) / 1024
                for n in ns]
        fig, ax = plt.subplots(figsize=(7, 4))
        x = np.arange(len(ns))
        ax.bar(x - 0.2, cold, 0.4, label="cold pyqemu-dm")
        ax.bar(x + 0.2, warm, 0.4, label="through pyxenfb-zygote (+ stand-ins, zygote)")
        ax.axhline(22, ls="--", c="grey")
        ax.text(len(ns) - 0.5, 22.5, "QEMU 7.2 RSS (lab)", ha="right", fontsize=8)
        ax.set_xticks(x, [str(n) for n in ns])
        ax.set_xlabel("domains at 1024x768, animating, one Tight client each")
        ax.set_ylabel("PSS per domain (MiB)")
        ax.set_title("Memory per domain: cold vs zygote")
        ax.legend(fontsize=8)
        save(fig, "zygote_pss.png")

    # bytes per full frame per encoding and content, ours beside Xvnc and x11vnc
    bpf = {}
    for r in rows:
        m = re.match(r"vnc_(?:(text|desktop)_)?bytes_per_frame_(\w+?)_(\d+x\d+)$", r["name"])
        if m and r["value"]:
            bpf.setdefault(m.group(3), []).append((m.group(1) or "gradient", m.group(2), r))
    for size, items in bpf.items():
        fig, ax = plt.subplots(figsize=(9, 4))
        x = np.arange(len(items))
        raw = int(size.split("x")[0]) * int(size.split("x")[1]) * 4
        for i, (who, key) in enumerate((("pyxenfb", "compression"), ("Xvnc (TigerVNC)", "xvnc_compression"),
                                        ("x11vnc (LibVNCServer)", "x11vnc_compression"))):
            # raw bytes / compression: vnc-rate's MB/s is too coarse for small updates
            ax.bar(x + (i - 1) * 0.27, [raw / r[key] / 1e3 if r.get(key) else 0 for _, _, r in items],
                   0.27, label=who)
        ax.set_xticks(x, [f"{c}\n{e}" for c, e, _ in items], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("kB on the wire per full frame (log)")
        ax.set_title(f"Bytes per full frame at {size} (raw: {int(size.split('x')[0]) * int(size.split('x')[1]) * 4 / 1e3:.0f} kB)")
        ax.legend(fontsize=8)
        save(fig, f"bytes_per_frame_{size}.png")

    # frames/s through the slow link
    slow = [(m.group(1), m.group(2), m.group(3), r) for r in rows
            if (m := re.match(r"slow_(\w+?)_(\w+)_(\d+x\d+)_fps$", r["name"])) and r["value"]]
    if slow:
        fig, ax = plt.subplots(figsize=(9, 4))
        x = np.arange(len(slow))
        for i, (who, key) in enumerate((("pyxenfb", "full_frames_per_s"), ("Xvnc (TigerVNC)", "xvnc_full_frames_per_s"),
                                        ("x11vnc (LibVNCServer)", "x11vnc_full_frames_per_s"))):
            vals = [(r["value"] if key == "full_frames_per_s" else r.get(key)) or 0 for *_, r in slow]
            ax.bar(x + (i - 1) * 0.27, vals, 0.27, label=who)
        ax.set_xticks(x, [f"{c} {s}\n{e}" for c, e, s, _ in slow], fontsize=7)
        ax.set_ylabel("full frames/s")
        ax.set_title("Through a 10 Mbit/s link, 20 ms each way")
        ax.legend(fontsize=8)
        save(fig, "slow_link_fps.png")
    return written


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.split("\n\n")[1])
    for p in plot(sys.argv[1], sys.argv[2]):
        print(p)
