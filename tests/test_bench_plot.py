"""bench/plot.py: the CPU-per-frame figures drawn from a vnc_rate line."""
import json

import pytest

from bench.plot import cpu_per_frame, plot


def test_cpu_per_frame_is_cpu_percent_over_frames_per_second():
    row = {"value": 50.0, "dm_cpu_pct": 100.0, "xvnc_cpu_pct": 90.0, "xvnc_fps": 45.0,
           "x11vnc_cpu_pct": 60.0, "x11vnc_fps": None}
    got = cpu_per_frame(row)
    assert got["pyxenfb (pyqemu-dm)"] == pytest.approx(20.0)       # 1000 ms * 1.00 / 50
    assert got["Xvnc (TigerVNC)"] == pytest.approx(20.0)           # 1000 ms * 0.90 / 45
    assert got["x11vnc (LibVNCServer)"] is None                     # no frames/s: no figure


def test_plot_writes_the_cpu_per_frame_chart_for_each_size(tmp_path):
    pytest.importorskip("matplotlib")
    lines = [{"name": f"vnc_fps_{enc}_800x600", "value": 100.0, "baseline_value": 50.0,
              "dm_cpu_pct": 80.0, "xvnc_cpu_pct": 90.0, "xvnc_fps": 60.0,
              "xvnc_compression": 1.0 if enc in ("Raw", "Zlib") else 8.0,
              "x11vnc_cpu_pct": 70.0, "x11vnc_fps": 40.0} for enc in ("Raw", "Zlib", "ZRLE")]
    src = tmp_path / "run.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in lines))
    written = plot(str(src), str(tmp_path / "out"))
    chart = tmp_path / "out" / "cpu_per_frame_800x600.png"
    assert str(chart) in written
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
