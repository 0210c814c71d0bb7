"""pyqemu-dm command line: xend and libxl argv styles, errors, --help."""
import logging
import re
import sys
import types

import pytest
from hypothesis import given, settings, strategies as st

from pyxenfb.machine import cli
from pyxenfb.machine.cli import ChardevSocket, CliError, EarlyExit, VncOptions, parse_args

# argv[1:] exactly as libxl 4.17 (Debian Xen 4.17.7) started the device model
# for a PV guest with vfb = ["vnc=1,vnclisten=127.0.0.1,vncdisplay=0"];
# captured in reference/libxl-4.17-captured/dm-argv-real-qemu.txt.
LIBXL_417_ARGV = [
    "-xen-domid", "1",
    "-no-shutdown",
    "-chardev", "socket,id=libxl-cmd,path=/var/run/xen/qmp-libxl-1,server=on,wait=off",
    "-mon", "chardev=libxl-cmd,mode=control",
    "-chardev", "socket,id=libxenstat-cmd,path=/var/run/xen/qmp-libxenstat-1,server=on,wait=off",
    "-mon", "chardev=libxenstat-cmd,mode=control",
    "-nodefaults",
    "-no-user-config",
    "-xen-attach",
    "-name", "fbtest",
    "-vnc", "127.0.0.1:0,to=99",
    "-display", "none",
    "-machine", "xenpv",
    "-m", "256",
]

# libxl's command-line probe (libxl_dm.c, before launching qemu-xen).
LIBXL_PROBE_ARGV = [
    "-S", "-no-user-config", "-nodefaults", "-nographic",
    "-machine", "none,accel=xen",
    "-chardev", "socket,id=libxl-cmd,fd=7,server=on,wait=off",
    "-mon", "chardev=libxl-cmd,mode=control",
]


def test_libxl_417_captured_argv():
    o = parse_args(LIBXL_417_ARGV)
    assert o.machine == "xenpv"
    assert o.domid == 1
    assert o.name == "fbtest"
    assert o.vnc == VncOptions(host="127.0.0.1", display=0, to_display=99,
                               password=False, websocket=None)
    assert o.vnc.port == 5900
    assert o.sdl is False
    assert o.keymap is None
    assert o.monitors == [
        ChardevSocket("libxl-cmd", "/var/run/xen/qmp-libxl-1", None, True, False),
        ChardevSocket("libxenstat-cmd", "/var/run/xen/qmp-libxenstat-1", None, True, False),
    ]
    assert o.start_paused is False
    assert o.memory_mb == 256
    assert o.ignored == []        # libxl's standard argv causes no warning


def test_libxl_fd_chardev_with_S_and_all_display_variants():
    # pvfb.md section 7: fd= QMP chardev with -S, a channel chardev,
    # password, SDL, keymap, user extra args and extra_pv args.
    argv = [
        "-xen-domid", "7", "-no-shutdown",
        "-chardev", "socket,id=libxl-cmd,fd=9,server=on,wait=off", "-S",
        "-mon", "chardev=libxl-cmd,mode=control",
        "-chardev", "socket,id=libxenstat-cmd,path=/run/xen/qmp-libxenstat-7,server=on,wait=off",
        "-mon", "chardev=libxenstat-cmd,mode=control",
        "-chardev", "pty,id=libxl-channel0",
        "-nodefaults", "-no-user-config", "-xen-attach",
        "-name", "guest=web,debug-threads=on",
        "-vnc", "0.0.0.0:3,password=on,to=99",
        "-display", "none", "-display", "sdl",
        "-k", "de",
        "-serial", "pty",
        "-machine", "xenpv,accel=xen", "-m", "1G",
    ]
    o = parse_args(argv)
    assert o.domid == 7 and o.name == "web"
    assert o.start_paused is True
    assert o.monitors[0] == ChardevSocket("libxl-cmd", None, 9, True, False)
    assert o.monitors[1].path == "/run/xen/qmp-libxenstat-7"
    assert o.vnc == VncOptions("0.0.0.0", 3, 99, True, None)
    assert o.sdl is True and o.keymap == "de"
    assert o.memory_mb == 1024
    assert o.ignored == ["-name debug-threads=on", "-serial pty",
                         "-chardev pty,id=libxl-channel0"]


