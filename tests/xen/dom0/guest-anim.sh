#!/bin/sh
# domU program for the steady-state scenario (issue 24): detach fbcon from fb0,
# say DOMU-READY, then repaint the whole framebuffer with /guest/frame-*.raw
# in turn, forever (800x600 BGRX, xanim's gradient frames; tests/xen/conftest.py
# makes them).  Each write() to /dev/fb0 becomes xen-fbfront update events, at
# the rate its deferred refresh and the emulated CPU allow.
i=0
while [ ! -e /dev/fb0 ] && [ $i -lt 300 ]; do sleep 0.2; i=$((i + 1)); done
for v in /sys/class/vtconsole/vtcon*; do
  case "$(cat $v/name 2>/dev/null)" in
    *"frame buffer"*) echo 0 > $v/bind ;;
  esac
done
n=0
echo "DOMU-ANIM frames=$(ls /guest/frame-*.raw | wc -l)"
echo DOMU-READY
while :; do
  for f in /guest/frame-*.raw; do
    cat "$f" > /dev/fb0
  done
  n=$((n + 1))
done
