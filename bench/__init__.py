"""pyxenfb's benchmark suite: `uv run python -m bench [--quick] [--only NAME]`.

One JSON line per metric (see bench/suite.py); the older scripts
(bench_convert.py, bench_vnc.py, bench_vs_libvncserver.py) still run on their
own.  Anchors (x11vnc, pixman, vnc-rate) come from ../shared/bench
(override with $BENCH_ANCHORS).
"""
