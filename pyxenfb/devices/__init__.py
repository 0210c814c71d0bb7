"""Devices layer: the vfb/vkbd shared-memory layouts.  The backends
themselves are `pyxenfb/xenfb.py`."""
