#!/bin/sh
# domU program for the tier: detach the framebuffer console from fb0, then run
# xenlab's default guest program (draw the picture, log input, DOMU-READY).
# Without this a late kernel message (e.g. "clocksource: timekeeping watchdog",
# common under TCG) makes fbcon repaint the boot log over the picture: seen
# once with QEMU as the DM, 250k of 480k pixels.
# With /guest/frame-*.raw.gz (the steady-state scenario, issue 24; 800x600
# BGRX, xanim's gradient frames made by tests/xen/conftest.py) it animates
# instead: unpacks them, says DOMU-READY, then repaints the whole framebuffer
# with them in turn, forever.  Each write() to /dev/fb0 becomes xen-fbfront
# update events, at the rate its refresh and the emulated CPU allow.
i=0
while [ ! -e /dev/fb0 ] && [ $i -lt 300 ]; do sleep 0.2; i=$((i + 1)); done
for v in /sys/class/vtconsole/vtcon*; do
  case "$(cat $v/name 2>/dev/null)" in
    *"frame buffer"*) echo 0 > $v/bind && echo "DOMU-FBCON-UNBOUND ${v##*/}" ;;
  esac
done
ls /guest/frame-*.raw.gz > /dev/null 2>&1 || exec /bin/xenlab-guest
mkdir -p /tmp/anim
for f in /guest/frame-*.raw.gz; do
  b=${f##*/}
  busybox gunzip -c "$f" > /tmp/anim/${b%.gz} || { echo "DOMU-FAILED cannot unpack $f"; exit 1; }
done
echo "DOMU-ANIM frames=$(ls /tmp/anim | wc -l)"
echo DOMU-READY
while :; do
  for f in /tmp/anim/frame-*.raw; do
    cat "$f" > /dev/fb0
  done
done