def test_libxl_vnc_none_nographic():
    argv = ["-xen-domid", "2", "-chardev",
            "socket,id=libxl-cmd,path=/tmp/q,server=on,wait=off",
            "-mon", "chardev=libxl-cmd,mode=control",
            "-name", "x", "-vnc", "none", "-display", "none", "-nographic",
            "-machine", "xenpv", "-m", "128"]
    o = parse_args(argv)
    assert o.vnc is None and o.sdl is False and o.ignored == []


def test_libxl_probe():
    o = parse_args(LIBXL_PROBE_ARGV)
    assert o.machine == "none"
    assert o.domid is None
    assert o.start_paused is True
    assert o.monitors == [ChardevSocket("libxl-cmd", None, 7, True, False)]
    assert o.vnc is None and o.ignored == []


def test_libxl_qdisk_backend_argv():
    # libxl__spawn_qemu_xenpv_backend (a qdisk-only device model)
    o = parse_args(["-xen-domid", "0", "-xen-attach", "-name", "domain-0",
                    "-nographic", "-M", "xenpv", "-monitor", "/dev/null",
                    "-serial", "/dev/null", "-parallel", "/dev/null"])
    assert o.domid == 0 and o.name == "domain-0" and o.vnc is None
    assert o.ignored == ["-monitor /dev/null", "-serial /dev/null", "-parallel /dev/null"]


def test_xend_2007_argv():
    o = parse_args(["-M", "xenpv", "-d", "3", "-domain-name", "web",
                    "-vnc", "127.0.0.1:2", "-vncunused", "-k", "en-us"])
    assert o.machine == "xenpv" and o.domid == 3 and o.name == "web"
    assert o.vnc == VncOptions("127.0.0.1", 2, 2 + cli.VNCUNUSED_SPAN, False, None)
    assert o.keymap == "en-us" and o.sdl is False and o.monitors == []


def test_xend_vnclisten_overrides_host_in_any_order():
    for argv in (["-d", "1", "-vnclisten", "0.0.0.0", "-vnc", "127.0.0.1:1"],
                 ["-d", "1", "-vnc", "127.0.0.1:1", "-vnclisten", "0.0.0.0"]):
        assert parse_args(argv).vnc.host == "0.0.0.0"
    assert parse_args(["-d", "1", "-vnc", ":1", "-vnclisten", "[::]"]).vnc.host == "::"


def test_xend_sdl_and_vncviewer():
    o = parse_args(["-M", "xenpv", "-d", "4", "-sdl", "-vnc", ":0", "-vncviewer"])
    assert o.sdl and o.vncviewer and o.vnc.display == 0


def test_design_card_double_dash_forms():
    o = parse_args(["-d", "1", "--vnc", ":1", "--sdl"])
    assert o.vnc == VncOptions("127.0.0.1", 1, None, False, None)
    assert o.sdl
    assert parse_args(["--xen-domid", "5", "-vnc", ":1"]).vnc.port == 5901


@pytest.mark.parametrize("value, expected", [
    (":0", VncOptions("127.0.0.1", 0, None, False, None)),
    ("localhost:5", VncOptions("localhost", 5, None, False, None)),
    ("[::1]:0", VncOptions("::1", 0, None, False, None)),
    ("[::1]:4,to=10", VncOptions("::1", 4, 10, False, None)),
    ("127.0.0.1:1,password", VncOptions("127.0.0.1", 1, None, True, None)),
    ("127.0.0.1:1,password=off", VncOptions("127.0.0.1", 1, None, False, None)),
    (":2,websocket=on", VncOptions("127.0.0.1", 2, None, False, 5702, websocket_on=True)),
    (":2,websocket", VncOptions("127.0.0.1", 2, None, False, 5702, websocket_on=True)),
    (":2,websocket=5800", VncOptions("127.0.0.1", 2, None, False, 5800)),
    (":2,websocket=0.0.0.0:5801", VncOptions("127.0.0.1", 2, None, False, 5801)),
    (":2,websocket=off", VncOptions("127.0.0.1", 2, None, False, None)),
    (":59635", VncOptions("127.0.0.1", 59635, None, False, None)),
])
def test_vnc_values(value, expected):
    assert parse_args(["-d", "1", "-vnc", value]).vnc == expected


