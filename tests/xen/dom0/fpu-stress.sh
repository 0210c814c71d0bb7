#!/bin/bash
# Lab diagnostic, run in dom0 by xenlab: do dom0 processes keep their vector
# registers while Xen also runs a domU?  Three checkers copy and compare a
# 1 MiB pattern (glibc's vector memcpy/memcmp) while two awk loops keep
# printf's '%' search in the vector registers; any copy that differs is
# printed.  One round with dom0 alone, one with a domU running.
#   xenlab/run tests/xen/dom0/fpu-stress.sh --share DIR [--xen-args cpuid=no-xsave]
#   --env STRESS_S=60 (seconds per round)   --env STRESS_ALONE=0 (skip the dom0-only round)
# Measured (Xen 4.17 under Debian's QEMU 7.2 TCG): alone 0 corrupt; with a domU
# about 60 corrupt copies in 75 s ('%%%%...' from awk's registers, upper half
# zero); with --xen-args cpuid=no-xsave 0 corrupt.  See docs/real-xen.md.
set -u
. /xenlab/xenlab-lib.sh
SECONDS_PER_ROUND=${STRESS_S:-60}
grep -o -w -E 'avx2?|xsaveopt|xsave' /proc/cpuinfo | sort | uniq -c
dmesg | grep -m1 'x86/fpu'

cat > /tmp/copycheck.py <<'PY'
import sys, time
seconds, tag = float(sys.argv[1]), sys.argv[2]
pattern = bytes(range(256)) * 4096
end, copies, corrupt = time.time() + seconds, 0, 0
while time.time() < end:
    copy = bytearray(pattern)
    if copy != pattern:
        corrupt += 1
        at = next(i for i in range(len(pattern)) if copy[i] != pattern[i])
        print(f"{tag}: copy {copies} differs at byte {at}: {bytes(copy[at:at + 32])!r}", flush=True)
    copies += 1
print(f"{tag}: {copies} copies, {corrupt} corrupt", flush=True)
PY

round() {
  echo "=== round: $1"
  local pids=() i
  for i in 1 2; do
    timeout "$SECONDS_PER_ROUND" awk 'BEGIN { for (;;) printf "%d%%%s%%%%\n", i++, "z" > "/dev/null" }' &
    pids+=($!)
  done
  for i in 1 2 3; do python3 /tmp/copycheck.py "$SECONDS_PER_ROUND" "$1-$i" & pids+=($!); done
  wait "${pids[@]}"
  dmesg | grep -E 'segfault at|general protection' | tail -5
}

[ "${STRESS_ALONE:-1}" = 1 ] && round dom0-alone
if xenlab_domu_create stress --dm qemu --vncdisplay 0 && xenlab_domu_wait_ready stress 180; then
  round with-domU
else
  echo "fpu-stress: the domU did not come up"
fi
xenlab_domu_destroy stress
exit 0
