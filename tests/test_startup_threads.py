"""pyqemu-dm loads numpy without OpenBLAS's thread pool (it never does linear
algebra; the threads cost CPU at import and memory)."""
import subprocess
import sys


def test_cli_keeps_openblas_to_one_thread():
    code = ("import os, pyxenfb.machine.cli as c\n"
            "try:\n    c.main(['-version'])\nexcept SystemExit:\n    pass\n"
            "import numpy\n"
            "print(os.environ.get('OPENBLAS_NUM_THREADS'), len(os.listdir('/proc/self/task')))")
    env_out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert env_out.returncode == 0, env_out.stderr
    value, threads = env_out.stdout.split()[-2:]
    assert value == "1" and threads == "1", env_out.stdout
