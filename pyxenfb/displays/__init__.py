"""Displays' helpers: pixman through cffi.  The displays themselves are
`pyxenfb/vnc.py` (with the RFB server in `pyxenfb/rfb/`) and `sdl.py`;
pixel conversion is `convert.py`."""