@pytest.mark.parametrize("given, normalised", [
    ("https://console.example", "https://console.example"),
    ("HTTPS://Console.Example:443", "https://console.example"),
    ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
    ("http://127.0.0.1:80", "http://127.0.0.1"),
    ("https://console.example:8443", "https://console.example:8443"),
    ("http://[::1]:8080", "http://[::1]:8080"),
    ("http://[0:0::1]", "http://[::1]"),
    ("http://xn--bcher-kva.example", "http://xn--bcher-kva.example"),
])
def test_websocket_origin_values(given, normalised):
    o = parse_args(["-d", "1", "-vnc", f":1,websocket=on,websocket-origin={given}"])
    assert o.vnc.websocket_origins == [normalised]


def test_websocket_origin_is_repeatable():
    o = parse_args(["-d", "1", "-vnc", ":1,websocket=on,websocket-origin=https://console.example,"
                    "websocket-origin=http://127.0.0.1:8000"])
    assert o.vnc.websocket == 5701 and o.vnc.websocket_on
    assert o.vnc.websocket_origins == ["https://console.example", "http://127.0.0.1:8000"]
    assert parse_args(["-d", "1", "-vnc", ":1"]).vnc.websocket_origins == []


@pytest.mark.parametrize("hostile", [
    "javascript:alert(1)", "console.example", "//console.example", "null", "file://",
    "https://console.example/", "https://console.example/vnc.html", "https://console.example?x=1",
    "https://console.example#x", "https://user@console.example", "https://user:pw@console.example",
    "ftp://console.example", "ws://console.example", "https://", "https://:443",
    "https://console.example:0", "https://console.example:65536", "https://console.example:8o",
    "https://console.example:-1", "https://-bad.example", "https://bad_host.example",
    "https://büch.example", "https://console.example\u0000", "https://console.example\n",
    "https://con sole.example", "http://[::1", "http://[not-v6]", "http://[::1]x",
    "http://" + "a" * 300 + ".example", "https://" + "a." * 5000 + "example",
])
def test_websocket_origin_hostile_values_are_one_line_errors(hostile):
    with pytest.raises(CliError) as err:
        parse_args(["-d", "1", "-vnc", f":1,websocket=on,websocket-origin={hostile}"])
    text = str(err.value)
    assert text.startswith("-vnc: websocket-origin=") and "\n" not in text and len(text) < 250, text


def test_xend_style_takes_websocket_and_origins():
    """qemu-dm's argv (-vnc ADDR:D -vncunused -vnclisten, or --vnc as the
    README shows) takes the same keys."""
    for argv in (["-M", "xenpv", "-d", "3", "-domain-name", "web",
                  "-vnc", "127.0.0.1:1,websocket=on,websocket-origin=https://console.example",
                  "-vncunused", "-vnclisten", "0.0.0.0"],
                 ["-d", "3", "--vnc", ":1,websocket=on,websocket-origin=https://console.example",
                  "--vncunused", "--vnclisten", "0.0.0.0"]):
        o = parse_args(argv)
        assert (o.vnc.host, o.vnc.display, o.vnc.to_display) == ("0.0.0.0", 1, 100)
        assert (o.vnc.websocket, o.vnc.websocket_on) == (5701, True)
        assert o.vnc.websocket_origins == ["https://console.example"]
    o = parse_args(["-d", "3", "--vnc", "127.0.0.1:1,websocket=5999", "-vncunused"])
    assert (o.vnc.websocket, o.vnc.websocket_on, o.vnc.websocket_origins) == (5999, False, [])
    with pytest.raises(CliError, match="needs websocket="):
        parse_args(["-d", "3", "--vnc", ":1,websocket-origin=https://console.example", "-vncunused"])


def test_help_lists_websocket_origin():
    with pytest.raises(EarlyExit) as out:
        parse_args(["--help"])
    assert "websocket-origin=URL" in out.value.text and "websocket=on|[HOST:]PORT" in out.value.text


