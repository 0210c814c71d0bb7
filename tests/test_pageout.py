"""zygote/pageout.py on real mappings, in a fresh process (so that nothing
else maps the files): the pages of a clean file mapping go back to the
kernel and come back intact when read; a mapping holding a page of the
process's own (copy-on-write) is never advised."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r'''
import mmap, os, sys
from pyxenfb.zygote.pageout import clean_file_mappings, page_out_file_mappings
clean_path, private_path = sys.argv[1], sys.argv[2]
size = 4 << 20

def make(path, fill):
    with open(path, "wb") as f:
        f.write(fill * size)
        f.flush()
        os.fsync(f.fileno())        # clean: dirty pages would wait for writeback

def mapping_of(path):
    """(start address, smaps Rss in kB) of the mapping of path."""
    lines = open("/proc/self/smaps").read().splitlines()
    for i, line in enumerate(lines):
        if line.endswith(" " + path):
            return (int(line.split("-")[0], 16),
                    next(int(l.split()[1]) for l in lines[i + 1:] if l.startswith("Rss:")))
    raise LookupError(path)

make(clean_path, b"\x5a")
make(private_path, b"\xa5")
with open(clean_path, "rb") as f:
    clean = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
with open(private_path, "r+b") as f:
    private = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE)
assert clean.read() == b"\x5a" * size and private.read() == b"\xa5" * size   # every page resident
private[0] = 0x01                  # one copy-on-write page of our own
(clean_at, clean_rss), (private_at, private_rss) = mapping_of(clean_path), mapping_of(private_path)
ranges = clean_file_mappings(open("/proc/self/smaps").read())
before = clean_rss, private_rss
advised, refused = page_out_file_mappings()
after = mapping_of(clean_path)[1], mapping_of(private_path)[1]
clean.seek(0)
private.seek(0)
intact = clean.read() == b"\x5a" * size and private.read() == b"\x01" + b"\xa5" * (size - 1)
print(before[0], after[0], before[1], after[1], refused,
      any(s == clean_at for s, _ in ranges), any(s == private_at for s, _ in ranges), intact)
'''


def _filesystem(path: Path) -> str:
    """The type of the filesystem holding path (the longest mount point above it)."""
    best, kind = "", ""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        mount, fstype = fields[4], fields[fields.index("-") + 1]
        if str(path).startswith(mount.rstrip("/") + "/") and len(mount) > len(best):
            best, kind = mount, fstype
    return kind


def test_page_out_gives_back_clean_file_pages_and_leaves_a_written_mapping_alone(tmp_path):
    if _filesystem(tmp_path) in ("tmpfs", "ramfs"):
        pytest.skip("tmpfs pages can only go to swap")
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "clean"), str(tmp_path / "private")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    clean_before, clean_after, private_before, private_after, refused, clean_listed, private_listed, intact = \
        r.stdout.split()
    assert int(clean_before) == 4096 and int(clean_after) < 1024, r.stdout     # given back
    assert refused == "0" and clean_listed == "True"
    assert private_listed == "False"                                         # never advised
    assert int(private_after) == int(private_before) > 4, r.stdout            # its file pages stayed too
    assert intact == "True"                                                  # read back as written
