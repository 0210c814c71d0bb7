#!/bin/bash
# The real-Xen tier, run in dom0 by xenlab (one boot): the same scenario with
# Debian's QEMU and with pyqemu-dm as the device model of real Linux PV domUs.
# It never stops at a failing step: every measurement goes to
# $XENLAB_OUT/results.tsv (key <TAB> JSON value), pictures and logs next to it,
# and the host-side pytest (tests/xen/test_real_xen.py) judges them.
# Share layout (made by tests/xen/conftest.py): /host/src (pyxenfb source),
# /host/site (its wheels for Python 3.11), /host/deb (the Debian package and any
# Debian dependency dom0 lacks), /host/xen (this directory, pictures, action lists).
# The main pyqemu-dm scenario, the zygote and the three-domain scenario run
# the installed package (/usr/bin/pyqemu-dm, the zygote unit's own command);
# the others run the source from the share. Importing from the 9p share costs about what importing from
# RAM does (measured: unpacking into dom0 took 45 s and the import still 15 s:
# under TCG it is CPU, not I/O), so the DM runs straight from the share.
set -u
. /xenlab/xenlab-lib.sh
X=/host/xen
O=$XENLAB_OUT
RES=$O/results.tsv
: > "$RES"
D=/host
export PYTHONPATH=$D/site             # rfbclient.py needs DES (pycryptodome) for VNC auth
PYDM="python3 -m pyxenfb"              # the console script pyqemu-dm, without installing
PYENV=(--dm-env PYTHONPATH=$D/src:$D/site --dm-env PYTHONDONTWRITEBYTECODE=1)
READY_S=${TIER_READY_TIMEOUT:-180}

