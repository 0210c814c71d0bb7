"""`python -m bench`: JSON lines with the required fields, and --only."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = {"name", "value", "unit", "baseline", "baseline_value", "ratio"}


def run_bench(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.timeout(90)
def test_quick_only_idle_prints_json_lines_with_the_required_fields(tmp_path):
    out = tmp_path / "run.jsonl"
    r = run_bench("--quick", "--only", "idle", "--out", str(out))
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert rows and all(FIELDS <= set(d) for d in rows), rows
    names = {d["name"] for d in rows}
    # the idle group measured (not skipped): wake-ups and idle memory
    assert {"idle_wakeups", "dm_rss_idle", "dm_pss_idle"} <= names, rows
    assert all("skipped" not in d for d in rows), rows
    wake = next(d for d in rows if d["name"] == "idle_wakeups")
    assert wake["baseline_value"] == 0 and wake["value"] >= 0
    assert next(d for d in rows if d["name"] == "dm_rss_idle")["value"] > 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    # what it started is gone (the device model is in a session of its own)
    assert not os.path.exists(f"/proc/{wake['dm_pid']}")


def test_only_rejects_an_unknown_group():
    r = run_bench("--only", "nonesuch", timeout=30)
    assert r.returncode == 2 and "unknown group" in r.stderr