def test_vnc_tuning_options_are_ignored_with_a_note():
    o = parse_args(["-d", "1", "-vnc", ":1,lossy=on,share=ignore"])
    assert o.vnc.display == 1 and o.vnc.lossy is True
    assert o.ignored == ["-vnc share=ignore"]
    assert parse_args(["-d", "1", "-vnc", ":1"]).vnc.lossy is False


def test_vncunused_keeps_explicit_to_and_is_capped():
    assert parse_args(["-d", "1", "-vnc", ":1,to=5", "-vncunused"]).vnc.to_display == 5
    o = parse_args(["-d", "1", "-vnc", ":59600", "-vncunused"])
    assert o.vnc.to_display == cli.MAX_DISPLAY


def test_last_vnc_and_display_win():
    o = parse_args(["-d", "1", "-vnc", ":1", "-vnc", "none", "-display", "sdl",
                    "-display", "none"])
    assert o.vnc is None and o.sdl is False
    o = parse_args(["-d", "1", "-display", "vnc=:4"])   # QEMU's legacy spelling
    assert o.vnc.display == 4


def test_name_forms():
    assert parse_args(["-d", "1", "-name", "a,,b"]).name == "a,b"
    assert parse_args(["-d", "1", "-name", "guest=g,process=p"]).name == "g"


@pytest.mark.parametrize("value, mib", [
    ("256", 256), ("256M", 256), ("2G", 2048), ("size=512M", 512),
    ("512,slots=2,maxmem=1G", 512), ("1048576k", 1024),
])
def test_memory(value, mib):
    assert parse_args(["-d", "1", "-m", value]).memory_mb == mib


def test_qmp_shorthand_becomes_a_monitor():
    o = parse_args(["-d", "1", "-qmp", "unix:/tmp/q.sock,server,nowait"])
    assert o.monitors == [ChardevSocket("compat_monitor0", "/tmp/q.sock", None, True, False)]
    assert o.ignored == []
    o = parse_args(["-d", "1", "-qmp", "tcp:localhost:4444,server"])
    assert o.monitors == [] and o.ignored == ["-qmp tcp:localhost:4444,server"]


def test_unknown_options_are_ignored_and_their_values_consumed():
    o = parse_args(["-d", "1", "-serial", "pty", "-device", "virtio-net,netdev=n",
                    "-usb", "-boot", "c", "-cpu", "host", "-smp", "2",
                    "-vga", "std", "-usbdevice", "tablet", "-net", "none",
                    "-d", "guest_errors", "disk.img", "-vnc", ":1"])
    assert o.vnc.display == 1
    assert o.ignored == ["-serial pty", "-device virtio-net,netdev=n", "-usb",
                         "-boot c", "-cpu host", "-smp 2", "-vga std",
                         "-usbdevice tablet", "-net none", "-d guest_errors", "disk.img"]


def test_readline_monitor_is_ignored_but_checked():
    o = parse_args(["-d", "1", "-chardev", "socket,id=h,path=/tmp/h,server=on,wait=off",
                    "-mon", "chardev=h"])
    assert o.monitors == []
    assert o.ignored == ["-mon chardev=h", "-chardev socket,id=h,path=/tmp/h,server=on,wait=off"]


