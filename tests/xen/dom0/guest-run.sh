#!/bin/sh
# domU program for the tier: detach the framebuffer console from fb0, then run
# xenlab's default guest program (draw the picture, log input, DOMU-READY).
# Without this a late kernel message (e.g. "clocksource: timekeeping watchdog",
# common under TCG) makes fbcon repaint the boot log over the picture: seen
# once with QEMU as the DM, 250k of 480k pixels.
i=0
while [ ! -e /dev/fb0 ] && [ $i -lt 300 ]; do sleep 0.2; i=$((i + 1)); done
for v in /sys/class/vtconsole/vtcon*; do
  case "$(cat $v/name 2>/dev/null)" in
    *"frame buffer"*) echo 0 > $v/bind && echo "DOMU-FBCON-UNBOUND ${v##*/}" ;;
  esac
done
exec /bin/xenlab-guest
