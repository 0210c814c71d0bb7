"""The warm fork-server (docs/zygote.md): `pyqemu-dm`'s launcher and
stand-in, the zygote that forks device models, and its rehearsal.  It
imports the device model; nothing in the device model imports it."""
