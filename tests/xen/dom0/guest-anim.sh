#!/bin/sh
# domU program for the steady-state scenario (issue 24): detach fbcon from fb0,
# unpack /guest/frame-*.raw.gz (800x600 BGRX, xanim's gradient frames;
# tests/xen/conftest.py makes them), say DOMU-READY, then repaint the whole
# framebuffer with them in turn, forever.  Each write() to /dev/fb0 becomes
# xen-fbfront update events, at the rate its refresh and the emulated CPU allow.
i=0
while [ ! -e /dev/fb0 ] && [ $i -lt 300 ]; do sleep 0.2; i=$((i + 1)); done
for v in /sys/class/vtconsole/vtcon*; do
  case "$(cat $v/name 2>/dev/null)" in
    *"frame buffer"*) echo 0 > $v/bind ;;
  esac
done
mkdir -p /tmp/anim
for f in /guest/frame-*.raw.gz; do
  b=${f##*/}
  busybox gunzip -c "$f" > /tmp/anim/${b%.gz} || { echo "DOMU-FAILED cannot unpack $f"; exit 1; }
done
n=$(ls /tmp/anim | wc -l)
[ "$n" -gt 1 ] || { echo "DOMU-FAILED no frames in /guest"; exit 1; }
echo "DOMU-ANIM frames=$n"
echo DOMU-READY
while :; do
  for f in /tmp/anim/frame-*.raw; do
    cat "$f" > /dev/fb0
  done
done