@pytest.mark.parametrize("argv, fragment", [
    (["-xen-domid", "abc"], "domain id must be a number"),
    (["-xen-domid", "-1"], "domain id must be a number"),
    (["-xen-domid", "40000"], "out of range"),
    (["-d", "1x"], "domain id must be a number"),
    (["-xen-domid", "1", "-d", "2"], "conflicts"),
    (["-vnc", ":x", "-d", "1"], "display must be a number"),
    (["-d", "1", "-vnc", ":60000"], "out of range"),
    (["-d", "1", "-vnc", "127.0.0.1"], "lacks ':display'"),
    (["-d", "1", "-vnc", ":5,to=3"], "out of range"),
    (["-d", "1", "-vnc", ":1,password=maybe"], "on or off"),
    (["-d", "1", "-vnc", ":1,tls-creds=x"], "no such -object"),
    (["-d", "1", "-vnc", ":1,sasl"], "not supported"),
    (["-d", "1", "-vnc", ":1,bogus=1"], "unknown option 'bogus'"),
    (["-d", "1", "-vnc", "unix:/tmp/v"], "unix socket"),
    (["-d", "1", "-vnc", "[::1:0"], "bad address"),
    (["-d", "1", "-vnc", ":1,websocket=70000"], "out of range"),
    (["-d", "1", "-vnc", ":1,websocket-origin=https://a.example"], "needs websocket=on|PORT"),
    (["-d", "1", "-vnc", ":1,websocket=off,websocket-origin=https://a.example"], "needs websocket="),
    (["-d", "1", "-vnc", ":1,websocket=on,websocket-origin="], "needs an origin"),
    (["-d", "1", "-vnc", ":1,websocket=on,websocket-origin"], "needs an origin"),
    (["-d", "1", "-m", "lots"], "bad memory size"),
    (["-d", "1", "-m", "0"], "out of range"),
    (["-d", "1", "-chardev", "socket,path=/tmp/x,server=on"], "no id="),
    (["-d", "1", "-chardev", "socket,id=c,server=on"], "exactly one of path= or fd="),
    (["-d", "1", "-chardev", "socket,id=c,path=/a,fd=3"], "exactly one of path= or fd="),
    (["-d", "1", "-chardev", "socket,id=c,fd=x"], "fd must be a number"),
    (["-d", "1", "-chardev", "socket,id=c,path=/" + "x" * 200], "bad unix socket path"),
    (["-d", "1", "-chardev", "socket,id=c,path=/a", "-chardev", "pty,id=c"], "duplicate id"),
    (["-d", "1", "-mon", "chardev=nope,mode=control"], "chardev 'nope' not found"),
    (["-d", "1", "-mon", "mode=control"], "no chardev="),
    (["-d", "1", "-chardev", "pty,id=p", "-mon", "chardev=p,mode=control"], "needs a unix socket"),
    (["-d", "1", "-chardev", "socket,id=c,path=/a", "-mon", "chardev=c,mode=control"],
     "server=on"),
    (["-d", "1", "-machine", "pc"], "machine type 'pc' is not supported"),
    (["-d", "1", "-M", "xenfv"], "not supported"),
    (["-d", "1", "-machine", "xenpv,accel=kvm"], "accel"),
    (["-d", "1", "-display", "gtk"], "'gtk' is not supported"),
    (["-d", "1", "-k", "../../etc/passwd"], "bad keymap"),
    (["-d", "1", "-sdl", "-nographic"], "-nographic"),
    (["-d", "1", "-name", "guest="], "no guest name"),
    (["-d", "1", "-vnc"], "requires an argument"),
    (["-d", "1", "-serial"], "requires an argument"),
    (["-d", "1", "-runas", "no-such-user-here"], "doesn't exist (and is not <uid>:<gid>)"),
    (["-d", "1", "-runas", ""], "empty user name"),
    (["-d", "1", "-runas", "root"], "is root"),
    (["-d", "1", "-runas", "0:0"], "is root"),
    (["-d", "1", "-runas", "99999999999:1"], "out of range"),
    (["-d", "1", "-chroot", "/no/such/dir"], "not a directory"),
    (["-d", "1", "-chroot", ""], "empty directory"),
    (["-d", "1", "-run-with", "chroot=/no/such/dir"], "not a directory"),
    (["-d", "1", "-run-with", "user=no-such-user-here"], "doesn't exist"),
    (["-d", "1", "-run-with", "jail=/"], "-run-with: unknown option 'jail'"),
    (["-d", "1", "-chroot", "/", "-sdl"], "SDL cannot run inside -chroot"),
    (["-machine", "none", "-xen-domid-restrict"], "needs a domain"),
    (["-d", "1", "-chroot"], "requires an argument"),
    (["-d", "1", "-sandbox", "on"], "refusing"),
    (["-vnc", ":1"], "no domain id"),
    # each malformed value is named in the one line
    (["-d", "abc"], "-d: 'abc' is neither a domain id nor QEMU log items"),
    (["-d", "1", "-d", "guest_errors,bogus"], "'bogus' is not one"),
    (["-d", "1", "-vnc", ":x"], "-vnc: display must be a number, not 'x'"),
    (["-d", "1", "-vnc", ":1,to=x"], "-vnc: to= must be a number, not 'x'"),
    (["-d", "1", "-k", "nosuch"], "-k: unknown keymap 'nosuch' (available: ar bepo"),
    (["-d", "-1"], "-d: domain id must be a number, not '-1'"),
    (["-xen-domid", "abc"], "-xen-domid: domain id must be a number, not 'abc'"),
    (["-d", "1", "-m", "12q"], "-m: bad memory size '12q'"),
])
def test_bad_command_lines(argv, fragment):
    with pytest.raises(CliError, match=None) as info:
        parse_args(argv)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


