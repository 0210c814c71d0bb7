"""Platform layer: the hypervisor's interfaces (XenStore, foreign memory,
the choice of a real or simulated host), below the devices.  Event channels
live in `pyxenfb/evtchn.py`, where the design card puts them."""