now() { cut -d' ' -f1 /proc/uptime; }
since() { awk "BEGIN{printf \"%.2f\", $(now) - $1}"; }
rec() { printf '%s\t%s\n' "$1" "$2" >> "$RES"; }          # rec KEY JSON
recs() {         # recs KEY TEXT: TEXT as a JSON string (no python: each start costs seconds under TCG)
  local t=${2//\\/\\\\}; t=${t//\"/\\\"}; t=${t//$'\n'/\\n}; t=${t//$'\t'/\\t}
  rec "$1" "\"$(printf '%s' "$t" | tr -d '\000-\010\013-\037')\""
}
step() { echo "=== [$(now)] $*"; }

dm_pid() {       # the newest device model of NAME (dm-wrapper execs it: same pid)
  local f; f=$(ls -t /run/xenlab/dm-$1-*.txt 2>/dev/null | head -1)
  [ -n "$f" ] && sed -n 's/^=== dm-wrapper pid=\([0-9]*\) .*/\1/p' "$f"
}
dm_exec_uptime() {
  local f; f=$(ls -t /run/xenlab/dm-$1-*.txt 2>/dev/null | head -1)
  [ -n "$f" ] && sed -n 's/^=== dm-wrapper .*uptime=\([0-9.]*\) .*/\1/p' "$f"
}
proc_mem() {     # JSON {"pid", "rss_kb", "pss_kb", "uss_kb", "hwm_kb", "cpu_s"} of a pid (USS:
  # its private pages, what it costs beyond what it shares); with a 2nd argument also
  # "exe_rss_kb"/"exe_pss_kb": the mappings of its own executable (pages of the python3
  # binary it shares with another python3 process count half in its PSS)
  local pid=$1
  [ -n "$pid" ] && [ -r /proc/$pid/status ] || { echo null; return; }
  local rss pss uss hwm ticks exe=""
  rss=$(awk '/^VmRSS/{print $2}' /proc/$pid/status); hwm=$(awk '/^VmHWM/{print $2}' /proc/$pid/status)
  # (no process substitution: dom0's initramfs has no /dev/fd)
  pss=$(awk '/^Pss:/{p = $2} /^Private_(Clean|Dirty):/{u += $2} END{if (p != "") print p, u}' \
        /proc/$pid/smaps_rollup 2>/dev/null)
  uss=${pss#* }; pss=${pss% *}
  ticks=$(awk '{print $14 + $15}' /proc/$pid/stat)
  if [ $# -ge 2 ]; then
    exe=$(awk -v exe="$(readlink /proc/$pid/exe)" '/^[0-9a-f]+-[0-9a-f]+ /{m = ($6 == exe)}
      m && /^Rss:/{r += $2} m && /^Pss:/{p += $2} END{printf ", \"exe_rss_kb\": %d, \"exe_pss_kb\": %d", r, p}' \
      /proc/$pid/smaps 2>/dev/null)
  fi
  echo "{\"pid\": $pid, \"rss_kb\": ${rss:-0}, \"pss_kb\": ${pss:-null}, \"uss_kb\": ${uss:-null}, \"hwm_kb\": ${hwm:-0}, \"cpu_s\": $(awk "BEGIN{print $ticks / $(getconf CLK_TCK)}")$exe}"
}

# Background watcher: dom0 uptime at which a new domain's device model writes
# device-model/<domid>/state = running (an external process, polled with a deadline).
watch_running() {  # OUT: "DOMID UPTIME" once a new device model's state node says running
  # Event-driven: one xenstore-watch, the clock read with bash builtins when its event
  # arrives.  (It polled before: 2-3 programs forked per round, ~0.2 s a round under
  # TCG, on the CPUs the device model being timed needs.)
  local out=$1 d known path up _ wpid fifo=/tmp/watch-running.$BASHPID
  known=" $(xenstore-list /local/domain/0/device-model 2>/dev/null | tr '\n' ' ') "
  rm -f "$fifo"; mkfifo "$fifo" || return 1
  timeout "$READY_S" xenstore-watch /local/domain/0/device-model > "$fifo" 2>/dev/null &
  wpid=$!
  trap 'kill $wpid 2>/dev/null; rm -f "$fifo"; exit' TERM
  while read -r path; do
    read -r up _ < /proc/uptime
    case "$path" in */state) ;; *) continue ;; esac
    d=${path%/state}; d=${d##*/}
    case "$known" in *" $d "*) continue ;; esac
    if [ "$(xenstore-read "$path" 2>/dev/null)" = running ]; then
      echo "$d $up" > "$out"; break
    fi
  done < "$fifo"
  kill $wpid 2>/dev/null; rm -f "$fifo"
}

xenstore_dump() {  # NAME DOMID -> $O/NAME-xenstore.txt (the device's nodes, with perms)
  local d=$2 p
  for p in /local/domain/0/backend/vfb/$d /local/domain/0/backend/vkbd/$d \
           /local/domain/$d/device/vfb /local/domain/$d/device/vkbd /local/domain/$d/console \
           /local/domain/0/device-model/$d /libxl/$d/device/vfb /libxl/$d/device/vkbd; do
    xenstore-ls -fp "$p" 2>&1 | sed "s|^|$p :: |"
  done > "$O/$1-xenstore.txt"
}

# boot NAME KEY DM [create options...]: create, wait for DOMU-READY, record timings,
# states, the XenStore tree and the device model's memory. Returns 0 when ready.
boot() {
  local name=$1 key=$2 dm=$3; shift 3
  local wf=/tmp/running-$key t0 rc d ready=false
  rm -f "$wf"
  watch_running "$wf" & local watcher=$!
  step "$key: xl create $name (DM $dm)"
  t0=$(now)
  # Without this script's PYTHONPATH (for its own clients): xl hands its environment
  # on to the device model, and an installed one must run on its own venv alone.
  (unset PYTHONPATH; xenlab_domu_create "$name" --dm "$dm" --wrap --guest-run $X/guest-run.sh "$@"); rc=$?
  rec "$key.create_rc" "$rc"; rec "$key.create_s" "$(since "$t0")"
  cp "$O/xl-create-$name.log" "$O/$key-xl-create.log" 2>/dev/null
  d=$(xenlab_domid "$name"); rec "$key.domid" "${d:-null}"
  # a failed xl create that left the domain running (seen: xl itself segfaulting
  # after the DM had answered) is recorded above; the guest is still checked
  if [ -n "$d" ] && xenlab_domu_wait_ready "$name" "$READY_S"; then ready=true; fi
  rec "$key.ready" $ready; rec "$key.ready_s" "$(since "$t0")"
  kill $watcher 2>/dev/null; wait $watcher 2>/dev/null
  local dmstart; dmstart=$(dm_exec_uptime "$name")
  if [ -s "$wf" ] && [ -n "$dmstart" ]; then
    rec "$key.dm_exec_to_running_s" "$(awk "BEGIN{printf \"%.2f\", $(cut -d' ' -f2 "$wf") - $dmstart}")"
    rec "$key.create_to_running_s" "$(awk "BEGIN{printf \"%.2f\", $(cut -d' ' -f2 "$wf") - $t0}")"
  fi
  recs "$key.states" "$(xenlab_domu_states "$name" 2>&1 | tr '\n' ';')"
  [ -n "$d" ] && recs "$key.vnc_port" "$(xenstore-read /local/domain/$d/console/vnc-port 2>/dev/null)"
  [ -n "$d" ] && recs "$key.vnc_listen" "$(xenstore-read /local/domain/$d/console/vnc-listen 2>/dev/null)"
  [ -n "$d" ] && xenstore_dump "$key" "$d"
  rec "$key.mem_ready" "$(proc_mem "$(dm_pid "$name")")"
  local pid; pid=$(dm_pid "$name")
  if [ -n "$pid" ] && [ -r /proc/$pid/cmdline ]; then
    recs "$key.dm_cmdline" "$(tr '\0' ' ' < /proc/$pid/cmdline)"
    recs "$key.dm_pythonpath" "$(tr '\0' '\n' < /proc/$pid/environ | sed -n 's/^PYTHONPATH=//p')"
  fi
  [ $ready = true ]
}

vnc() {          # vnc KEY TAG PORT [--password PW] ACTIONS... -> $O/KEY-TAG.json
  local key=$1 tag=$2 port=$3; shift 3
  timeout 120 python3 $X/rfbclient.py 127.0.0.1 "$port" "$O/$key-$tag.json" "$@"
  rec "$key.vnc_$tag.rc" $?
}

wait_event() {   # wait_event KEY NAME REGEX COUNT: the guest logged COUNT events matching REGEX
  local key=$1 name=$2 re=$3 n=$4 t0 end
  t0=$(now); end=$(( $(date +%s) + 40 ))
  while [ "$(date +%s)" -lt $end ]; do
    if [ "$(xenlab_domu_events "$name" | grep -Ec -- "$re")" -ge "$n" ]; then
      rec "$key.events_wait_s" "$(since "$t0")"; return 0
    fi
    sleep 0.2
  done
  echo "tier: $name: fewer than $n events matching '$re' after 40 s"
  rec "$key.events_wait_s" null; return 1
}

# tight_hold KEY PORT COMMAND...: a live Tight client (rfbclient.py hold: one full frame
# decoded in dom0, then incremental updates until told to stop, at most HOLD_S s); once
# it has the frame (its picture appears as $O/KEY-tight-hold.ppm) and the server has had
# 2 s to settle, COMMAND... runs (the memory measurement) while the client is connected.
HOLD_S=${TIER_HOLD_S:-90}
tight_hold() {
  local key=$1 port=$2 ppm=$O/$1-tight-hold.ppm cpid end t0; shift 2
  rm -f "$ppm" "$ppm.stop"
  step "$key: one Tight client connected; memory once it has a full frame"
  t0=$(now)
  timeout 200 python3 $X/rfbclient.py 127.0.0.1 "$port" "$O/$key-tight-hold.json" "hold:$HOLD_S:$ppm" &
  cpid=$!
  end=$(( $(date +%s) + 150 ))
  until [ -e "$ppm" ] || [ "$(date +%s)" -ge $end ] || ! kill -0 $cpid 2>/dev/null; do sleep 0.2; done
  if [ -e "$ppm" ]; then
    rec "$key.tight_frame_s" "$(since "$t0")"
    sleep 2
    "$@"
    if kill -0 $cpid 2>/dev/null; then rec "$key.tight_connected" true; else rec "$key.tight_connected" false; fi
  fi
  touch "$ppm.stop"
  wait $cpid; rec "$key.vnc_tight_hold.rc" $?
}
measure_dm() {   # KEY PID: one device model process
  rec "$1.tight_mem" "$(proc_mem "$2" exe)"
}

pictures_and_screendump() {   # KEY NAME PORT [ENCODING...]: grabs (default: all) + QMP screendump
  local key=$1 name=$2 port=$3 actions=() e encs
  shift 3; encs=${*:-$(cat $X/encodings.txt)}
  for e in $encs; do actions+=("grab:$e:$O/$key-vnc-$e.ppm"); done
  vnc "$key" grab "$port" "${actions[@]}"
  xenlab_qmp "$name" '{"execute":"screendump","arguments":{"filename":"'"$O/$key-qmp.ppm"'"}}' \
    > "$O/$key-qmp-reply.txt" 2>&1
}

send_keys() {    # KEY NAME PORT KEYFILE [--password PW]: one chunk per line ("N<TAB>actions");
  # after each, wait until the guest has logged N key events in all (see plan.py)
  local key=$1 name=$2 port=$3 file=$4 i=0 n acts; shift 4
  while IFS=$'\t' read -r n acts; do
    i=$((i + 1))
    vnc "$key" "keys$i" "$port" "$@" $acts
    wait_event "$key.keys$i" "$name" 'kbd .* type=1 code=[0-9]+ value=[01]$' "$n"
  done < "$X/$file"
}

input_checks() { # KEY NAME PORT KEYFILE: keys, then pointer; the guest's events are in its console log
  local key=$1 name=$2 port=$3 keys=$4
  step "$key: keys"
  send_keys "$key" "$name" "$port" "$keys"
  step "$key: pointer"
  vnc "$key" pointer "$port" $(cat $X/pointer.actions)
  wait_event "$key.pointer" "$name" 'ptr .* type=1 code=272 value=0' 2
}

finish() {       # KEY NAME: memory after the checks, destroy, logs to $O/KEY/
  local key=$1 name=$2 pid
  pid=$(dm_pid "$name")
  rec "$key.mem_end" "$(proc_mem "$pid")"
  step "$key: xl destroy $name"
  xenlab_domu_destroy "$name"; rec "$key.destroy_rc" $?
  sleep 0.5   # libxl SIGKILLs the DM; give the kernel a moment to reap before we look
  if [ -n "$pid" ] && [ -d /proc/$pid ]; then rec "$key.dm_left_running" true; else rec "$key.dm_left_running" false; fi
  rm -rf "$O/$key"; mv "$O/$name" "$O/$key"
}

scenario() {     # KEY NAME DM KEYFILE [create options]: the full check list on one domU
  local key=$1 name=$2 dm=$3 keys=$4; shift 4
  if boot "$name" "$key" "$dm" --vncdisplay 0 "$@"; then
    local port; port=$(xenlab_vnc_port "$name")
    tight_hold "$key" "${port:-5900}" measure_dm "$key" "$(dm_pid "$name")"
    pictures_and_screendump "$key" "$name" "${port:-5900}"
    input_checks "$key" "$name" "${port:-5900}" "$keys"
  fi
  finish "$key" "$name"
}

step "environment"
recs env.python "$(python3 -V 2>&1)"
recs env.xen_libs "$(ls /usr/lib/x86_64-linux-gnu/ | grep -E '^libxen(evtchn|foreignmemory|gnttab|store|toolcore)\.so\.[0-9]+$' | tr '\n' ' ')"
recs env.xl_info "$(xl info | grep -E 'xen_version|nr_cpus|free_memory' | tr -s ' ' | tr '\n' ';')"
recs env.xen_cmdline "$(xl info | sed -n 's/^xen_commandline *: //p')"
recs env.dom0_fpu "$(dmesg | grep -m1 -E 'x86/fpu: (x87 FPU will use|Enabled xstate)')"

# --- the Debian package, installed as an admin would: dpkg, no network ---------------------
step "package: dpkg -i $(cd /host/deb 2>/dev/null && ls *.deb | tr '\n' ' ')"
T0=$(now)
if ls /host/deb/pyxenfb_*.deb > /dev/null 2>&1; then
  dpkg -i /host/deb/*.deb > "$O/dpkg-install.log" 2>&1; rec pkg.install_rc $?
else
  rec pkg.install_rc null
fi
rec pkg.install_s "$(since "$T0")"
recs pkg.status "$(dpkg-query -W -f='${Status} ${Version}' pyxenfb 2>&1)"
recs pkg.commands "$(for c in pyqemu-dm pyxenfb-zygote pyxenfb-console pyxenfb-sim; do [ -x /usr/bin/$c ] && printf '%s ' $c; done)"
/usr/bin/pyqemu-dm --help > "$O/pkg-help.txt" 2>&1; rec pkg.help_rc $?
# Where the package did not install, the scenarios that use it run the share's
# source instead, so that the rest of the tier still reports (pkg.* fails the tier).
if [ -x /usr/bin/pyqemu-dm ]; then
  PKGDM=/usr/bin/pyqemu-dm; PKGENV=()
else
  PKGDM=$PYDM; PKGENV=("${PYENV[@]}")
fi
recs pkg.dm "$PKGDM"

# --- Debian's QEMU: the reference ------------------------------------------------------
T0=$(now)
scenario qemu qref qemu keys-us.actions --picture $X/picture-a.ppm
rec qemu.scenario_s "$(since "$T0")"
if [ "${TIER_QEMU_DE:-0}" = 1 ]; then    # validates keys-de.actions against QEMU (+2 min)
  T0=$(now)
  if boot qde qemu_de qemu --vncdisplay 0 --keymap de; then
    send_keys qemu_de qde "$(xenlab_vnc_port qde)" keys-de.actions
  fi
  finish qemu_de qde
  rec qemu_de.scenario_s "$(since "$T0")"
fi

# --- pyqemu-dm ---------------------------------------------------------------------------
T0=$(now)
# PYTHONPROFILEIMPORTTIME: the DM log shows where its start-up time goes
scenario py pyq "$PKGDM" keys-us.actions --picture $X/picture-a.ppm "${PKGENV[@]}" \
  --dm-env PYTHONPROFILEIMPORTTIME=1
rec py.scenario_s "$(since "$T0")"

# xl create again after xl destroy (same name), with another picture, keymap="de"
# and vncpasswd (one domU for these: each boot costs a minute under TCG); then xl reboot.
T0=$(now)
PW=$(cat $X/vncpasswd.txt)
if boot pyq py2 "$PYDM" --vncdisplay 0 --picture $X/picture-b.ppm --keymap de --vncpasswd "$PW" \
     "${PYENV[@]}"; then
  port=$(xenlab_vnc_port pyq); port=${port:-5900}
  step "py2: VNC password: none, wrong, right (+ pictures and German keys)"
  vnc py2 nopw "$port" "grab:raw:$O/py2-nopw.ppm"
  vnc py2 wrong "$port" --password "$(cat $X/wrongpasswd.txt)" "grab:raw:$O/py2-wrong.ppm"
  vnc py2 grab "$port" --password "$PW" "grab:raw:$O/py2-vnc-raw.ppm" "grab:zrle:$O/py2-vnc-zrle.ppm"
  if [ "$(tail -1 "$RES" | cut -f2)" != 0 ]; then
    # keep checking the rest: give the DM the password the way libxl's QMP does
    xenlab_qmp pyq '{"execute":"change-vnc-password","arguments":{"password":"'"$PW"'"}}' \
      > "$O/py2-qmp-password.txt" 2>&1
    vnc py2 grab_after_qmp "$port" --password "$PW" "grab:raw:$O/py2-vnc-raw.ppm" \
      "grab:zrle:$O/py2-vnc-zrle.ppm"
  fi
  send_keys py2 pyq "$port" keys-de.actions --password "$PW"
  xenlab_qmp pyq '{"execute":"screendump","arguments":{"filename":"'"$O/py2-qmp.ppm"'"}}' \
    > "$O/py2-qmp-reply.txt" 2>&1
  xenlab_qmp pyq '{"execute":"query-vnc"}' > "$O/py2-query-vnc.txt" 2>&1
  xenlab_domu_console pyq > "$O/py2-console-before-reboot.log"
  step "py2: xl reboot pyq"
  old=$(xenlab_domid pyq); oldpid=$(dm_pid pyq)
  : > /var/log/xen/console/guest-pyq.log      # DOMU-READY below must come from the new boot
  t0=$(now); xl reboot pyq; rec py2.reboot_rc $?
  end=$(( $(date +%s) + READY_S )); new=
  while [ "$(date +%s)" -lt $end ]; do
    new=$(xenlab_domid pyq); [ -n "$new" ] && [ "$new" != "$old" ] && break; sleep 0.2
  done
  rec py2.reboot_domids "[${old:-null}, ${new:-null}]"
  if [ -n "$new" ] && [ "$new" != "$old" ] && xenlab_domu_wait_ready pyq "$READY_S"; then
    rec py2.reboot_ready true; rec py2.reboot_ready_s "$(since "$t0")"
    if [ -n "$oldpid" ] && [ -d /proc/$oldpid ]; then rec py2.reboot_old_dm_alive true; else rec py2.reboot_old_dm_alive false; fi
    recs py2.reboot_states "$(xenlab_domu_states pyq | tr '\n' ';')"
    recs py2.reboot_new_dm_pid "$(dm_pid pyq)"
    vnc py2 reboot "$(xenlab_vnc_port pyq)" --password "$PW" \
      "grab:raw:$O/py2-reboot-vnc-raw.ppm" "grab:zrle:$O/py2-reboot-vnc-zrle.ppm"
  else
    rec py2.reboot_ready false
    recs py2.reboot_states "$(xenlab_domu_states pyq 2>&1 | tr '\n' ';')"
  fi
fi
finish py2 pyq
rec py2.scenario_s "$(since "$T0")"

# --- dm_restrict=1: each DM confined the way libxl 4.17 does it -------------------------
# libxl 4.17 refuses dm_restrict without a qemu user, PV included ("Could not
# find user xen-qemuuser-shared or range base pseudo-user"): create the
# shared one, as xl.cfg(5) tells an administrator to.
id xen-qemuuser-shared >/dev/null 2>&1 ||
  useradd --system --no-create-home --shell /usr/sbin/nologin xen-qemuuser-shared
restricted() {   # KEY NAME DM [create options]: picture, screendump and what confines the DM
  local key=$1 name=$2 dm=$3 port pid d T0; shift 3
  T0=$(now)
  if boot "$name" "$key" "$dm" --vncdisplay 0 --picture $X/picture-a.ppm --cfg 'dm_restrict=1' "$@"; then
    port=$(xenlab_vnc_port "$name"); pid=$(dm_pid "$name"); d=$(xenlab_domid "$name")
    # QEMU resolves the screendump path inside its chroot (and libxl's 256 KiB
    # RLIMIT_FSIZE applies); the pictures after it show the DM survived it.
    xenlab_qmp "$name" '{"execute":"screendump","arguments":{"filename":"/shot.ppm"}}' \
      > "$O/$key-qmp-reply.txt" 2>&1
    recs "$key.screendump_reply" "$(tr '\n' ' ' < "$O/$key-qmp-reply.txt")"
    cp "/var/run/xen/qemu-root-$d/shot.ppm" "$O/$key-qmp.ppm" 2>/dev/null
    vnc "$key" grab "${port:-5900}" "grab:raw:$O/$key-vnc-raw.ppm" "grab:zrle:$O/$key-vnc-zrle.ppm"
    recs "$key.argv" "$(tr '\0' ' ' < /proc/$pid/cmdline)"
    recs "$key.root" "$(readlink /proc/$pid/root)"
    recs "$key.expected_root" "$(readlink -f /var/run/xen/qemu-root-$d)"
    recs "$key.fsize_limit" "$(awk '/^Max file size/{print $4" "$5}' /proc/$pid/limits)"
    recs "$key.mnt_ns" "$(readlink /proc/$pid/ns/mnt) $(readlink /proc/1/ns/mnt)"
    recs "$key.uids" "$(awk '/^Uid:/{print $2" "$3" "$4" "$5}' /proc/$pid/status)"
  fi
  finish "$key" "$name"
  rec "$key.scenario_s" "$(since "$T0")"
}
restricted qemur qrefr qemu
restricted pyr pyqr "$PYDM" "${PYENV[@]}"

# --- pyqemu-dm through the warm fork-server (pyxenfb-zygote) --------------------------
ZSOCK=/var/run/xen/pyxenfb-zygote.sock
step "zygote: start"
T0=$(now)
# The package's unit, as systemd would run it: its Environment= and ExecStart=,
# given the socket by systemd-socket-activate where dom0 has it (its socket unit's
# ListenSequentialPacket=), else binding the same path itself (dom0 has no systemd
# as PID 1).
ZUNIT=$(ls /lib/systemd/system/pyxenfb-zygote.service /usr/lib/systemd/system/pyxenfb-zygote.service 2>/dev/null | head -1)
if [ -n "$ZUNIT" ]; then
  ZEXEC=$(sed -n 's/^ExecStart=//p' "$ZUNIT"); ZENV=$(sed -n 's/^Environment=//p' "$ZUNIT")
  ZLISTEN=$(sed -n 's/^ListenSequentialPacket=//p' "${ZUNIT%.service}.socket")
  recs zygote.unit_exec "$ZEXEC"; recs zygote.unit_listen "$ZLISTEN"
  if command -v systemd-socket-activate > /dev/null; then
    recs zygote.started_by "systemd-socket-activate"
    # shellcheck disable=SC2086  (the unit's words, as systemd splits them)
    env -u PYTHONPATH $ZENV systemd-socket-activate --seqpacket -l "$ZLISTEN" $ZEXEC > "$O/zygote.log" 2>&1 &
  else
    recs zygote.started_by "unit ExecStart"
    # shellcheck disable=SC2086
    env -u PYTHONPATH $ZENV $ZEXEC > "$O/zygote.log" 2>&1 &
  fi
  ZSOCK=$ZLISTEN
else
  recs zygote.started_by "share source"
  PYTHONPATH=$D/src:$D/site PYTHONDONTWRITEBYTECODE=1 python3 -m pyxenfb.zygote.server --socket $ZSOCK \
    > "$O/zygote.log" 2>&1 &
fi
ZPID=$!
end=$(( $(date +%s) + READY_S ))
until grep -q "ready on" "$O/zygote.log" 2>/dev/null || [ "$(date +%s)" -ge $end ] \
      || ! kill -0 $ZPID 2>/dev/null; do sleep 0.5; done
rec zygote.warmup_s "$(since "$T0")"
recs zygote.pythonpath "$(tr '\0' '\n' < /proc/$ZPID/environ 2>/dev/null | sed -n 's/^PYTHONPATH=//p')"
recs zygote.cmdline "$(tr '\0' ' ' < /proc/$ZPID/cmdline 2>/dev/null)"
recs zygote.ready_line "$(grep -m1 'ready on' "$O/zygote.log")"
measure_pyz() {  # STAND-IN CHILD ZYGOTE: ours through the zygote is three processes
  local si ch zy
  si=$(proc_mem "$1" exe); ch=$(proc_mem "$2" exe); zy=$(proc_mem "$3" exe)
  rec pyz.tight_stand_in_mem "$si"; rec pyz.tight_child_mem "$ch"; rec pyz.tight_zygote_mem "$zy"
  rec pyz.tight_pss_kb "{\"stand_in\": $(pss_of "$1"), \"child\": $(pss_of "$2"), \"zygote\": $(pss_of "$3")}"
}
pss_of() { local v; v=$(awk '/^Pss:/{print $2}' /proc/$1/smaps_rollup 2>/dev/null); echo "${v:-null}"; }
# libxl execs pyqemu-dm in C (pyxenfb/bin/pyqemu-dm, built on the host with the
# source) where it was built, else the Python launcher; its cold start is python3's.
# Installed: /usr/bin/pyqemu-dm is the package's C launcher, asking the zygote on
# its default socket (the unit's) with no environment of ours.
PYZDM=$PYDM; PYZ_LAUNCHER=python; PYZENV=("${PYENV[@]}" --dm-env PYXENFB_ZYGOTE=$ZSOCK --dm-env PYXENFB_PYTHON=python3)
[ -x $D/src/pyxenfb/bin/pyqemu-dm ] && { PYZDM=$D/src/pyxenfb/bin/pyqemu-dm; PYZ_LAUNCHER=c; }
[ -x /usr/bin/pyqemu-dm ] && [ -n "$ZUNIT" ] && { PYZDM=/usr/bin/pyqemu-dm; PYZ_LAUNCHER=c; PYZENV=(); }
recs pyz.dm "$PYZDM"
recs pyz.launcher "$PYZ_LAUNCHER"
T0=$(now)
if boot pyzg pyz "$PYZDM" --vncdisplay 0 --picture $X/picture-a.ppm "${PYZENV[@]}"; then
  port=$(xenlab_vnc_port pyzg)
  stand_in=$(dm_pid pyzg)
  child=$(grep -o 'forked the device model as pid [0-9]*' /var/log/xen/qemu-dm-pyzg.log | awk '{print $NF}' | tail -1)
  rec pyz.stand_in_pid "${stand_in:-null}"; rec pyz.child_pid "${child:-null}"
  tight_hold pyz "${port:-5900}" measure_pyz "$stand_in" "$child" "$ZPID"
  vnc pyz grab "${port:-5900}" "grab:raw:$O/pyz-vnc-raw.ppm" "grab:zrle:$O/pyz-vnc-zrle.ppm" \
    "grab:tight:$O/pyz-vnc-tight.ppm"
  rec pyz.stand_in_mem "$(proc_mem "$stand_in")"
  rec pyz.child_mem "$(proc_mem "$child")"
  recs pyz.pss_kb "$(awk '/^Pss:/{print $2}' /proc/$stand_in/smaps_rollup) $(awk '/^Pss:/{print $2}' /proc/$child/smaps_rollup) $(awk '/^Pss:/{print $2}' /proc/$ZPID/smaps_rollup)"
fi
finish pyz pyzg    # KEY != NAME: finish moves the logs from NAME to KEY
if [ -n "${child:-}" ] && [ -d /proc/$child ]; then rec pyz.child_left_running true; else rec pyz.child_left_running false; fi
rec pyz.scenario_s "$(since "$T0")"

# --- dm_restrict=1 through the zygote: the child chroots itself after its fork ------------
# (its encoder threads start with the first big update, inside the chroot: the
# ZRLE and Tight grabs are that update)
T0=$(now)
if boot pyzrg pyzr "$PYZDM" --vncdisplay 0 --picture $X/picture-a.ppm --cfg 'dm_restrict=1' "${PYZENV[@]}"; then
  port=$(xenlab_vnc_port pyzrg); d=$(xenlab_domid pyzrg)
  zr_child=$(grep -o 'forked the device model as pid [0-9]*' /var/log/xen/qemu-dm-pyzrg.log | awk '{print $NF}' | tail -1)
  rec pyzr.child_pid "${zr_child:-null}"
  vnc pyzr grab "${port:-5900}" "grab:zrle:$O/pyzr-vnc-zrle.ppm" "grab:tight:$O/pyzr-vnc-tight.ppm"
  if [ -n "$zr_child" ]; then
    recs pyzr.child_root "$(readlink /proc/$zr_child/root)"
    recs pyzr.expected_root "$(readlink -f /var/run/xen/qemu-root-$d)"
    recs pyzr.child_uids "$(awk '/^Uid:/{print $2" "$3" "$4" "$5}' /proc/$zr_child/status)"
  fi
  cp /var/log/xen/qemu-dm-pyzrg.log "$O/pyzr-dm.log" 2>/dev/null
fi
finish pyzr pyzrg
rec pyzr.scenario_s "$(since "$T0")"

# --- three domains through one zygote: a domain's cost with the zygote counted -----------
# (issue 16's measure, PSS with the zygote included: every process of ours, while
# each domain has one Tight client with a full frame)
pss_measure() {  # KEY PID...: the PSS of each, and their sum, as KEY.*
  local key=$1 total=0 n=0 p v list=""; shift
  for p in "$@"; do
    v=$(pss_of "$p"); [ "$v" = null ] && continue
    total=$((total + v)); n=$((n + 1)); list="$list $p:$v"
  done
  rec $key.pss_total_kb $total; rec $key.processes $n; recs $key.pss_by_pid "${list# }"
}
T0=$(now)
z3_pids=(); z3_ports=(); z3_ok=true
for i in 1 2 3; do
  if boot z3d$i z3$i "$PYZDM" --vncdisplay $((2 + i)) --picture $X/picture-a.ppm "${PYZENV[@]}"; then
    z3_ports+=("$(xenlab_vnc_port z3d$i)")
    z3_pids+=("$(dm_pid z3d$i)" "$(grep -o 'forked the device model as pid [0-9]*' \
      /var/log/xen/qemu-dm-z3d$i.log | awk '{print $NF}' | tail -1)")
  else
    z3_ok=false
  fi
done
rec z3.ready $z3_ok
if $z3_ok; then       # each tight_hold runs the next once its client has a full frame
  tight_hold z31 "${z3_ports[0]}" tight_hold z32 "${z3_ports[1]}" \
    tight_hold z33 "${z3_ports[2]}" pss_measure z3 "$ZPID" "${z3_pids[@]}"
fi
for i in 1 2 3; do finish z3$i z3d$i; done
rec z3.scenario_s "$(since "$T0")"

# --- three QEMU domains, as z3 (issue 24): memory per domain compared like with like ----
T0=$(now)
q3_pids=(); q3_ports=(); q3_ok=true
for i in 1 2 3; do
  if boot q3d$i q3$i qemu --vncdisplay $((2 + i)) --picture $X/picture-a.ppm; then
    q3_ports+=("$(xenlab_vnc_port q3d$i)"); q3_pids+=("$(dm_pid q3d$i)")
  else
    q3_ok=false
  fi
done
rec q3.ready $q3_ok
if $q3_ok; then
  tight_hold q31 "${q3_ports[0]}" tight_hold q32 "${q3_ports[1]}" \
    tight_hold q33 "${q3_ports[2]}" pss_measure q3 "${q3_pids[@]}"
fi
for i in 1 2 3; do finish q3$i q3d$i; done
rec q3.scenario_s "$(since "$T0")"

# --- steady state (issue 24): an animating guest, one Tight client for STEADY_S s ----------
# frames delivered and the device model's CPU per frame, QEMU and ours through the
# zygote (child + stand-in) in the same boot.  The client is the anchors' vnc-rate
# (one incremental request outstanding, payloads skipped, not decoded).
STEADY_S=${TIER_STEADY_S:-45}
cpu_ticks() { local p t=0; for p in "$@"; do [ -r /proc/$p/stat ] && t=$((t + $(awk '{print $14 + $15}' /proc/$p/stat))); done; echo $t; }
steady() {   # KEY NAME DM [create options]
  local key=$1 name=$2 dm=$3 port pids c0 c1 t0; shift 3
  T0=$(now)
  if boot "$name" "$key" "$dm" --vncdisplay 7 --guest-dir $X/anim "$@"; then
    port=$(xenlab_vnc_port "$name"); pids=$(dm_pid "$name")
    local child; child=$(grep -o 'forked the device model as pid [0-9]*' /var/log/xen/qemu-dm-$name.log 2>/dev/null | awk '{print $NF}' | tail -1)
    [ -n "$child" ] && pids="$pids $child"
    recs "$key.steady_pids" "$pids"
    step "$key: one Tight client (vnc-rate) for $STEADY_S s on an animating guest"
    # shellcheck disable=SC2086
    c0=$(cpu_ticks $pids); t0=$(now)
    if [ -f $X/vnc-rate ]; then
      timeout $((STEADY_S + 150)) python3 $X/vnc-rate "127.0.0.1::${port:-5907}" --encoding Tight \
        --seconds "$STEADY_S" > "$O/$key-steady.json" 2> "$O/$key-steady.err"
      rec "$key.steady_rc" $?
    else
      rec "$key.steady_rc" null
    fi
    # shellcheck disable=SC2086
    c1=$(cpu_ticks $pids)
    rec "$key.steady_wall_s" "$(since "$t0")"
    rec "$key.steady_dm_cpu_s" "$(awk "BEGIN{print ($c1 - $c0) / $(getconf CLK_TCK)}")"
  fi
  finish "$key" "$name"
  rec "$key.scenario_s" "$(since "$T0")"
}
steady qsteady qst qemu
steady pysteady pyst "$PYZDM" "${PYZENV[@]}"
kill $ZPID 2>/dev/null

# --- the host console (pyxenfb-console) over a QEMU- and a pyqemu-dm-served guest ---------
T0=$(now)
hc_ok=true
boot hcq hcq qemu --vncdisplay 1 --picture $X/picture-a.ppm || hc_ok=false
boot hcp hcp "$PYDM" --vncdisplay 2 --picture $X/picture-b.ppm "${PYENV[@]}" || hc_ok=false
step "console: pyxenfb-console, then one relayed frame of each domain"
PYTHONPATH=$D/src:$D/site PYTHONDONTWRITEBYTECODE=1 python3 -m pyxenfb.hostconsole.cli --port 8080 \
  > "$O/console.log" 2>&1 &
CPID=$!
end=$(( $(date +%s) + READY_S ))
until python3 -c 'import urllib.request; urllib.request.urlopen("http://127.0.0.1:8080/api/domains", timeout=5)' \
      2>/dev/null || [ "$(date +%s)" -ge $end ] || ! kill -0 $CPID 2>/dev/null; do sleep 1; done
rec hc.both_ready $hc_ok
timeout 300 python3 $X/consolecheck.py 8080 "$O"; rec hc.check_rc $?
kill $CPID 2>/dev/null
finish hcq_end hcq
finish hcp_end hcp
rec hc.scenario_s "$(since "$T0")"

recs end.xl_list "$(xl list 2>&1)"
# any dom0 process killed by a fault: our DM, or the lab corrupting xl/bash/python
recs end.dom0_faults "$(dmesg | grep -E 'segfault at|general protection|traps: ' )"
recs end.leftover_dms "$(ps -eo pid,args | grep -E 'pyqemu-dm|xen-qemu-system-i386 -xen-domid [1-9]' | grep -v grep)"
step "tier done"
exit 0