@pytest.fixture
def fake_machine(monkeypatch):
    """A stand-in for the lead's machine_pv module, recording what run() got."""
    seen = []
    module = types.ModuleType("pyxenfb.machine_pv")
    module.run = lambda options: seen.append(options) or 0
    monkeypatch.setitem(sys.modules, "pyxenfb.machine_pv", module)
    yield seen
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_pyqemu_dm", False):
            root.removeHandler(handler)


@pytest.mark.parametrize("argv, line", [
    (["-d", "abc"], "pyqemu-dm: -d: 'abc' is neither a domain id nor QEMU log items "
                    "('abc' is not one)\n"),
    (["-d", "1", "-vnc", ":x"], "pyqemu-dm: -vnc: display must be a number, not 'x'\n"),
])
def test_main_names_the_bad_value(capsys, fake_machine, argv, line):
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == line
    assert fake_machine == []


def test_main_unknown_keymap_is_one_line(capsys, fake_machine):
    assert cli.main(["-d", "1", "-k", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyqemu-dm: -k: unknown keymap 'nosuch' (available: ")
    assert err.count("\n") == 1 and " en-us " in err and fake_machine == []


def test_qemu_log_items_after_d_are_still_ignored():
    o = parse_args(["-xen-domid", "2", "-d", "guest_errors,unimp", "-d", "trace:xen_*"])
    assert o.domid == 2
    assert o.ignored == ["-d guest_errors,unimp", "-d trace:xen_*"]


def test_main_bad_argv_exits_2_with_one_line(capsys, fake_machine):
    assert cli.main(["-xen-domid", "one"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("pyqemu-dm: -xen-domid: domain id must be a number")
    assert "Traceback" not in err
    assert fake_machine == []


def test_main_runs_machine_and_warns_once_about_ignored(capsys, fake_machine):
    assert cli.main(["-xen-domid", "4", "-serial", "pty", "-usb", "-vnc", ":1"]) == 0
    out, err = capsys.readouterr()
    assert err == "pyqemu-dm[4]: ignoring unsupported options: -serial pty -usb\n"
    assert fake_machine[0].domid == 4 and fake_machine[0].vnc.display == 1


def test_main_libxl_argv_is_silent(capsys, fake_machine):
    assert cli.main(LIBXL_417_ARGV) == 0
    assert capsys.readouterr().err == ""
    assert fake_machine[0].name == "fbtest"


def test_main_log_prefix(capsys, fake_machine):
    cli.main(["-d", "9"])
    logging.getLogger("pyxenfb.test").warning("two\nlines")
    assert capsys.readouterr().err == "pyqemu-dm[9]: two | lines\n"


@pytest.mark.parametrize("flag", ["--help", "-h", "-help"])
def test_help(capsys, flag, fake_machine):
    assert cli.main([flag]) == 0
    out = capsys.readouterr().out
    for heading in ("Machine:", "Display:", "Monitor (QMP", "Compatibility:", "Examples:"):
        assert heading in out
    assert "-xen-domid" in out and "-vncunused" in out and "--vnc :1" in out
    assert fake_machine == []


def test_version(capsys, fake_machine):
    assert cli.main(["-version"]) == 0
    assert "pyqemu-dm" in capsys.readouterr().out


_TOKENS = st.sampled_from([
    "-d", "-xen-domid", "-vnc", "-chardev", "-mon", "-machine", "-M", "-m", "-k",
    "-name", "-display", "-sdl", "-S", "-nographic", "-vncunused", "-vnclisten",
    "-serial", "-qmp", "--vnc", "1", ":1", "none", "xenpv", "sdl", "de", "[::1]:0",
    "socket,id=a,path=/tmp/a,server=on", "chardev=a,mode=control", "pty,id=b",
    "127.0.0.1:0,to=99", ",,", "=", "", "-", "--",
])


@settings(deadline=None, max_examples=300)
@given(st.lists(st.one_of(_TOKENS, st.text(max_size=12)), max_size=12))
def test_parser_fuzz_only_raises_cli_errors(argv):
    try:
        o = parse_args(argv)
    except (CliError, EarlyExit):
        return
    assert o.machine in ("xenpv", "none")
    if o.vnc is not None:
        assert 0 <= o.vnc.display <= cli.MAX_DISPLAY
        assert o.vnc.to_display is None or o.vnc.display <= o.vnc.to_display <= cli.MAX_DISPLAY


# ---- dm_restrict ------------------------------------------------------------
def test_libxl_dm_restrict_argv(tmp_path):
    """libxl 4.17 with dm_restrict=1 for a PV guest (libxl_dm.c)."""
    o = parse_args(["-xen-domid", "7", "-chardev", "socket,id=libxl-cmd,fd=5,server=on,wait=off",
                    "-mon", "chardev=libxl-cmd,mode=control", "-nodefaults", "-no-user-config",
                    "-xen-attach", "-name", "g", "-vnc", "127.0.0.1:0,to=99", "-display", "none",
                    "-xen-domid-restrict", "-chroot", str(tmp_path), "-machine", "xenpv", "-m", "64"])
    assert o.restrict.domid_restrict and o.restrict.chroot == str(tmp_path)
    assert o.restrict.user is None and o.restrict.active
    assert o.ignored == []


def test_runas_user_and_uid_gid():
    import pwd
    nobody = pwd.getpwnam("nobody")
    o = parse_args(["-d", "1", "-runas", "nobody"])
    assert (o.restrict.user.uid, o.restrict.user.gid) == (nobody.pw_uid, nobody.pw_gid)
    o = parse_args(["-d", "1", "-runas", "1234:5678"])
    assert (o.restrict.user.uid, o.restrict.user.gid) == (1234, 5678)
    assert not parse_args(["-d", "1"]).restrict.active


def test_run_with_spelling(tmp_path):
    o = parse_args(["-d", "1", "-run-with", f"chroot={tmp_path},user=nobody,async-teardown=on"])
    assert o.restrict.chroot == str(tmp_path) and o.restrict.user.spec == "nobody"
    assert o.ignored == ["-run-with async-teardown=on"]
    o = parse_args(["-d", "1", "--run-with", f"chroot={str(tmp_path).replace(',', ',,')}"])
    assert o.restrict.chroot == str(tmp_path)


def test_bad_restrict_option_is_one_line_exit_2(capsys):
    assert cli.main(["-d", "1", "-runas", "no-such-user-here"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pyqemu-dm: -runas:")


def test_option_table_is_the_one_source():
    """--help, the options that take a value and the dispatch all come from
    cli.OPTION_TABLE: every option --help shows is a row with an action."""
    shown = set()
    for line in cli.HELP.splitlines():
        for word in re.findall(r"(?:^|\s|\|\s)-([A-Za-z][\w-]*)", line.split("   ")[0]):
            shown.add(word)
    assert {"machine", "xen-domid", "vnc", "chardev", "runas", "run-with", "no-user-config"} <= shown
    for name in shown:
        assert cli.OPTIONS_BY_NAME[name].action is not None, name
    names = [n for row in cli.OPTION_TABLE for n in row.names]
    assert len(names) == len(set(names)), "an option in two rows"
    assert {"vnc", "chardev", "serial", "d", "xen-domid"} <= cli.OPTIONS_WITH_VALUE
    assert not {"sdl", "S", "nographic", "xen-attach", "help"} & cli.OPTIONS_WITH_VALUE
    assert cli.HELP.startswith(f"usage: {cli.PROG} [options]\n") and cli.HELP.endswith("--sdl\n")
